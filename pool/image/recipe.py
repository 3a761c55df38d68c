"""What goes into a sandbox image, and how an image shows the recipe that made it.

Pure data and pure functions; nothing here runs a process. Both ways of building
(debootstrap and ``--from IMAGE``) end in ``docker import`` with ``import_changes``,
so every image carries the same user, working directory, environment and the
``RECIPE_LABEL`` that ``is_current`` compares with ``Recipe.version``.

A ``Profile`` is a named set of Debian packages on top of minbase + python3
(``python``, ``datasci``, ``node``); a ``Recipe`` is a profile plus what a user
adds (more Debian packages, a pip requirements file). An image's recipe label
names all of it, so an image built from other inputs is never taken as current.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pool.config import DATASCI_IMAGE, DEFAULT_IMAGE, NODE_IMAGE
from pool.wire import MATPLOTLIB_CACHE

# Bump whenever the common recipe changes what ends up in every image: is_current()
# compares it with the image's label, so every host rebuilds on its next `make`.
RECIPE_VERSION = "3"
RECIPE_LABEL = "sandpool.recipe"
SOURCE_LABEL = "sandpool.source"
# JSON: the language, interpreter versions and key packages (see runtime_label()).
RUNTIME_LABEL = "sandpool.runtime"

DEFAULT_TAG = DEFAULT_IMAGE
DEFAULT_PROFILE = "python"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"

SANDBOX_DIR = "/sandbox"
SANDBOX_USER = "65534:65534"
# matplotlib's font cache, built at image build time. Read-only in a sandbox:
# the runner copies it into a writable MPLCONFIGDIR before importing matplotlib,
# else the first import scans every font. The wire module names it for both sides.
MATPLOTLIB_CACHE_DIR = MATPLOTLIB_CACHE
# What the pool relies on the image's python3 to import; checked before tagging.
PYTHON_CHECK = "import json, asyncio, sqlite3"
# The datasci check renders a figure from a copy of the font cache and fails if
# matplotlib rewrote it, so a stale or missing cache cannot be tagged.
DATASCI_CHECK = f"""\
import os, shutil, tempfile
config = tempfile.mkdtemp()
shutil.copytree({MATPLOTLIB_CACHE!r}, config, dirs_exist_ok=True)
os.environ["MPLCONFIGDIR"] = config
def stamps(): return {{n: os.stat(f"{{config}}/{{n}}").st_mtime_ns for n in os.listdir(config)}}
copied = stamps()
import numpy, pandas, scipy, sklearn, statsmodels, seaborn, sympy, openpyxl, PIL, bs4, lxml
import scipy.optimize, scipy.stats, scipy.signal, scipy.interpolate, scipy.sparse.linalg
import sklearn.linear_model, sklearn.ensemble, statsmodels.api
import matplotlib.font_manager as fm
assert fm.fontManager.ttflist, "no fonts"
import matplotlib.pyplot as plt
plt.plot([1, 2]); plt.savefig(os.path.join(config, "check.png"))
assert any(name.startswith("fontlist") for name in copied), "no font cache"
assert stamps().items() >= copied.items(), "matplotlib rebuilt its font cache"
"""
NODE_CHECK = "process.stdout.write(String(1 + 1))"

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
# Package test suites: never imported by a program, a sixth of the datasci image.
PACKAGE_TESTS_DIR = "usr/lib/python3/dist-packages"
# Byte-compiled at build time besides the standard library (the root file system is
# read-only in a sandbox, so a missing .pyc is compiled again by every runner).
PACKAGE_DIRS = ("/usr/lib/python3/dist-packages", "/usr/local/lib/python3")


@dataclass(frozen=True, slots=True)
class Profile:
    """A named image: Debian packages on top of minbase + python3, and its checks.

    ``revision`` is this profile's own recipe version: bump it when its package
    list or checks change, so images of this profile (and only those) rebuild.
    ``key_distributions`` are the Python distributions whose versions the
    runtime label records. ``stand_ins`` are packages that a dependency names but
    nothing needs at run time: an empty package of that name is installed (and
    held) in their place, so apt neither pulls them nor their dependencies.
    """

    name: str
    tag: str
    language: str
    packages: tuple[str, ...] = ()
    revision: str = ""
    env: tuple[str, ...] = ()
    key_distributions: tuple[str, ...] = ()
    stand_ins: tuple[str, ...] = ()
    python_check: str = PYTHON_CHECK
    node_check: str | None = None

    @property
    def has_matplotlib(self) -> bool:
        return "python3-matplotlib" in self.packages


DATASCI_PACKAGES = (
    "python3-numpy",
    "python3-pandas",
    "python3-matplotlib",
    "python3-scipy",
    "python3-sklearn",
    "python3-statsmodels",
    "python3-seaborn",
    "python3-sympy",
    "python3-openpyxl",
    "python3-xlrd",
    "python3-tabulate",
    "python3-pil",
    "python3-bs4",
    "python3-lxml",
    "python3-requests",
    "python3-yaml",
    "python3-dateutil",
    "python3-tz",
)

DATASCI_DISTRIBUTIONS = (
    "numpy", "pandas", "matplotlib", "scipy", "scikit-learn", "statsmodels", "seaborn",
    "sympy", "openpyxl", "xlrd", "tabulate", "Pillow", "beautifulsoup4", "lxml", "requests",
    "PyYAML",
)  # fmt: skip

PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(name="python", tag=DEFAULT_TAG, language="python"),
        Profile(
            name="datasci",
            tag=DATASCI_IMAGE,
            language="python",
            packages=DATASCI_PACKAGES,
            revision="3",
            env=("MPLBACKEND=Agg",),
            key_distributions=DATASCI_DISTRIBUTIONS,
            # bookworm's python3-scipy depends on the pythran compiler, which it needs
            # only to build: with it come gcc, g++, the boost headers and the
            # python3-dev packages (~450 MB). The check below imports scipy's modules.
            stand_ins=("python3-pythran",),
            python_check=DATASCI_CHECK,
        ),
        Profile(
            name="node",
            tag=NODE_IMAGE,
            language="javascript",
            packages=("nodejs",),
            revision="1",
            node_check=NODE_CHECK,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything that decides an image's contents: a profile and the user's additions.

    ``pip_requirements`` is the text of a requirements file (hashes allowed),
    installed with pip at build time.
    """

    profile: Profile = PROFILES[DEFAULT_PROFILE]
    extra_packages: tuple[str, ...] = ()
    pip_requirements: str | None = None

    @property
    def packages(self) -> tuple[str, ...]:
        """The Debian packages to install besides minbase + python3, in order, once each."""
        needed = [*self.profile.packages, *self.extra_packages]
        if self.pip_requirements is not None:
            needed.append("python3-pip")
        return tuple(dict.fromkeys(needed))

    @property
    def version(self) -> str:
        """The recipe label's value: ``RECIPE_VERSION`` for the plain python profile,
        with the profile's revision and a digest of the user's additions appended
        otherwise (``3-datasci.3``, ``3-node.1``, ``3-1f2e3d4c5b6a``)."""
        version = RECIPE_VERSION
        if self.profile.revision:
            version += f"-{self.profile.name}.{self.profile.revision}"
        elif self.profile.name != DEFAULT_PROFILE:
            version += f"-{self.profile.name}"
        if self.extra_packages or self.pip_requirements is not None:
            additions = json.dumps([sorted(self.extra_packages), self.pip_requirements])
            version += "-" + hashlib.sha256(additions.encode()).hexdigest()[:12]
        return version


