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


def state_dir() -> Path:
    """Exported root file systems: systemd's ``$STATE_DIRECTORY``, else
    ``/var/lib/sandpool`` for root, else ``$XDG_STATE_HOME/sandpool`` or
    ``~/.local/state/sandpool``."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/sandpool")
    xdg = os.environ.get("XDG_STATE_HOME")
    return Path(xdg) / "sandpool" if xdg else Path.home() / ".local" / "state" / "sandpool"
