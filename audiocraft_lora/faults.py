"""Deterministic fault injection for the crash-safety tests, driven by one environment variable.

`AUDIOCRAFT_LORA_FAULT` holds `;`-separated specs `<point>[:key=value,...]`. A spec fires when every key it names
matches the call site (a key it doesn't name matches anything). Points:

- `kill@train_step` (epoch, step, rank): SIGKILL the process in the middle of a training step (before forward).
- `kill@checkpoint_write` (epoch, file): SIGKILL after a checkpoint's bytes went to its temp file, before
  fsync + rename.
- `kill@checkpoint_saved` (epoch): SIGKILL once `checkpoint.th` is in place, before the epoch copy, the pruning
  of old checkpoints and dora's history update.
- `nan_loss` (epoch, step, rank): multiply the training loss by NaN (the graph is kept, so gradients are NaN too).
- `oom@train_step` (epoch, step, rank): raise torch's OutOfMemoryError at the start of a training step.

Example: `AUDIOCRAFT_LORA_FAULT='kill@train_step:epoch=2,step=1;nan_loss:step=0,rank=1'`.
Unset (the normal case), every call is one dictionary lookup.
"""
import os
import signal
import typing as tp

import torch

ENV = 'AUDIOCRAFT_LORA_FAULT'


def _specs() -> tp.List[tp.Tuple[str, tp.Dict[str, str]]]:
    out = []
    for spec in os.environ.get(ENV, '').split(';'):
        spec = spec.strip()
        if not spec:
            continue
        point, _, args = spec.partition(':')
        where = dict(item.split('=', 1) for item in args.split(',') if item.strip())
        out.append((point.strip(), {k.strip(): v.strip() for k, v in where.items()}))
    return out


def fires(point: str, **where: tp.Any) -> bool:
    """Whether a spec for `point` matches this call site."""
    if ENV not in os.environ:
        return False
    for name, keys in _specs():
        if name == point and all(str(where.get(k)) == v for k, v in keys.items()):
            return True
    return False


def kill_point(point: str, **where: tp.Any) -> None:
    """SIGKILL this process (no cleanup, no atexit, like a preemption or the OOM killer) if `kill@<point>` fires."""
    if fires(f'kill@{point}', **where):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison_loss(loss: torch.Tensor, **where: tp.Any) -> torch.Tensor:
    """`loss * NaN` if a `nan_loss` spec fires, else `loss` unchanged."""
    if fires('nan_loss', **where):
        return loss * float('nan')
    return loss


def maybe_out_of_memory(**where: tp.Any) -> None:
    """Raise torch's OutOfMemoryError (what a CUDA allocation failure raises) if an `oom@train_step` spec fires."""
    if fires('oom@train_step', **where):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                     "(injected by AUDIOCRAFT_LORA_FAULT)")
