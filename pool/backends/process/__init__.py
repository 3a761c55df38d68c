"""The process tier: pre-started runners in bubblewrap namespaces, the lowest-latency tier.

Split by concern: ``backend.py`` the lifecycle (start, run, destroy),
``channel.py`` the runner's frames and the code's pipes read into one run's
verdicts, ``sandbox.py`` one sandbox's process handles, ``definition.py`` the
bwrap command line and its hardening (namespaces, binds, seccomp, rlimits,
setpriv), ``cgroups.py`` the memory, pids and cpu cgroups that bound it and
give the OOM verdict, ``scratch.py`` a root daemon's noexec scratch mounts.
The tier as users see it: docs/process-tier.md.
"""

from pool.backends.process.backend import ProcessBackend
from pool.backends.process.sandbox import ProcessSandbox

__all__ = ["ProcessBackend", "ProcessSandbox"]
