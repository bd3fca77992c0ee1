"""A 2-XP sweep on the tiny debug base and egs/example, CPU, seconds per XP: for tests and trying the tooling.

    python -m audiocraft_lora.local_grid lora_debug_sweep       # runs both XPs here
    dora grid lora_debug_sweep --dry_run --no_monitoring         # the explorer's table
    LORA_EVAL_GRID=lora_debug_sweep python -m audiocraft_lora.local_grid lora_eval
"""
from ._explorers import LoRAExplorer
from ._sweep import base_args, sweep

FAST = {'dataset.num_workers': 0, 'device': 'cpu', 'optim.updates_per_epoch': 4, 'dataset.valid.num_samples': 4}


@LoRAExplorer
def explorer(launcher):
    launcher.slurm_(gpus=0)
    launcher.bind_(base_args('lora_debug'), FAST)
    sweep(launcher, ranks=[4, 8], lrs=[1e-3], targets=['all'])
