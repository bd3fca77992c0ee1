"""Helpers shared by the tests (importable as `helpers`, see pytest.ini)."""
import os
from pathlib import Path
import sys
import typing as tp

import torch

ROOT = Path(__file__).resolve().parent.parent


def conditioned_logits(lm, codes: torch.Tensor, descriptions: tp.Sequence[str]) -> torch.Tensor:
    """Teacher-forced logits [B, K, T, card] of `lm` for `codes` [B, K, T], in eval mode, NaN (invalid) -> 0."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    lm.eval()
    attributes = [ConditioningAttributes(text={'description': d}) for d in descriptions]
    with torch.no_grad():
        tokenized = lm.condition_provider.tokenize(attributes)
        condition_tensors = lm.condition_provider(tokenized)
        out = lm.compute_predictions(codes, [], condition_tensors)
    return torch.nan_to_num(out.logits, nan=0.0)


def build_solver(argv: tp.List[str]):
    """Build a LoRAMusicGenSolver through dora exactly as `dora run <argv>` would, and return (solver, xp)."""
    from audiocraft_lora import train
    from audiocraft.modules.transformer import set_efficient_attention_backend
    set_efficient_attention_backend('torch')
    xp = train.main.get_xp(argv)
    xp.folder.mkdir(parents=True, exist_ok=True)
    with xp.enter():
        solver = train.get_solver(xp.cfg)
    return solver, xp


DEBUG_ARGS = ['solver=musicgen/lora_debug', 'dataset.num_workers=0', 'device=cpu', 'autocast=false']


def run_dora(args: tp.List[str], dora_dir: Path, timeout: float = 600) -> 'subprocess.CompletedProcess':
    """Run `dora run <args>` in a subprocess from the root of the checkout, as a user would."""
    import subprocess
    env = dict(os.environ, AUDIOCRAFT_LORA_DORA_DIR=str(dora_dir), PYTHONUNBUFFERED='1')
    dora = Path(sys.executable).parent / 'dora'
    cmd = [str(dora) if dora.exists() else 'dora', 'run'] + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
