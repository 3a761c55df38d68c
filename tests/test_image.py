"""The sandbox images: what the pool relies on, how a failed or interrupted build ends,
the profiles' recipes and runtime labels, and the root file system export.

The image tests build ``sandpool/python:bookworm`` (and the datasci and node
images for their own tests) when missing (a minute to several with debootstrap);
under ``make test`` they are already built and the tests take seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import stat
import sys
import tarfile
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pool.errors import ImageBuildError
from pool.image import (
    BUILD_DIR_PREFIX,
    DEFAULT_TAG,
    MATPLOTLIB_CACHE_DIR,
    PROFILES,
    RECIPE_LABEL,
    RECIPE_VERSION,
    RUNTIME_LABEL,
    Recipe,
    build_image,
    export_rootfs,
    host_debian_mirror,
    image_is_current,
    parse_runtime,
    processes,
    recipe,
    runtime_info,
)
from pool.image.debootstrap import debootstrap_failure
from pool.image.docker_cli import remove_stage_images
from pool.image.files import strip_rootfs
from pool.image.progress import Clock

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_TIMEOUT_S = 60.0
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap runs only as root")


async def run(*argv: str, timeout_s: float = DOCKER_TIMEOUT_S) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def image_exists(tag: str) -> bool:
    code, _, _ = await run("docker", "image", "inspect", tag)
    return code == 0


def build_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith(BUILD_DIR_PREFIX)}


def mounts_of_build_dirs() -> list[str]:
    mountinfo = Path("/proc/self/mountinfo").read_text()
    return [line for line in mountinfo.splitlines() if BUILD_DIR_PREFIX in line]


def the_one_error_line(stderr: str) -> str:
    """What `sandpool image build` promises on failure: progress lines, then exactly
    one `sandpool: ...` line, last, and no traceback."""
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("sandpool:")]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
async def sandbox_image() -> str:
    """The default image, built when missing (a no-op under `make test`)."""
    await build_image(tag=DEFAULT_TAG, progress=lambda line: print(line, file=sys.stderr))
    return DEFAULT_TAG


@pytest.fixture
async def test_tag(unique: str) -> AsyncIterator[str]:
    """A unique tag for an image a test builds; the image is removed afterwards."""
    tag = f"sandpool-test/{unique}:latest"
    try:
        yield tag
    finally:
        await run("docker", "image", "rm", "--force", tag)


async def run_sandbox(image_tag: str, unique: str, script: str) -> tuple[int, str, str]:
    """Run ``python3 -c script`` as the pool runs sandboxes: no network, read-only root.
    The container is removed even when the run fails or times out."""
    label = f"sandpool.test={unique}"
    name = f"sandpool-test-{unique}"
    try:
        result = await run(
            "docker", "run", "--name", name, "--label", label,
            "--network", "none", "--read-only",
            image_tag, "python3", "-c", script,
        )  # fmt: skip
    finally:
        await run("docker", "rm", "--force", name)
    _, left, _ = await run("docker", "ps", "--all", "--quiet", "--filter", f"label={label}")
    assert left.strip() == "", f"containers left behind: {left}"
    return result


SANDBOX_SCRIPT = """
import json, asyncio, sqlite3, os
print("hi")
print(os.getuid(), os.getgid(), os.getcwd(), oct(os.stat("/sandbox").st_mode & 0o7777))
print(sorted(os.listdir("/sys/class/net")))
"""


@pytest.mark.docker
@pytest.mark.timeout(600)
async def test_sandbox_runs_python_offline_read_only_as_nobody(
    sandbox_image: str, unique: str
) -> None:
    code, stdout, stderr = await run_sandbox(sandbox_image, unique, SANDBOX_SCRIPT)

    assert code == 0, stderr
    assert stdout.splitlines() == ["hi", "65534 65534 /sandbox 0o1777", "['lo']"]


@pytest.mark.docker
@pytest.mark.timeout(600)
async def test_image_has_recipe_label_user_and_workdir(sandbox_image: str) -> None:
    code, stdout, stderr = await run("docker", "image", "inspect", sandbox_image)
    assert code == 0, stderr
    config = json.loads(stdout)[0]["Config"]

    assert config["Labels"][RECIPE_LABEL] == RECIPE_VERSION
    assert config["User"] == "65534:65534"
    assert config["WorkingDir"] == "/sandbox"
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]


@pytest.mark.docker
@pytest.mark.timeout(600)
async def test_current_image_is_not_rebuilt(sandbox_image: str) -> None:
    lines: list[str] = []

    async with asyncio.timeout(10):
        built = await build_image(tag=sandbox_image, progress=lines.append)

    assert built is False
    assert "nothing to do" in lines[-1]


@pytest.mark.docker
@pytest.mark.timeout(600)
async def test_changed_recipe_makes_the_image_stale(
    sandbox_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await image_is_current(sandbox_image)

    monkeypatch.setattr(recipe, "RECIPE_VERSION", f"{RECIPE_VERSION}-next")

    assert not await image_is_current(sandbox_image)


@pytest.mark.docker
async def test_missing_image_is_not_current(test_tag: str) -> None:
    assert not await image_is_current(test_tag)


@pytest.mark.docker
@pytest.mark.timeout(600)
async def test_from_base_flattens_an_image_into_a_sandbox_image(
    sandbox_image: str, test_tag: str, unique: str
) -> None:
    lines: list[str] = []

    built = await build_image(tag=test_tag, base=sandbox_image, progress=lines.append)

    assert built is True
    _, stdout, _ = await run("docker", "image", "inspect", test_tag)
    config = json.loads(stdout)[0]["Config"]
    assert config["Labels"][RECIPE_LABEL] == RECIPE_VERSION
    assert config["Labels"]["sandpool.source"] == sandbox_image
    assert (config["User"], config["WorkingDir"]) == ("65534:65534", "/sandbox")
    code, stdout, stderr = await run_sandbox(test_tag, unique, SANDBOX_SCRIPT)
    assert code == 0, stderr
    assert stdout.splitlines()[0] == "hi"


@pytest.mark.docker
async def test_unknown_base_image_ends_with_one_line_and_tags_nothing(test_tag: str) -> None:
    code, _, stderr = await run(
        sys.executable, "-m", "api.cli", "image", "build",
        "--from", "sandpool-no-such-image:nope", "--tag", test_tag,
    )  # fmt: skip

    assert code == 1
    error = the_one_error_line(stderr)
    assert error.startswith("sandpool: base image 'sandpool-no-such-image:nope' not found")
    assert not await image_exists(test_tag)


@pytest.mark.docker
@needs_root
async def test_unreachable_mirror_fails_fast_and_leaves_nothing(test_tag: str) -> None:
    dirs_before = build_dirs()

    code, _, stderr = await run(
        sys.executable, "-m", "api.cli", "image", "build",
        "--mirror", "http://127.0.0.1:9/debian", "--tag", test_tag,
        timeout_s=60,
    )  # fmt: skip

    assert code == 1
    error = the_one_error_line(stderr)
    assert error.startswith("sandpool: debootstrap failed: cannot reach mirror http://127.0.0.1:9")
    assert build_dirs() - dirs_before == set()
    assert not await image_exists(test_tag)


@pytest.mark.docker
@needs_root
async def test_interrupted_build_leaves_no_rootfs_mount_or_image(test_tag: str) -> None:
    dirs_before = build_dirs()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "image", "build", "--tag", test_tag,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(60):
            first_line = await proc.stderr.readline()
            assert first_line.startswith(b"debootstrap "), first_line
            # Long enough for debootstrap to have started downloading and to have
            # its children running; on a fast mirror it may have mounted /proc.
            await asyncio.sleep(3)
            proc.send_signal(signal.SIGTERM)
            rest = await proc.stderr.read()
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 130
    assert the_one_error_line(rest.decode()) == "sandpool: interrupted; nothing was tagged"
    assert build_dirs() - dirs_before == set()
    assert mounts_of_build_dirs() == []
    assert not await image_exists(test_tag)


def write_sources(tmp_path: Path, *, deb822: str = "", one_line: str = "") -> Path:
    sources_dir = tmp_path / "sources.list.d"
    sources_dir.mkdir()
    if deb822:
        (sources_dir / "debian.sources").write_text(deb822)
    (tmp_path / "sources.list").write_text(one_line)
    return sources_dir


def test_mirror_comes_from_the_debian_main_stanza_not_security_or_comments(
    tmp_path: Path,
) -> None:
    sources_dir = write_sources(
        tmp_path,
        deb822="""\
Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://security.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://ftp.de.debian.org/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
""",
    )

    mirror = host_debian_mirror(tmp_path / "sources.list", sources_dir)

    assert mirror == "http://ftp.de.debian.org/debian"


def test_disabled_stanza_is_skipped(tmp_path: Path) -> None:
    sources_dir = write_sources(
        tmp_path,
        deb822="""\
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb-src deb
URIs: https://mirror.example/debian
Suites: trixie
Components: main contrib
""",
    )

    assert host_debian_mirror(tmp_path / "sources.list", sources_dir) == (
        "https://mirror.example/debian"
    )


def test_one_line_sources_with_options_are_read(tmp_path: Path) -> None:
    sources_dir = write_sources(
        tmp_path,
        one_line="""\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm main
