"""Build the sandbox image: a minimal Debian bookworm root file system with python3.

The default recipe (``debootstrap``) needs no registry, only a Debian mirror;
``--from IMAGE`` (``from_base``) flattens an existing image with python3 instead.
Both import untagged, and ``build`` smoke-tests the result before it tags it, so a
failed or interrupted build never leaves a half-built image under the tag.

Modules, one concern each: ``recipe`` (what goes into the image, and the label
that says which recipe made it), ``apt_sources`` (the host's Debian mirror),
``debootstrap`` and ``from_base`` (the two recipes), ``docker_cli`` (the steps
through the docker command), ``processes`` (running commands with timeouts and
clean cancellation), ``files`` (the temporary root file system), ``build`` (the
entry point). ``python -m pool.image build --help`` is ``sandpool image build``.
"""

from pool.image.apt_sources import host_debian_mirror
from pool.image.build import (
    build_image,
    build_image_interruptibly,
    image_is_current,
    runtime_info,
)
from pool.image.files import BUILD_DIR_PREFIX, BUILD_LOG
from pool.image.recipe import (
    DEFAULT_MIRROR,
    DEFAULT_TAG,
    MATPLOTLIB_CACHE_DIR,
    PROFILES,
    RECIPE_LABEL,
    RECIPE_VERSION,
    RUNTIME_LABEL,
    SOURCE_LABEL,
    Profile,
    Recipe,
    parse_runtime,
    profile_named,
)
from pool.image.rootfs import export_rootfs

__all__ = [
    "BUILD_DIR_PREFIX",
    "BUILD_LOG",
    "DEFAULT_MIRROR",
    "DEFAULT_TAG",
    "MATPLOTLIB_CACHE_DIR",
    "PROFILES",
    "RECIPE_LABEL",
    "RECIPE_VERSION",
    "RUNTIME_LABEL",
    "SOURCE_LABEL",
    "Profile",
    "Recipe",
    "build_image",
    "build_image_interruptibly",
    "export_rootfs",
    "host_debian_mirror",
    "image_is_current",
    "parse_runtime",
    "profile_named",
    "runtime_info",
]
