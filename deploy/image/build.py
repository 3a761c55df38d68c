"""Build ``sandpool/daemon:bookworm``: the daemon's own image, for a pod or ``docker run``.

Two steps, each skipped when its image carries the label it would write:

1. ``sandpool/daemon-base:bookworm``: the sandbox images' recipe
   (``pool.image.build_image``: debootstrap minbase + python3, apt-get, strip,
   byte-compile, smoke test, ``docker import``) with the packages the daemon
   needs beside python3: bubblewrap, python3-venv, tini.
2. ``sandpool/daemon:bookworm``: ``deploy/image/Dockerfile`` on top of it with the
   classic builder (every ``FROM`` is local: no registry). It adds a venv of
   sandpool and its dependencies, installed from wheels built here with pip
   from this checkout and pinned by constraints.txt, and the process tier's
   root file system, exported from the sandbox image with the process tier's
   own ``export_rootfs``. Its label is a digest of everything that goes in
   (the sources, the pins, the base and sandbox image ids, this recipe), so a
   change to any of them rebuilds it, and nothing else does.

``python -m deploy.image.build [--force]`` (``make daemon-image``). Needs root
(debootstrap), the Docker engine, the sandbox image ``sandpool/python:bookworm``
(``make setup``) and, the first time, PyPI and a Debian mirror.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from pool.config import DEFAULT_IMAGE
from pool.errors import ImageBuildError
from pool.image import Profile, Recipe, build_image, export_rootfs
from pool.image.docker_cli import (
    DOCKER_IMPORT_TIMEOUT_S,
    inspect_image,
    remove_stage_images,
    retire_previous,
    short_id,
)
from pool.image.processes import run, run_logged
from pool.image.progress import Clock, Progress

REPOSITORY = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

DAEMON_IMAGE = "sandpool/daemon:bookworm"
DAEMON_BASE_IMAGE = "sandpool/daemon-base:bookworm"
# Bump when the Dockerfile's or this module's idea of the image changes in a way
# the digest below would not see.
DAEMON_RECIPE_REVISION = "1"
DAEMON_RECIPE_LABEL = "sandpool.daemon.recipe"
# On the Dockerfile's venv stage, so the build can remove that stage's image.
DAEMON_STAGE_LABEL = "sandpool.daemon.stage"
# The sandbox images whose root file systems the image carries: the process
# (and fork) pools of the image's config run from them.
CARRIED_IMAGES = (DEFAULT_IMAGE,)

BASE_PROFILE = Profile(
    name="daemon-base",
    tag=DAEMON_BASE_IMAGE,
    language="python",
    # bubblewrap: the process tier; python3-venv: the daemon's venv; tini: PID 1.
    # setpriv (util-linux) and libseccomp2 are in minbase already.
    packages=("bubblewrap", "python3-venv", "tini", "libseccomp2"),
    revision="1",
)
BASE_RECIPE = Recipe(profile=BASE_PROFILE)

# What the daemon's venv is built from; the digest covers each of them.
SOURCE_TREES = ("pool", "api", "metrics", "clients/python/src")
SOURCE_FILES = ("pyproject.toml", "clients/python/pyproject.toml", "constraints.txt")
CONTEXT_FILES = ("Dockerfile", "docker-offline", "sandpool-probe", "sandpool.toml")
# Files the daemon reads at run time, copied in explicitly: the wheel carries
# them too since pyproject.toml's package-data lists pool/*.js, but an image
# built from an older checkout's wheel must not lose them.
PACKAGE_DATA = ("pool/node_runner.js",)
# Persistent between builds (git-ignored): the dependency wheels, per pin set,
# and the exported root file systems, so a rebuild after a source change costs
# the sandpool wheels and the final layers only.
WORK_DIR = REPOSITORY / ".state" / "daemon-image"
PIP_TIMEOUT_S = 1800.0


def source_paths() -> list[Path]:
    """Every file whose content decides the image, in a stable order."""
    paths = [REPOSITORY / name for name in SOURCE_FILES]
    paths += [HERE / name for name in CONTEXT_FILES]
    paths.append(Path(__file__).resolve())
    for tree in SOURCE_TREES:
        for path in sorted((REPOSITORY / tree).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(
                path
            ):
                paths.append(path)
    return paths


def recipe_digest(paths: Iterable[Path], image_ids: Iterable[str]) -> str:
    """The label value: the revision, then a digest of the files and image ids."""
    digest = hashlib.sha256(DAEMON_RECIPE_REVISION.encode())
    for path in paths:
        digest.update(str(path.relative_to(REPOSITORY)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    for image_id in image_ids:
        digest.update(image_id.encode() + b"\0")
    return f"{DAEMON_RECIPE_REVISION}-{digest.hexdigest()[:16]}"


async def image_ids(tags: Iterable[str]) -> list[str]:
    """The ids of ``tags``; raises ImageBuildError naming a missing one."""
    ids = []
    for tag in tags:
        inspected = await inspect_image(tag)
        if inspected is None:
            raise ImageBuildError(
                f"no image {tag}: build the sandbox images first (`make setup`)"
            )
        ids.append(str(inspected["Id"]))
    return ids


async def current_label() -> str | None:
    inspected = await inspect_image(DAEMON_IMAGE)
    if inspected is None:
        return None
    labels = (inspected.get("Config") or {}).get("Labels") or {}
    return labels.get(DAEMON_RECIPE_LABEL)


async def wanted_label() -> str:
    """The label the image would get now (cheap: hashes the sources, inspects images)."""
    ids = await image_ids([DAEMON_BASE_IMAGE, *CARRIED_IMAGES])
    return await asyncio.to_thread(recipe_digest, source_paths(), ids)


async def daemon_image_is_current() -> bool:
    """Whether ``sandpool/daemon:bookworm`` was built from this checkout as it is now."""
    if await inspect_image(DAEMON_BASE_IMAGE) is None:
        return False
    label = await current_label()
    return label is not None and label == await wanted_label()


async def build_daemon_image(*, force: bool, progress: Progress) -> bool:
    """Build the base and the daemon image unless current; True if the latter was built.

    Raises ImageBuildError with one readable line; nothing is tagged then.
    """
    await build_image(image_recipe=BASE_RECIPE, force=force, progress=progress)
    clock = Clock(progress)
    label = await wanted_label()
    previous = await inspect_image(DAEMON_IMAGE)
    previous_labels = ((previous or {}).get("Config") or {}).get("Labels") or {}
    if not force and previous_labels.get(DAEMON_RECIPE_LABEL) == label:
        clock.phase(f"{DAEMON_IMAGE} is up to date ({label}); nothing to do")
        return False
    context = WORK_DIR / "context"
    await asyncio.to_thread(_fresh_context, context)
    clock.phase("building the wheels of sandpool, sandpool-client and their dependencies")
    await _wheels(context / "wheels", clock)
    images: dict[str, object] = {}
    exports: list[Path] = []
    for tag in CARRIED_IMAGES:
        clock.phase(f"exporting {tag}'s root file system")
        exported = await export_rootfs(tag, WORK_DIR / "state")
        inspected = await inspect_image(tag)
        assert inspected is not None  # export_rootfs raised otherwise
        images[tag] = {
            "Id": inspected["Id"],
            "Size": inspected.get("Size", 0),
            "Config": {"Labels": (inspected.get("Config") or {}).get("Labels") or {}},
        }
        exports.append(exported)
    await asyncio.to_thread(
        (context / "images.json").write_text, json.dumps(images, indent=1, sort_keys=True)
    )
    archived = await run(
        ["tar", "-C", str(WORK_DIR / "state"), "--numeric-owner", "-cf",
         str(context / "state.tar"), *[f"rootfs/{e.name}" for e in exports]],
        timeout_s=DOCKER_IMPORT_TIMEOUT_S, what="tar of the exports",
    )  # fmt: skip
    if archived.returncode != 0:
        raise ImageBuildError(f"tar of the exports failed: {archived.last_error_line}")
    clock.phase(f"docker build {DAEMON_IMAGE} (label {label})")
    try:
        built = await run_logged(
            ["docker", "build", "--force-rm", "--label", f"{DAEMON_RECIPE_LABEL}={label}",
             "--build-arg", f"BASE={DAEMON_BASE_IMAGE}", "--tag", DAEMON_IMAGE, str(context)],
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
            timeout_s=DOCKER_IMPORT_TIMEOUT_S,
            report=clock.phase,
        )  # fmt: skip
    finally:
        # The venv stage's image, 275 MB that nothing uses once the build is over.
        await asyncio.shield(remove_stage_images(DAEMON_STAGE_LABEL, clock))
    if built.returncode != 0:
        raise ImageBuildError(f"docker build of {DAEMON_IMAGE} failed: {built.stdout[-2000:]}")
    now = await inspect_image(DAEMON_IMAGE)
    assert now is not None
    clock.phase(f"tagged {DAEMON_IMAGE} ({short_id(str(now['Id']))}, "
                f"{float(now.get('Size', 0)) / 1e6:.0f} MB)")
    if previous is not None and previous.get("Id") != now.get("Id"):
        await retire_previous(str(previous["Id"]), DAEMON_IMAGE, clock)
    await asyncio.to_thread(shutil.rmtree, context, True)
    return True


def _fresh_context(context: Path) -> None:
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for name in CONTEXT_FILES:
        shutil.copy2(HERE / name, context / name)
    for name in PACKAGE_DATA:
        target = context / "package-data" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / name, target)


async def _wheels(wheels: Path, clock: Clock) -> None:
    """sandpool's and sandpool-client's wheels from this checkout, and their
    dependencies' (pinned by constraints.txt) from a wheelhouse kept per pin set."""
    pins = (REPOSITORY / "constraints.txt").read_bytes()
    house = WORK_DIR / f"wheelhouse-{hashlib.sha256(pins).hexdigest()[:12]}"
    await asyncio.to_thread(house.mkdir, parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Only the checkout's two distributions are built every time, without
    # their dependencies; the rest comes from the wheelhouse once it is full.
    ours = await run_logged(
        [*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels),
         str(REPOSITORY), str(REPOSITORY / "clients/python")],
        env=dict(os.environ), timeout_s=PIP_TIMEOUT_S, report=clock.phase,
    )  # fmt: skip
    if ours.returncode != 0:
        raise ImageBuildError(f"pip wheel of this checkout failed: {ours.stdout[-1000:]}")
    built = await asyncio.to_thread(lambda: sorted(str(w) for w in wheels.glob("*.whl")))
    deps = await run_logged(
        [*pip, "wheel", "--wheel-dir", str(house), "--find-links", str(house),
         "--find-links", str(wheels), "--constraint", str(REPOSITORY / "constraints.txt"),
         "--only-binary", "wasmtime", *built],
        env=dict(os.environ), timeout_s=PIP_TIMEOUT_S, report=clock.phase,
    )  # fmt: skip
    if deps.returncode != 0:
        raise ImageBuildError(f"pip wheel of the dependencies failed: {deps.stdout[-1000:]}")
    for wheel in house.glob("*.whl"):
        if not wheel.name.startswith(("sandpool-", "sandpool_client-")):
            shutil.copy2(wheel, wheels / wheel.name)
    for stale in [*house.glob("sandpool-*.whl"), *house.glob("sandpool_client-*.whl")]:
        stale.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.image.build",
        description=f"Build {DAEMON_IMAGE} (skipped when current).",
    )
    parser.add_argument("--force", action="store_true", help="rebuild both images")
    parser.add_argument("--check", action="store_true",
                        help="only say whether the image is current (exit 0) or not (exit 1)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            current = asyncio.run(daemon_image_is_current())
            print(f"{DAEMON_IMAGE}: {'current' if current else 'not current'}")
            return 0 if current else 1
        asyncio.run(build_daemon_image(force=args.force, progress=print))
    except ImageBuildError as e:
        print(f"sandpool: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sandpool: daemon image build interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
