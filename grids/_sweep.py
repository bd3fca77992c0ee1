"""What the sweeps share: the base model / dataset / recipe from the environment, and the sweep itself.

`dora grid` accepts no config overrides (its positional arguments are name patterns that filter the XPs), so these
come from environment variables, read when the grid is defined and recorded in every XP's argv (and signature):

    LORA_SWEEP_RECIPE  recipe under config/solver/musicgen/ (default: the grid's, lora_small for lora_sweep)
    LORA_SWEEP_DSET    dataset under config/dset/ (e.g. audio/trap; default: the recipe's)
    LORA_SWEEP_BASE    base_model (hub id | local AudioCraft or HF folder; default: the recipe's)
    LORA_SWEEP_ARGS    more overrides for every XP, shell-quoted (e.g. 'dataset.segment_duration=10')

One grid name holds one set of XPs: re-running `dora grid lora_sweep` with another dataset replaces the grid's XPs
(dora cancels the running ones that are no longer in it; finished XPs stay in outputs/xps/).
"""
import itertools
import os
from pathlib import Path
import shlex
import typing as tp

from dora.log import fatal

from audiocraft_lora.checkout import CONFIG_DIR

# LoRA on attention only (self + cross), against the recipes' default: attention and feed-forward.
ATTENTION_TARGETS = ['self_attn.in_proj', 'self_attn.out_proj', 'cross_attention.in_proj', 'cross_attention.out_proj']
TARGETS = {'all': None, 'attn': ATTENTION_TARGETS}


def base_args(default_recipe: str) -> tp.List[str]:
    """Overrides common to every XP: recipe, dataset and base from the environment (checked here, clearly)."""
    recipe = os.environ.get('LORA_SWEEP_RECIPE') or default_recipe
    if not (CONFIG_DIR / 'solver' / 'musicgen' / f'{recipe}.yaml').exists():
        fatal(f"LORA_SWEEP_RECIPE={recipe}: no config/solver/musicgen/{recipe}.yaml.")
    argv = [f'solver=musicgen/{recipe}']
    dset = os.environ.get('LORA_SWEEP_DSET')
    if dset:
        if not (CONFIG_DIR / 'dset' / f'{dset}.yaml').exists():
            fatal(f"LORA_SWEEP_DSET={dset}: no config/dset/{dset}.yaml "
                  "(`audiocraft-lora prepare <data> --name <name>` writes config/dset/audio/<name>.yaml).")
        argv.append(f'dset={dset}')
    base = os.environ.get('LORA_SWEEP_BASE')
    if base:
        if Path(base).expanduser().exists():  # a local folder: absolute (XPs may run from another folder)
            base = str(Path(base).expanduser().resolve())
        argv.append(f'base_model={base}')
    argv += shlex.split(os.environ.get('LORA_SWEEP_ARGS', ''))
    return argv


def lora_args(rank: int, lr: float, targets: str) -> dict:
    """One point of rank x lr x targets; alpha follows the rank (alpha = 2 x rank, as the recipes)."""
    args: tp.Dict[str, tp.Any] = {'lora.rank': rank, 'lora.alpha': 2 * rank, 'optim.lr': lr}
    if TARGETS[targets] is not None:
        args['lora.targets'] = TARGETS[targets]
    return args


def sweep(launcher, ranks: tp.Sequence[int], lrs: tp.Sequence[float], targets: tp.Sequence[str],
          fractions: tp.Sequence[tp.Optional[float]] = (), epochs: tp.Sequence[tp.Optional[int]] = ()) -> None:
    """Schedule rank x lr x targets, then dataset size x epochs at the recipe's rank / lr / targets.

    `fractions` / `epochs` values of None mean the whole train manifest / the recipe's epochs; the point
    (None, None) is the recipe's default and is not repeated.
    """
    with launcher.job_array():
        for rank, lr, target in itertools.product(ranks, lrs, targets):
            launcher(lora_args(rank, lr, target))
    data_points = [(f, e) for f, e in itertools.product(fractions or [None], epochs or [None])
                   if (f, e) != (None, None)]
    if data_points:
        with launcher.job_array():
            for fraction, num_epochs in data_points:
                args: tp.Dict[str, tp.Any] = {}
                if fraction is not None:
                    args['train_subset.fraction'] = fraction
                if num_epochs is not None:
                    args['optim.epochs'] = num_epochs
                launcher(args)