""",  # noqa: E501
    )

    assert host_debian_mirror(tmp_path / "sources.list", sources_dir) == (
        "http://mirror.example/debian"
    )


def test_ubuntu_host_has_no_debian_mirror(tmp_path: Path) -> None:
    sources_dir = write_sources(
        tmp_path,
        deb822="""\
Types: deb
URIs: http://archive.ubuntu.com/ubuntu/
Suites: noble noble-updates
Components: main restricted universe
""",
        one_line="deb http://archive.ubuntu.com/ubuntu jammy main\n",
    )

    assert host_debian_mirror(tmp_path / "sources.list", sources_dir) is None


def test_recipe_is_current_only_with_this_recipes_label() -> None:
    def inspected(labels: dict[str, str] | None) -> dict[str, object]:
        return {"Id": "sha256:0", "Config": {"Labels": labels}}

    assert recipe.is_current(inspected({RECIPE_LABEL: RECIPE_VERSION}))
    assert not recipe.is_current(inspected({RECIPE_LABEL: f"{RECIPE_VERSION}-old"}))
    assert not recipe.is_current(inspected(None))
    assert not recipe.is_current({"Id": "sha256:0", "Config": None})
    assert not recipe.is_current(None)


def test_debootstrap_failures_read_as_one_reason() -> None:
    mirror = "http://mirror.example/debian"

    unreachable = "I: Retrieving InRelease\nE: Failed getting release file http://..."
    assert debootstrap_failure(unreachable, 1, mirror) == f"cannot reach mirror {mirror}"
    unsigned = "E: Release signed by unknown key (key id 6ED0E7B82643E131)"
    assert debootstrap_failure(unsigned, 1, mirror).startswith("cannot verify the bookworm")
    other = "E: first problem\nI: more\nE: Couldn't find   these debs:\n python3"
    assert debootstrap_failure(other, 1, mirror) == "Couldn't find these debs:"
    assert debootstrap_failure("I: nothing useful\n", 2, mirror) == "exit status 2"


def inspected_with(labels: dict[str, str]) -> dict[str, object]:
    return {"Id": "sha256:0", "Config": {"Labels": labels}}


def test_each_profile_has_its_own_recipe_version_and_additions_change_it() -> None:
    python, datasci, node = (Recipe(PROFILES[name]) for name in ("python", "datasci", "node"))

    assert python.version == RECIPE_VERSION
    assert len({python.version, datasci.version, node.version}) == 3
    with_packages = Recipe(PROFILES["datasci"], extra_packages=("python3-nltk",))
    with_pip = Recipe(PROFILES["datasci"], pip_requirements="polars==1.0\n")
    versions = {datasci.version, with_packages.version, with_pip.version}
    assert len(versions) == 3
    assert all(version.startswith(datasci.version) for version in versions)
    # The digest is of the set of packages, not of the order they were typed in.
    assert Recipe(extra_packages=("b", "a")).version == Recipe(extra_packages=("a", "b")).version


def test_an_image_is_current_only_for_the_recipe_that_built_it() -> None:
    datasci = Recipe(PROFILES["datasci"])
    more = Recipe(PROFILES["datasci"], extra_packages=("python3-nltk",))

    assert recipe.is_current(inspected_with({RECIPE_LABEL: datasci.version}), datasci)
    assert not recipe.is_current(inspected_with({RECIPE_LABEL: datasci.version}), more)
    assert not recipe.is_current(inspected_with({RECIPE_LABEL: RECIPE_VERSION}), datasci)
    assert not recipe.is_current(inspected_with({RECIPE_LABEL: datasci.version}))


def test_recipe_packages_keep_order_drop_duplicates_and_bring_pip_for_requirements() -> None:
    node = Recipe(PROFILES["node"], extra_packages=("nodejs", "git"))
    assert node.packages == ("nodejs", "git")
    assert Recipe().packages == ()
    assert Recipe(pip_requirements="x==1\n").packages == ("python3-pip",)


def test_datasci_profile_asks_for_the_analysis_stack_and_the_agg_backend() -> None:
    datasci = PROFILES["datasci"]

    for package in ("python3-numpy", "python3-pandas", "python3-matplotlib", "python3-scipy"):
        assert package in datasci.packages
    assert datasci.has_matplotlib
    assert "MPLBACKEND=Agg" in datasci.env
    assert "ENV MPLBACKEND=Agg" in recipe.import_changes("debootstrap:bookworm", Recipe(datasci))
    assert not PROFILES["python"].has_matplotlib


def test_runtime_label_names_the_pool_languages_interpreter_version() -> None:
    interpreters = {"python3": "3.11.2", "node": "18.19.0"}

    node = recipe.runtime_label(PROFILES["node"], interpreters, {})
    python = recipe.runtime_label(PROFILES["datasci"], interpreters, {"numpy": "1.24.2"})

    assert (node["language"], node["version"]) == ("javascript", "18.19.0")
    assert (python["language"], python["version"]) == ("python", "3.11.2")
    assert python["packages"] == {"numpy": "1.24.2"}


def test_parse_runtime_reads_the_label_and_shrugs_at_anything_else() -> None:
    runtime = {"language": "python", "version": "3.11.2", "packages": {"numpy": "1.24.2"}}

    assert parse_runtime(inspected_with({RUNTIME_LABEL: json.dumps(runtime)})) == runtime
    assert parse_runtime(inspected_with({RUNTIME_LABEL: "not json"})) == {}
    assert parse_runtime(inspected_with({RUNTIME_LABEL: "[1, 2]"})) == {}
    assert parse_runtime(inspected_with({})) == {}
    assert parse_runtime({"Id": "sha256:0", "Config": None}) == {}
    assert parse_runtime(None) == {}


def tiny_rootfs_tar(marker: str) -> bytes:
    """A root file system of three entries, enough for docker import/create/export."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in ("etc", "sandbox"):
            directory = tarfile.TarInfo(name)
            directory.type, directory.mode = tarfile.DIRTYPE, 0o1777 if name == "sandbox" else 0o755
            archive.addfile(directory)
        data = marker.encode()
        entry = tarfile.TarInfo("etc/marker")
        entry.size, entry.mode = len(data), 0o664
        archive.addfile(entry, io.BytesIO(data))
        link = tarfile.TarInfo("etc/link")
        link.type, link.linkname = tarfile.SYMTYPE, "marker"
        archive.addfile(link)
    return buffer.getvalue()


