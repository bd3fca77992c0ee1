"""Entry point for dora: `dora run solver=musicgen/lora_small dset=audio/<name>`.

Reads our own Hydra tree (`config/` at the root of the checkout; AudioCraft's is not pip-installed), sets the
environment AudioCraft expects (USER, its team config), and runs `LoRAMusicGenSolver`. XPs live under
`./outputs` of the checkout, or in `$AUDIOCRAFT_LORA_DORA_DIR`.
"""
import getpass
import logging
import multiprocessing
import os
import sys
import typing as tp

from .checkout import CONFIG_DIR, dora_dir
from .quiet import quiet_dependency_notices, quiet_worker_processes


def setup_environment() -> None:
    """Environment defaults AudioCraft reads at import/run time."""
    if not os.environ.get('USER'):
        try:
            os.environ['USER'] = getpass.getuser()
        except Exception:  # no passwd entry (containers)
            os.environ['USER'] = 'audiocraft'
    os.environ.setdefault('AUDIOCRAFT_CONFIG', str(CONFIG_DIR / 'teams' / 'default.yaml'))
    os.environ.setdefault('AUDIOCRAFT_TEAM', 'default')




setup_environment()
quiet_dependency_notices()

from dora import git_save, hydra_main  # noqa: E402
import flashy  # noqa: E402
import omegaconf  # noqa: E402

logger = logging.getLogger(__name__)

SOLVERS = {
    'musicgen_lora': 'audiocraft_lora.solver:LoRAMusicGenSolver',
}


def get_solver_class(name: str):
    if name not in SOLVERS:
        raise KeyError(f"Unknown solver {name!r}; available: {sorted(SOLVERS)}")
    module_name, cls_name = SOLVERS[name].split(':')
    import importlib
    return getattr(importlib.import_module(module_name), cls_name)


def resolve_datasource_paths(cfg: omegaconf.DictConfig) -> None:
    """Manifest folders are given relative to the checkout: make them absolute (as AudioCraft does)."""
    for key, value in cfg.datasource.items():
        if isinstance(value, str):
            cfg.datasource[key] = git_save.to_absolute_path(value)


def get_solver(cfg: omegaconf.DictConfig):
    """Build the solver; the global batch size is split across ranks (as AudioCraft does)."""
    world = flashy.distrib.world_size()
    if cfg.dataset.batch_size % world != 0:
        raise ValueError(f"dataset.batch_size={cfg.dataset.batch_size} must be divisible by the {world} GPUs.")
    cfg.dataset.batch_size //= world
    for split in ['train', 'valid', 'evaluate', 'generate']:
        if split in cfg.dataset and cfg.dataset[split].get('batch_size'):
            cfg.dataset[split].batch_size //= world
    resolve_datasource_paths(cfg)
    from . import subset, token_cache
    subset.apply_train_subset(cfg)  # train_subset.*: the dataset-size axis of grids/lora_sweep.py
    token_cache.prepare(cfg)  # cache.*: checks, and lets torch.load read AudioCraft's cached batches
    solver = get_solver_class(cfg.solver)(cfg)
    token_cache.attach(solver)  # a cached-batch loader that works (AudioCraft 1.3.0's can't read MusicInfo)
    return solver


def init_seed_and_system(cfg: omegaconf.DictConfig) -> None:
    import random
    import numpy as np
    import torch
    from audiocraft.modules.transformer import set_efficient_attention_backend
    multiprocessing.set_start_method(cfg.mp_start_method, force=True)
    quiet_worker_processes()  # (forkserver's DataLoader workers import our dependencies afresh)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    os.environ['MKL_NUM_THREADS'] = str(cfg.num_threads)
    os.environ['OMP_NUM_THREADS'] = str(cfg.num_threads)
    set_efficient_attention_backend(cfg.efficient_attention_backend)


def distrib_backend(cfg: omegaconf.DictConfig) -> str:
    """nccl for CUDA training; gloo on CPU (dora's default, nccl, can't run there: `dora run -d --ddp_workers 2`)."""
    import torch
    return 'nccl' if str(cfg.device).startswith('cuda') and torch.cuda.is_available() else 'gloo'


@hydra_main(config_path='../config', config_name='config', version_base='1.1')
def main(cfg: omegaconf.DictConfig) -> tp.Any:
    from .errors import UserError
    init_seed_and_system(cfg)
    log_name = '%s.log.{rank}' % cfg.execute_only if cfg.execute_only else 'solver.log.{rank}'
    flashy.setup_logging(level=str(cfg.logging.level).upper(), log_name=log_name)
    flashy.distrib.init(backend=distrib_backend(cfg))
    try:
        solver = get_solver(cfg)
        if cfg.show:
            solver.show()
            return
        if cfg.execute_only:
            assert cfg.execute_inplace or cfg.continue_from is not None, \
                "Set continue_from=<sig_or_path> or execute_inplace=true with execute_only."
            solver.restore(replay_metrics=False)
            if cfg.execute_only == 'export':
                print(f"Adapter exported to {solver.export_adapter()}")
                return
            solver.run_one_stage(cfg.execute_only)
            return
        return solver.run()
    except UserError as exc:
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


main.dora.dir = dora_dir()
main.dora.grid_package = 'grids'
# AudioCraft resolves `continue_from=<path>` and `//sig/<sig>` through `audiocraft.train.main.dora.dir`, a module that
# can't be imported here (its config/ is not pip-installed; importing it inside a run re-initialises Hydra): alias it
# to this entry point, so that continue_from (grids/lora_eval.py, execute_only) finds our XPs.
sys.modules.setdefault('audiocraft.train', sys.modules[__name__])

if __name__ == '__main__':
    main()
