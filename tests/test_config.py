"""Config validation, `sandpool config check`, and docs/configuration.md kept true."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pool.config import (
    BACKEND_ONLY_KEYS,
    Config,
    PoolConfig,
    ServerConfig,
    _toml_value,
    default_pools,
    load_config,
    parse_config,
    to_toml,
)
from pool.errors import ConfigError

CONFIG_REFERENCE = Path(__file__).parent.parent / "docs" / "configuration.md"


@pytest.mark.parametrize(("document", "message"), [
    ({"nope": 1}, "unknown key nope"),
    ({"server": {"sockt": "/x"}}, "unknown key server.sockt"),
    ({"server": {"socket": "relative"}}, "server.socket must be an absolute path"),
    ({"server": {"metrics_address": "nowhere"}}, "server.metrics_address must be HOST:PORT"),
    ({"server": {"allowed_uids": [-1]}}, "server.allowed_uids must be a list"),
    ({"pools": {"p": {"min_idle": 3, "max_size": 2}}}, "pools.p.min_idle must be between"),
    ({"pools": {"p": {"backend": "vm"}}}, "pools.p.backend must be one of"),
    ({"pools": {"p": {"memory_mb": "1g"}}}, "pools.p.memory_mb must be of type int"),
    ({"pools": {"p": {"timeout_s": 0}}}, "pools.p.timeout_s must be greater than 0"),
    ({"pools": {"p": {"timeout_s": 90}}}, "pools.p.timeout_s must not exceed max_timeout_s"),
    ({"pools": {"p": {"cpus": True}}}, "pools.p.cpus must be of type int or float, not bool"),
    ({"pools": {"Bad Name": {}}}, "pools.Bad Name: pool names are"),
    ({"pools": {"p": {"colour": 1}}}, "unknown key pools.p.colour"),
])
def test_bad_values_name_the_key(document: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert message in caught.value.message


@pytest.mark.parametrize(("backend", "key", "value", "readers"), [
    ("wasm", "image", "sandpool/python:bookworm", "the docker, process and fork backends"),
    ("process", "runtime", "runsc", "the docker backend"),
    ("fake", "image", "x", "the docker, process and fork backends"),
    ("docker", "wasm_module", "/opt/python.wasm", "the wasm backend"),
    ("process", "wasm_max_open_files", 64, "the wasm backend"),
    ("wasm", "pids_limit", 64, "the docker, process and fork backends"),
])
def test_a_key_of_another_backend_is_refused(
    backend: str, key: str, value: object, readers: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"pools": {"p": {"backend": backend, key: value}}})
    assert caught.value.code == "key_for_other_backend"
    assert caught.value.message == (
        f"pools.p.{key} applies only to {readers}, and pool 'p' uses the {backend} "
        f"backend: remove the key or change the backend"
    )


def test_a_pool_without_backend_is_docker_for_backend_only_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"pools": {"p": {"wasm_max_open_files": 8}}})
    assert "pool 'p' uses the docker backend" in caught.value.message


def test_a_wasm_pool_refuses_shell() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"pools": {"w": {"backend": "wasm", "language": "shell"}}})
    assert caught.value.code == "language_not_supported"
    assert caught.value.message == (
        "pools.w.language: the wasm backend runs only python, not 'shell'"
    )


def test_each_backend_takes_its_own_keys() -> None:
    config = parse_config({"pools": {
        "d": {"image": "other:tag", "runtime": "runsc", "pids_limit": 32},
        "p": {"backend": "process", "pids_limit": 16},
        "w": {"backend": "wasm", "wasm_module": "/opt/python.wasm", "wasm_max_open_files": 8},
    }})
    d, p, w = config.pools
    assert (d.image, d.runtime, d.pids_limit) == ("other:tag", "runsc", 32)
    assert p.pids_limit == 16
    assert (w.wasm_module, w.wasm_max_open_files) == ("/opt/python.wasm", 8)


def test_backend_only_keys_are_pool_keys() -> None:
    fields = {f.name for f in dataclasses.fields(PoolConfig)}
    assert set(BACKEND_ONLY_KEYS) <= fields
    assert "backend" not in BACKEND_ONLY_KEYS


def test_effective_config_of_every_backend_loads_back(tmp_path: Path) -> None:
    config = parse_config({"pools": {
        "d": {"runtime": "runsc"},
        "p": {"backend": "process"},
        "w": {"backend": "wasm", "wasm_module": "/opt/python.wasm"},
        "f": {"backend": "fake"},
    }})
    text = to_toml(config)
    assert "image = " in text.split("[pools.d]")[1].split("[pools.p]")[0]
    assert "image = " in text.split("[pools.p]")[1].split("[pools.w]")[0]
    assert "image = " not in text.split("[pools.w]")[1]
    path = tmp_path / "effective.toml"
    path.write_text(text)
    assert load_config(path) == config


def test_defaults_and_overrides() -> None:
    config = parse_config({"pools": {"fast": {"min_idle": 4, "cpus": 1}}})
    assert [p.name for p in config.pools] == ["fast"]
    assert config.pools[0].cpus == 1.0
    assert config.pools[0].max_size == 8
    defaults = {p.name: p for p in load_config(None).pools}
    assert set(defaults) >= {"python", "shell", "datasci", "javascript", "python-wasm"}
    assert defaults["datasci"].image == "sandpool/datasci:bookworm"
    assert defaults["datasci"].preload == ("numpy", "pandas", "matplotlib.pyplot")
    # A data analysis is CPU-bound on one thread: a whole core, not the default half.
    assert defaults["datasci"].cpus == 1.0
    assert all(p.cpus == 1.0 for p in defaults.values() if p.preload)
    # The default wasm pool's guests start from a memory image, which the pinned
    # module cannot give.
    assert (defaults["python-wasm"].backend, defaults["python-wasm"].wasm_module) == (
        "wasm", "datasci")
    assert (defaults["javascript"].language, defaults["javascript"].image) == (
        "javascript", "sandpool/node:bookworm")


def test_effective_config_round_trips(tmp_path: Path) -> None:
    config = load_config(None)
    path = tmp_path / "effective.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_config_check_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[pools.python]\nmin_idle = 1\n")
    done = subprocess.run([sys.executable, "-m", "api.cli", "config", "check", str(good)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "[pools.python]\nbackend = \"docker\"" in done.stdout
    assert "min_idle = 1\n" in done.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[pools.python]\nmin_idle = 'two'\n")
    done = subprocess.run([sys.executable, "-m", "api.cli", "config", "check", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == "sandpool: pools.python.min_idle must be of type int, not str\n"


@pytest.mark.parametrize(("marker", "table"), [("server", ServerConfig),
                                               ("pool", PoolConfig)])
def test_configuration_reference_matches_the_code(marker: str, table: type) -> None:
    text = CONFIG_REFERENCE.read_text()
    section = text.split(f"<!-- config-reference:{marker} -->")[1].split("<!-- end -->")[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|", section, re.M)
    documented = dict(rows)
    fields = {f.name: f.default for f in dataclasses.fields(table) if f.name != "name"}
    assert list(documented) == list(fields)
    for key, default in fields.items():
        expected = "none" if default is None else f"`{_toml_value(key, default)}`"
        assert documented[key] == expected, key


@pytest.mark.parametrize(
    ("bwrap", "euid"), [("/usr/bin/bwrap", 0), (None, 0), ("/usr/bin/bwrap", 1000)]
)
def test_the_default_pools_are_valid_with_and_without_the_bubblewrap_tiers(
    monkeypatch: pytest.MonkeyPatch, bwrap: str | None, euid: int
) -> None:
    # make run on a fresh machine gets one of these shapes: each pool valid, and
    # together within the sandbox uids and the idle-memory budget (Config.validate).
    monkeypatch.setattr("pool.config.shutil.which", lambda name: bwrap)
    monkeypatch.setattr("pool.config.os.geteuid", lambda: euid)
    pools = default_pools()
    bubblewrap_tiers = {p.name for p in pools if p.backend in ("process", "fork")}
    assert bubblewrap_tiers == (
        {"python-process", "python-fork", "datasci-fork"} if bwrap and euid == 0 else set()
    )
    for pool in pools:
        pool.validate()
    config = Config(pools=pools)
    config.server.validate()
    config.validate()


def test_preload_is_a_list_of_module_names_for_python_pools() -> None:
    config = parse_config({"pools": {"p": {"preload": ["pandas", "matplotlib.pyplot"]}}})
    assert config.pools[0].preload == ("pandas", "matplotlib.pyplot")
    assert parse_config(tomllib.loads(to_toml(config))).pools[0].preload == config.pools[0].preload
    for bad, message in (
        (["os; import x"], "pools.p.preload: 'os; import x' is not a module name"),
        ("pandas", "pools.p.preload must be a list of strings"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config({"pools": {"p": {"preload": bad}}})
        assert caught.value.message == message
    with pytest.raises(ConfigError, match="applies to python pools only"):
        parse_config({"pools": {"p": {"language": "shell", "preload": ["json"]}}})
