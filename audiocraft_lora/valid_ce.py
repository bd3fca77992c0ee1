"""Teacher-forced cross-entropy per codebook on a dataset split, for a base and its adapters.

The numbers come from the training code itself: a `LoRAMusicGenSolver` is built through the same dora/Hydra entry
point as `dora run` (in a temporary dora folder), and its valid stage runs once per model: EnCodec tokens, the
codebook delay pattern and its mask, padding masked from the loss, the same fixed valid segments every time. So
"valid CE" here is the same quantity as `valid ce` / `ce_q1..K` in the training history.

The base model is measured as the adapter with every LoRA tensor set to zero (exactly the base: B = 0), adapters by
loading their tensors. Adapters with different LoRA settings (rank, targets) get a solver each.
"""
import contextlib
import json
import math
from pathlib import Path
import tempfile
import typing as tp

import torch

from .adapters import Adapter
from .errors import UserError
from .lora import LoRASettings

SPLIT = 'valid'
RESULT_KEYS = ('rank', 'alpha', 'dropout', 'targets', 'use_rslora')


def lora_overrides(settings: LoRASettings) -> tp.List[str]:
    values = settings.to_dict()
    argv = []
    for key in RESULT_KEYS:  # the settings that change the adapter's shape or its output
        value = values[key]
        if isinstance(value, (list, tuple)):
            value = '[' + ','.join(str(v) for v in value) + ']'
        elif isinstance(value, bool):
            value = str(value).lower()
        elif value is None:
            value = 'null'
        argv.append(f'lora.{key}={value}')
    return argv


@contextlib.contextmanager
def _temporary_dora_dir() -> tp.Iterator[Path]:
    from . import train
    previous = train.main.dora.dir
    with tempfile.TemporaryDirectory(prefix='audiocraft_lora_valid_') as tmp:
        train.main.dora.dir = Path(tmp)
        try:
            yield Path(tmp)
        finally:
            train.main.dora.dir = previous


def _run_valid(solver, label: str, state: tp.Mapping[str, torch.Tensor]) -> tp.Dict[str, tp.Any]:
    solver.adapter.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    with torch.no_grad():  # as AudioCraft's run_epoch runs its valid stage
        metrics = solver.run_stage(f'{SPLIT} {label}', solver.valid)  # one stage name per model (flashy's rule)
    num_codebooks = int(solver.cfg.transformer_lm.n_q)
    per_codebook = [float(metrics[f'ce_q{k + 1}']) for k in range(num_codebooks)]
    return {'per_codebook': per_codebook, 'split': SPLIT, 'ce': float(metrics['ce']),
            'num_batches': len(solver.dataloaders[SPLIT])}


def valid_cross_entropy(base: str, adapters: tp.Mapping[str, Adapter], dataset_overrides: tp.Sequence[str],
                        device: str = 'cpu', base_label: str = 'base') -> tp.Dict[str, tp.Dict[str, tp.Any]]:
    """{model label: {'per_codebook': [K] mean CE (nats), 'ce', 'split', 'num_batches'}} for the base and adapters.

    Args:
        base (str): the base model (as `base_model=` takes it).
        adapters (dict): label -> loaded adapter, all for this base (checked by the caller).
        dataset_overrides (list of str): Hydra overrides choosing the data, e.g. ['dset=audio/trap'] or
            ['datasource.valid=egs/trap/valid', ...]; also `dataset.batch_size=4`, `dataset.segment_duration=15`,
            or the training recipe (`solver=musicgen/lora_small`, default lora_default) so that the valid segments
            are the ones training used.
        device (str): cpu or cuda.
    Raises:
        DataError / BaseModelError / LoRAConfigError: through the solver, before any step.
    """
    from . import train
    from audiocraft.modules.transformer import set_efficient_attention_backend
    from hydra.errors import MissingConfigException
    groups: tp.Dict[str, tp.List[str]] = {}
    for label, adapter in adapters.items():
        groups.setdefault(json.dumps(adapter.settings.to_dict(), sort_keys=True), []).append(label)
    if not groups:  # base only: any LoRA settings, all zeros
        groups[json.dumps(LoRASettings().to_dict())] = []
    results: tp.Dict[str, tp.Dict[str, tp.Any]] = {}
    with _temporary_dora_dir():
        for key, labels in groups.items():
            settings = adapters[labels[0]].settings if labels else LoRASettings()
            recipe = [] if any(o.startswith('solver=') for o in dataset_overrides) else ['solver=musicgen/lora_default']
            argv = (recipe + [f'base_model={base}', f'device={device}', 'dataset.num_workers=0',
                     'logging.log_tensorboard=false', 'logging.log_wandb=false', f'+validate_splits=[{SPLIT}]']
                    + lora_overrides(settings) + list(dataset_overrides))  # (autocast: the recipe's, as trained)
            try:
                xp = train.main.get_xp(argv)
            except MissingConfigException as exc:  # e.g. the dset yaml of the adapter's XP was moved or deleted
                raise UserError(f"valid CE: {str(exc).splitlines()[0]} in {train.CONFIG_DIR} (overrides: "
                                f"{' '.join(dataset_overrides)}). Fix: recreate it (`audiocraft-lora prepare ... "
                                "--name <name>`) or pass the data explicitly (--valid dset=audio/<name>, or a "
                                "manifest folder).") from exc
            xp.folder.mkdir(parents=True, exist_ok=True)
            set_efficient_attention_backend(xp.cfg.efficient_attention_backend)
            threads = torch.get_num_threads()
            torch.set_num_threads(xp.cfg.num_threads)  # as in training: same reduction order, same numbers
            try:
                with xp.enter():
                    torch.manual_seed(xp.cfg.seed)
                    solver = train.get_solver(xp.cfg)
                    if base_label not in results:
                        zeros = {k: torch.zeros_like(v) for k, v in solver.adapter.state_dict().items()}
                        results[base_label] = _run_valid(solver, base_label, zeros)
                    for label in labels:
                        results[label] = _run_valid(solver, label, adapters[label].state)
                    del solver
            finally:
                torch.set_num_threads(threads)
    return results


def perplexity(ce: float) -> float:
    return math.exp(ce) if ce < 700 else float('inf')
