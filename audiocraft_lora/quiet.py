"""Start-up notices of our dependencies that say nothing about the user's run, dropped at our entry points
(`audiocraft-lora`, `dora run`); every other warning is left as it is.

- xformers' "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions ... Please reinstall xformers" when its
  wheel was built for another torch: those kernels are never called (`efficient_attention_backend=torch`, our
  default: AudioCraft's attention runs on torch's SDPA and uses only xformers' pure-Python `ops.unbind` and
  `LowerTriangularMask`), and the advice sends users after a problem they don't have.
  DataLoader workers started by forkserver (AudioCraft's `mp_start_method`) import xformers afresh, so the forkserver
  preloads `audiocraft_lora.quiet_workers` (the filter, then xformers): workers inherit both and print nothing.
- Hydra's notices that dora's `version_base='1.1'` behaviour (the run works in its XP folder, as AudioCraft's do)
  changes in Hydra 1.4, printed again at every config composition.
"""
import logging
import multiprocessing
import warnings


class _DropXformersBuildNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('WARNING[XFORMERS]')


def quiet_dependency_notices() -> None:
    """Install the filters (idempotent)."""
    xformers_logger = logging.getLogger('xformers')
    if not any(isinstance(f, _DropXformersBuildNotice) for f in xformers_logger.filters):
        xformers_logger.addFilter(_DropXformersBuildNotice())
    warnings.filterwarnings('ignore', message=r'\s*version_base="1\.1" selects Hydra 1\.1 compatibility')
    warnings.filterwarnings('ignore', message=r'\s*Future Hydra versions will no longer change working directory')


def quiet_worker_processes() -> None:
    """Have forkserver's processes (DataLoader workers) start with the filters installed and xformers imported."""
    multiprocessing.set_forkserver_preload(['audiocraft_lora.quiet_workers'])