def stand_in_control(package: str) -> str:
    """The DEBIAN/control of the empty package installed in place of ``package``."""
    return (
        f"Package: {package}\n"
        "Version: 0~sandpool\n"
        "Architecture: all\n"
        "Maintainer: sandpool <sandpool@localhost>\n"
        "Description: empty stand-in installed by sandpool's image build\n"
        " A dependency names this package; nothing in a sandbox needs it at run time.\n"
    )


def profile_named(name: str) -> Profile:
    """The profile called ``name``; raises KeyError naming the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r} (known: {', '.join(PROFILES)})") from None


def import_changes(
    source: str, recipe: Recipe | None = None, runtime: Mapping[str, Any] | None = None
) -> list[str]:
    """The ``docker import --change`` instructions for an image built by ``recipe``
    from ``source`` (``debootstrap:<suite>`` or the base image's name), recorded in
    ``SOURCE_LABEL``; ``runtime`` (see ``runtime_label``) goes in ``RUNTIME_LABEL``."""
    recipe = recipe or Recipe()
    changes = [
        f"WORKDIR {SANDBOX_DIR}",
        "ENV PYTHONDONTWRITEBYTECODE=1",
        "ENV LANG=C.UTF-8",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        *(f"ENV {setting}" for setting in recipe.profile.env),
        f"USER {SANDBOX_USER}",
        f"LABEL {RECIPE_LABEL}={recipe.version}",
        f"LABEL {SOURCE_LABEL}={json.dumps(source)}",
    ]
    if runtime is not None:
        # json.dumps twice: the label's value is a Dockerfile string holding JSON.
        text = json.dumps(runtime, sort_keys=True, separators=(",", ":"))
        changes.append(f"LABEL {RUNTIME_LABEL}={json.dumps(text)}")
    return changes


def is_current(image: Mapping[str, Any] | None, recipe: Recipe | None = None) -> bool:
    """Whether ``image`` (one ``docker image inspect`` entry, None when there is no
    such image) was built with ``recipe`` (default: the plain python profile)."""
    if image is None:
        return False
    labels = (image.get("Config") or {}).get("Labels") or {}
    return bool(labels.get(RECIPE_LABEL) == (recipe or Recipe()).version)


def runtime_label(
    profile: Profile, interpreters: Mapping[str, str], packages: Mapping[str, str]
) -> dict[str, Any]:
    """The runtime label's JSON object: ``{"language", "version", "interpreters",
    "packages", "profile"}``, where ``version`` is the pool language's interpreter
    version (python3's for python, node's for javascript)."""
    main = "node" if profile.language == "javascript" else "python3"
    return {
        "profile": profile.name,
        "language": profile.language,
        "version": interpreters.get(main, ""),
        "interpreters": dict(interpreters),
        "packages": dict(packages),
    }


def parse_runtime(image: Mapping[str, Any] | None) -> dict[str, Any]:
    """The runtime label of ``image`` (one ``docker image inspect`` entry) as a dict;
    ``{}`` when there is no image, no label, or a label that is not a JSON object
    (an image built elsewhere: the daemon reports nothing rather than fails)."""
    if image is None:
        return {}
    labels = (image.get("Config") or {}).get("Labels") or {}
    try:
        runtime = json.loads(labels.get(RUNTIME_LABEL) or "")
    except ValueError:
        return {}
    return runtime if isinstance(runtime, dict) else {}


# Run with the image's python3 at build time (argv: the key distributions); prints
# the python version and the versions of those of them installed, plus every
# distribution pip installed under /usr/local, as JSON.
RUNTIME_PROBE = """\
import json, platform, sys
from importlib import metadata
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
for dist in metadata.distributions():
    if str(dist.locate_file("")).startswith("/usr/local/"):
        found.setdefault(dist.metadata["Name"], dist.version)
print(json.dumps({"python3": platform.python_version(), "packages": found}))
"""