async def docker_import(tar: bytes, changes: list[str], tag: str) -> str:
    argv = ["docker", "import"]
    for change in changes:
        argv += ["--change", change]
    proc = await asyncio.create_subprocess_exec(
        *argv, "-", tag,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(DOCKER_TIMEOUT_S):
        stdout, stderr = await proc.communicate(tar)
    assert proc.returncode == 0, stderr.decode()
    return stdout.decode().strip().removeprefix("sha256:")


@pytest.fixture
async def tiny_images(unique: str) -> AsyncIterator[list[str]]:
    """Make tiny images tagged sandpool-test/<unique>-N:latest; removed afterwards."""
    tags: list[str] = []
    try:
        yield tags
    finally:
        for tag in tags:
            await run("docker", "image", "rm", "--force", tag)


async def tiny_image(tags: list[str], unique: str, changes: list[str] | None = None) -> str:
    tag = f"sandpool-test/{unique}-{len(tags)}:latest"
    tags.append(tag)
    await docker_import(tiny_rootfs_tar(tag), changes or [], tag)
    return tag


async def image_id(tag: str) -> str:
    _, stdout, _ = await run("docker", "image", "inspect", "--format", "{{.Id}}", tag)
    return stdout.strip().removeprefix("sha256:")


async def export_containers() -> str:
    _, names, _ = await run(
        "docker", "ps", "--all", "--format", "{{.Names}}", "--filter", "name=sandpool-export-"
    )
    return names.strip()


@pytest.mark.docker
async def test_runtime_label_written_at_import_reads_back_through_docker(
    tiny_images: list[str], unique: str
) -> None:
    runtime = recipe.runtime_label(
        PROFILES["datasci"], {"python3": "3.11.2"}, {"numpy": "1.24.2", "odd \"name\"": "1 2"}
    )
    changes = recipe.import_changes("debootstrap:bookworm", Recipe(PROFILES["datasci"]), runtime)

    tag = await tiny_image(tiny_images, unique, changes)

    assert await runtime_info(tag) == runtime
    assert await runtime_info(f"sandpool-no-such-image-{unique}:nope") == {}


@pytest.mark.docker
async def test_export_is_read_only_named_by_image_id_and_reused(
    tiny_images: list[str], unique: str, tmp_path: Path
) -> None:
    tag = await tiny_image(tiny_images, unique)

    exported = await export_rootfs(tag, tmp_path)

    assert exported == tmp_path / "rootfs" / await image_id(tag)
    assert (exported / "etc/marker").read_text() == tag
    assert os.readlink(exported / "etc/link") == "marker"
    assert not (exported / ".dockerenv").exists()
    shared_writable = [
        path for path in [exported, *exported.rglob("*")]
        if not path.is_symlink() and path.lstat().st_mode & 0o022
    ]  # fmt: skip
    assert shared_writable == []
    # The owner's bits stay as the image has them, so a copy is as writable in
    # both tiers; the world-writable directories are not.
    assert stat.S_IMODE((exported / "etc/marker").stat().st_mode) == 0o644
    assert stat.S_IMODE((exported / "sandbox").stat().st_mode) == 0o1755
    assert sorted(p.name for p in exported.parent.iterdir()) == [exported.name]
    assert await export_containers() == ""
    # Reused as it is: a second export neither rewrites nor duplicates it.
    before = (exported / "etc/marker").stat().st_ino
    assert await export_rootfs(tag, tmp_path) == exported
    assert (exported / "etc/marker").stat().st_ino == before


@pytest.mark.docker
async def test_export_sweeps_exports_of_gone_images_and_dead_exporters_stagings(
    tiny_images: list[str], unique: str, tmp_path: Path
) -> None:
    kept_tag = await tiny_image(tiny_images, unique)
    kept = await export_rootfs(kept_tag, tmp_path)
    gone_tag = await tiny_image(tiny_images, unique)
    gone = await export_rootfs(gone_tag, tmp_path)
    # The staging of an exporter that is gone, and of one still at work (this process).
    staging = tmp_path / "rootfs" / f".staging-0123456789ab-{2**22 + 1}-feedfacecafe"
    staging.mkdir()
    (staging / "half").write_text("an interrupted export")
    in_progress = tmp_path / "rootfs" / f".staging-0123456789ab-{os.getpid()}-feedfacecafe"
    in_progress.mkdir()
    await run("docker", "image", "rm", "--force", gone_tag)
    current_tag = await tiny_image(tiny_images, unique)

    current = await export_rootfs(current_tag, tmp_path)

    left = sorted(p.name for p in (tmp_path / "rootfs").iterdir())
    assert left == sorted([kept.name, current.name, in_progress.name])
    assert not gone.exists()
    assert not staging.exists()


@pytest.mark.docker
async def test_exporting_a_missing_image_says_so(unique: str, tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match=r"no image .* to export"):
        await export_rootfs(f"sandpool-no-such-image-{unique}:nope", tmp_path)

    assert not (tmp_path / "rootfs").exists() or list((tmp_path / "rootfs").iterdir()) == []


@pytest.mark.docker
async def test_image_export_command_prints_the_exported_path(
    tiny_images: list[str], unique: str, tmp_path: Path
) -> None:
    tag = await tiny_image(tiny_images, unique)

    code, stdout, stderr = await run(
        sys.executable, "-m", "api.cli", "image", "export", tag, "--state-dir", str(tmp_path)
    )

    assert code == 0, stderr
    assert stdout.strip() == str(tmp_path / "rootfs" / await image_id(tag))


async def test_a_stage_image_prune_that_cannot_run_only_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a build's finally: raising there would hide the build's own error.
    monkeypatch.setattr(processes, "TOOL_PATH", str(tmp_path))  # no docker on it
    said: list[str] = []
    await remove_stage_images("sandpool.test.stage", Clock(said.append))
    assert len(said) == 1
    assert said[0].startswith("kept the build's stage images (sandpool.test.stage): ")


async def test_from_base_refuses_a_profile_with_one_line() -> None:
    code, _, stderr = await run(
        sys.executable, "-m", "api.cli", "image", "build",
        "--from", "python:3.12-slim", "--profile", "datasci",
    )  # fmt: skip

    assert code == 1
    assert the_one_error_line(stderr).startswith("sandpool: --from flattens an image as it is")


@pytest.fixture
async def datasci_image() -> str:
    """The datasci image, built when missing (several minutes; a no-op after `make setup`)."""
    image_recipe = Recipe(PROFILES["datasci"])
    await build_image(image_recipe=image_recipe, progress=lambda line: print(line, file=sys.stderr))
    return image_recipe.profile.tag


@pytest.fixture
async def node_image() -> str:
    """The node image, built when missing (a no-op after `make setup`)."""
    image_recipe = Recipe(PROFILES["node"])
    await build_image(image_recipe=image_recipe, progress=lambda line: print(line, file=sys.stderr))
    return image_recipe.profile.tag


DATASCI_SCRIPT = f"""
import os, shutil, time
shutil.copytree({MATPLOTLIB_CACHE_DIR!r}, "/tmp/mpl")
os.environ["MPLCONFIGDIR"] = "/tmp/mpl"
import pandas as pd, matplotlib, matplotlib.pyplot as plt
frame = pd.DataFrame({{"k": ["a", "b", "a"], "v": [1, 2, 3]}})
print(frame.groupby("k").v.sum().to_dict(), matplotlib.get_backend())
plt.plot([1, 2, 3]); plt.savefig("/tmp/chart.png")
print(open("/tmp/chart.png", "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n")
built = {MATPLOTLIB_CACHE_DIR!r}
print(all(os.stat(f"/tmp/mpl/{{n}}").st_mtime == os.stat(f"{{built}}/{{n}}").st_mtime
          for n in os.listdir(built)), sorted(os.listdir("/tmp/mpl")) == sorted(os.listdir(built)))
"""


@pytest.mark.docker
@pytest.mark.timeout(1800)
async def test_datasci_image_analyses_and_draws_offline_from_the_built_font_cache(
    datasci_image: str, unique: str
) -> None:
    label = f"sandpool.test={unique}"
    name = f"sandpool-test-{unique}"
    try:
        code, stdout, stderr = await run(
            "docker", "run", "--name", name, "--label", label, "--network", "none",
            "--read-only", "--tmpfs", "/tmp", datasci_image, "python3", "-c", DATASCI_SCRIPT,
        )  # fmt: skip
    finally:
        await run("docker", "rm", "--force", name)

    assert code == 0, stderr
    # The last line: matplotlib used the copied cache as it is and wrote nothing beside it.
    assert stdout.splitlines() == ["{'a': 4, 'b': 2} agg", "True", "True True"]
    runtime = await runtime_info(datasci_image)
    assert (runtime["language"], runtime["profile"]) == ("python", "datasci")
    assert runtime["version"].startswith("3.11.")
    for distribution in ("numpy", "pandas", "matplotlib", "scipy", "scikit-learn"):
        assert runtime["packages"][distribution], distribution


@pytest.mark.docker
@pytest.mark.timeout(1200)
async def test_node_image_runs_node_and_python3(node_image: str, unique: str) -> None:
    for argv in (["node", "-e", "console.log(process.version)"],
                 ["python3", "-c", "print('py')"]):
        code, stdout, stderr = await run_sandbox_argv(node_image, unique, argv)
        assert code == 0, stderr
        runtime = await runtime_info(node_image)
        expected = "py" if argv[0] == "python3" else "v" + runtime["version"]
        assert stdout.strip() == expected

    assert runtime["language"] == "javascript"
    assert runtime["version"].startswith("18.")
    assert runtime["interpreters"]["python3"].startswith("3.11.")


async def run_sandbox_argv(image_tag: str, unique: str, argv: list[str]) -> tuple[int, str, str]:
    name = f"sandpool-test-{unique}-{uuid.uuid4().hex[:6]}"
    try:
        return await run(
            "docker", "run", "--name", name, "--network", "none", "--read-only",
            image_tag, *argv,
        )  # fmt: skip
    finally:
        await run("docker", "rm", "--force", name)


def test_strip_removes_package_test_suites_but_not_testing_modules(tmp_path: Path) -> None:
    packages = tmp_path / recipe.PACKAGE_TESTS_DIR
    for relative in ("pandas/tests/frame/test_x.py", "numpy/testing/__init__.py",
                     "scipy/stats/tests/test_y.py", "scipy/stats/_stats.py"):
        (packages / relative).parent.mkdir(parents=True, exist_ok=True)
        (packages / relative).write_text("")

    strip_rootfs(tmp_path)

    left = sorted(str(p.relative_to(packages)) for p in packages.rglob("*.py"))
    assert left == ["numpy/testing/__init__.py", "scipy/stats/_stats.py"]
    assert stat.S_IMODE((tmp_path / "sandbox").stat().st_mode) == 0o1777


def test_stand_in_is_an_empty_package_of_that_name_for_any_version() -> None:
    control = recipe.stand_in_control("python3-pythran")

    fields = dict(line.split(": ", 1) for line in control.splitlines() if not line.startswith(" "))
    assert fields["Package"] == "python3-pythran"
    assert fields["Architecture"] == "all"
    assert "Depends" not in fields
    assert control.endswith("\n")
    assert PROFILES["datasci"].stand_ins == ("python3-pythran",)
