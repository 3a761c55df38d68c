"""Where sandpool keeps files on the host."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Compiled wasm modules and the guest programs: ``$XDG_CACHE_HOME/sandpool``,
    else ``/var/cache/sandpool`` for root, else ``~/.cache/sandpool``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "sandpool"
    if os.geteuid() == 0:
        return Path("/var/cache/sandpool")
    return Path.home() / ".cache" / "sandpool"


def guest_programs_dir() -> Path:
    """Beside cache_dir(), not in it: the wasm cache is private (0700), while this
    directory must be traversable by every sandbox uid that bind-mounts from it."""
    return cache_dir().with_name("sandpool-guest")
