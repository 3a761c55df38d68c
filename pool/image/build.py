"""Build a sandbox image and tag it, or tell that it is already current.

The image is imported untagged, smoke-tested (``--network none``, read-only root,
user 65534) and only then tagged, so a failed or interrupted build never leaves a
half-built image under the tag. An image the tag named before is removed unless
something still uses it.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from pool.errors import ImageBuildError
from pool.image import recipe
from pool.image.debootstrap import import_from_debootstrap
from pool.image.docker_cli import (
    docker,
    image_size_mb,
    inspect_image,
    remove_image,
    retire_previous,
    short_id,
    smoke_test,
)
from pool.image.from_base import import_from_base
from pool.image.progress import Clock, Progress
from pool.image.recipe import Recipe


async def image_is_current(tag: str, image_recipe: Recipe | None = None) -> bool:
    """Tell whether ``tag`` exists and was built with ``image_recipe`` (default: the
    python profile) as this package defines it.

    Costs one ``docker image inspect``. Raises ``ImageBuildError`` when the docker
    CLI is missing or the engine does not answer.
    """
    return recipe.is_current(await inspect_image(tag), image_recipe)


async def runtime_info(image: str) -> dict[str, Any]:
    """What ``image``'s runtime label records: ``{"profile", "language", "version",
    "interpreters": {"python3": ..., "node": ...}, "packages": {name: version}}``;
    ``{}`` when the image has no such label (built before it existed, or elsewhere)
    or does not exist.

    Costs one ``docker image inspect`` (a subprocess with a timeout, never blocking
    the loop). Raises ``ImageBuildError`` when the engine does not answer.
    """
    return recipe.parse_runtime(await inspect_image(image))


async def build_image(
    *,
    tag: str | None = None,
    image_recipe: Recipe | None = None,
    mirror: str | None = None,
    base: str | None = None,
    force: bool = False,
    progress: Progress,
) -> bool:
    """Build the sandbox image of ``image_recipe`` (default: the python profile) and
    tag it ``tag`` (default: the profile's tag).

    Returns False without building when ``tag`` already carries the recipe's label
    and ``force`` is False; True after a build. ``mirror`` overrides the Debian
    mirror taken from the host's apt sources; ``base`` builds from an existing image
    with python3 instead of debootstrap (the python profile only, without
    additions). ``progress`` receives one line per phase and one every few seconds
    during long phases.

    Raises ``ImageBuildError`` with one readable line on any failure; nothing is
    tagged then, and the temporary root file system is removed. Costs about a
    minute or two and ~150 MB of temporary disk with debootstrap for the python
    profile, several minutes and ~1.5 GB for datasci (installing debootstrap with
    apt-get first when it is missing and we are root).
    """
    image_recipe = image_recipe or Recipe()
    tag = tag or image_recipe.profile.tag
    if base is not None and image_recipe != Recipe():
        raise ImageBuildError(
            "--from flattens an image as it is: it takes no --profile, --packages or "
            "--pip-requirements (use a Dockerfile FROM the image instead; see docs/images.md)"
        )
    clock = Clock(progress)
    if not force and await image_is_current(tag, image_recipe):
        clock.phase(f"{tag} is up to date (recipe {image_recipe.version}); nothing to do")
        return False
    previous = await inspect_image(tag)
    if base is not None:
        image_id = await import_from_base(base, clock)
    else:
        image_id = await import_from_debootstrap(mirror, clock, image_recipe)
    try:
        clock.phase(f"smoke-testing {short_id(image_id)}")
        await smoke_test(image_id, image_recipe.profile)
        await docker(["tag", image_id, tag], what="docker tag")
    except BaseException:
        await asyncio.shield(remove_image(image_id))
        raise
    size_mb = await image_size_mb(image_id)
    clock.phase(f"tagged {tag} ({short_id(image_id)}, {size_mb:.0f} MB)")
    if previous is not None and previous.get("Id") != image_id:
        await retire_previous(str(previous["Id"]), tag, clock)
    return True


async def build_image_interruptibly(
    *, tag: str | None, image_recipe: Recipe, mirror: str | None, base: str | None,
    force: bool, progress: Progress,
) -> bool:
    """build_image for a command line: SIGTERM (a killed `make`) cancels like Ctrl-C.

    The cancellation runs the finally blocks that remove the temporary root
    file system; the caller reports it.
    """
    build = asyncio.current_task()
    assert build is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, build.cancel)
    try:
        return await build_image(tag=tag, image_recipe=image_recipe, mirror=mirror, base=base,
                                 force=force, progress=progress)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
