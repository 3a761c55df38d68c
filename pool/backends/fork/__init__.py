"""The fork tier: single-use sandboxes forked from a pool's warm template (docs/fork-tier.md)."""

from pool.backends.fork.backend import ForkBackend

__all__ = ["ForkBackend"]
