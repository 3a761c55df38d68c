"""Facts about host processes that several modules need, read without guessing."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts: EPERM means it is there).

    A reused pid reads as alive: callers that remove what a dead daemon left
    err towards keeping it.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
