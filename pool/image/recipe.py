"""What goes into the sandbox image, and how an image shows the recipe that made it.

Pure data and one pure check; nothing here runs a process. Both ways of building
(debootstrap and ``--from IMAGE``) end in ``docker import`` with ``IMPORT_CHANGES``,
so every image carries the same user, working directory, environment and the
``RECIPE_LABEL`` that ``is_current`` compares with ``RECIPE_VERSION``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# Bump whenever the recipe changes what ends up in the image: is_current() compares
# it with the image's label, so every host rebuilds on its next `make`.
RECIPE_VERSION = "2"
RECIPE_LABEL = "sandpool.recipe"
SOURCE_LABEL = "sandpool.source"

DEFAULT_TAG = "sandpool/python:bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"

SANDBOX_DIR = "/sandbox"
SANDBOX_USER = "65534:65534"
# What the pool relies on the image's python3 to import; checked before tagging.
PYTHON_CHECK = "import json, asyncio, sqlite3"

IMPORT_CHANGES = (
    f"WORKDIR {SANDBOX_DIR}",
    "ENV PYTHONDONTWRITEBYTECODE=1",
    "ENV LANG=C.UTF-8",
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    f"USER {SANDBOX_USER}",
    f"LABEL {RECIPE_LABEL}={RECIPE_VERSION}",
)

# Directories whose contents a sandbox never needs; the directories themselves stay.
STRIPPED_DIRS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/lib/apt/lists",
    "var/cache/apt",
)
KEPT_LOCALES = frozenset({"C.utf8", "C.UTF-8"})


def import_changes(source: str) -> list[str]:
    """The ``docker import --change`` instructions for an image built from ``source``
    (``debootstrap:<suite>`` or the base image's name), recorded in ``SOURCE_LABEL``."""
    return [*IMPORT_CHANGES, f"LABEL {SOURCE_LABEL}={json.dumps(source)}"]


def is_current(image: Mapping[str, Any] | None) -> bool:
    """Whether ``image`` (one ``docker image inspect`` entry, None when there is no
    such image) was built with this recipe."""
    if image is None:
        return False
    labels = (image.get("Config") or {}).get("Labels") or {}
    return bool(labels.get(RECIPE_LABEL) == RECIPE_VERSION)
