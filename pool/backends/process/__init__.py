"""The process tier: bubblewrap sandboxes on this host."""

from pool.backends.process.backend import ProcessBackend, ProcessSandbox

__all__ = ["ProcessBackend", "ProcessSandbox"]
