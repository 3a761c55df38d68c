"""The sandbox image: what the pool relies on, and how a failed or interrupted build ends.

The image tests build ``sandpool/python:bookworm`` when it is missing (about a
minute with debootstrap); under ``make test`` it is already built and they take
seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from pool.image import (
    BUILD_DIR_PREFIX,
    DEFAULT_TAG,
    RECIPE_LABEL,
    RECIPE_VERSION,
    build_image,
    host_debian_mirror,
    image_is_current,
    recipe,
)
from pool.image.debootstrap import debootstrap_failure

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
async def test_tag(unique: str):
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
