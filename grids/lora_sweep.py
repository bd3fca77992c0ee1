"""LoRA sweep: rank x lr x targets, plus dataset size x epochs (26 XPs, one GPU each).

    LORA_SWEEP_DSET=audio/trap dora grid lora_sweep                        # SLURM (slurm.* in config/config.yaml)
    LORA_SWEEP_DSET=audio/trap LORA_SWEEP_BASE=/models/musicgen-small dora grid lora_sweep -p <partition>
    LORA_SWEEP_DSET=audio/trap python -m audiocraft_lora.local_grid lora_sweep   # here, one XP after the other
    dora grid lora_sweep --dry_run --no_monitoring                        # list the XPs and their metrics

rank {16, 32, 64} (alpha = 2 x rank) x lr {5e-5, 1e-4, 2e-4} x targets {all: attention + feed-forward, attn:
attention only} = 18 XPs; then, at the recipe's rank 32 / lr 1e-4 / all targets, train_subset.fraction {all, 0.5,
0.25} x optim.epochs {recipe's, 5, 20} minus the default point = 8 XPs. The dataset-size XPs keep the full valid
split, so their valid CE is comparable. Recipe, dataset, base and more overrides: see grids/_sweep.py.
"""
from ._explorers import LoRAExplorer
from ._sweep import base_args, sweep


@LoRAExplorer
def explorer(launcher):
    launcher.slurm_(gpus=1)
    launcher.bind_(base_args('lora_small'))
    sweep(launcher, ranks=[16, 32, 64], lrs=[5e-5, 1e-4, 2e-4], targets=['all', 'attn'],
          fractions=[None, 0.5, 0.25], epochs=[None, 5, 20])
