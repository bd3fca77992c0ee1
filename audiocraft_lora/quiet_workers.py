"""Imported once by the forkserver (quiet.quiet_worker_processes): the start-up notices' filters, then xformers,
so that its build notice is dropped here and the workers forked from it inherit the import instead of printing it."""
from .quiet import quiet_dependency_notices

quiet_dependency_notices()
try:
    import xformers.ops  # noqa: F401  (AudioCraft's transformer imports it in every worker)
except ImportError:  # pragma: no cover - AudioCraft without xformers
    pass
