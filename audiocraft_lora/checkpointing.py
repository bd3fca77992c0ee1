"""Crash-safe checkpoints for the LoRA solver: atomic writes on rank 0, `keep_last` honoured, never a bad load.

What AudioCraft 1.3.0 does (audiocraft/solvers/base.py) and what we do instead:

- `save_checkpoints` (base.py:282-309) writes through flashy's `write_and_rename` (no fsync; a killed write leaves
  `checkpoint.th.tmp` behind) and calls `flush_stale_checkpoints` without `keep_last` (base.py:309), so epoch
  checkpoints are never deleted. `save_checkpoints` here: a barrier (every rank finished the epoch), a check that the
  adapter is bit-identical on every rank, then rank 0 alone writes `checkpoint.th` and the epoch copy
  `checkpoint_<epoch>.th` through `checkpoint_io.atomic_write` (temp file in the same folder, fsync, `os.replace`,
  fsync of the folder), prunes epoch checkpoints beyond `checkpoint.keep_last` (oldest first, only after the new
  ones are on disk), and a last barrier.
- `load_checkpoints` (base.py:314) `torch.load`s `checkpoint.th` whatever state it is in. `prepare_latest` runs
  first, on rank 0, with the outcome broadcast: temp files of interrupted writes are removed; an unreadable
  `checkpoint.th` (bad zip, CRC error, truncated) is moved aside to `checkpoint.th.corrupt` and replaced by the
  newest complete, readable `checkpoint_<epoch>.th` (with a warning); with none, `CheckpointError` says what to do.
- after loading, dora's `history.json` is rewritten from the checkpoint's history (a kill between the checkpoint
  and the history update would otherwise leave it one epoch behind), and a history with no checkpoint at all is
  dropped (it would make a fresh adapter start at a later epoch).
- `__init__` and `restore` (base.py:80, 444) log `model_hash(self.model)`, which reads every weight through numpy:
  numpy has no bfloat16, the frozen base's storage dtype under bf16 autocast. The solver runs both inside
  `model_hash_reads_16_bit`, which hashes 16-bit weights through an int16 view of the same bytes.

Besides AudioCraft's own state, a checkpoint holds two state sources defined here: `BaseFingerprint` (a checkpoint of
another base is refused on restore) and `RandomState` (every RNG training draws from, so a resumed XP continues
exactly).
"""
import contextlib
import hashlib
import logging
import math
import os
from pathlib import Path
import shutil
import typing as tp
import zipfile

import flashy
import torch

from audiocraft.utils import checkpoint as ac_checkpoint

from . import checkpoint_io, faults
from .errors import BaseModelError, LoRAConfigError, UserError

logger = logging.getLogger(__name__)

# A checkpoint we may resume from holds at least these (an epoch checkpoint trimmed by
# `checkpoint.keep_every_states` may not).
RESUMABLE_KEYS = ('model', 'optimizer', 'history')


class CheckpointError(UserError):
    """A checkpoint of the current XP can't be used and there is nothing safe to fall back on."""


# ---------------------------------------------------------------------------------------------------- saving
def save_checkpoints(solver: tp.Any) -> None:
    """Replaces `StandardSolver.save_checkpoints`; called by every rank from `commit()` at the end of an epoch."""
    flashy.distrib.barrier()
    check_adapter_in_sync(solver)
    if flashy.distrib.is_rank_zero():
        _save_on_rank_zero(solver)
    flashy.distrib.barrier()


def _save_on_rank_zero(solver: tp.Any) -> None:
    cfg = solver.cfg.checkpoint
    state = solver.state_dict()
    epoch = solver.epoch - 1  # commit() appended this epoch's metrics to the history already
    if cfg.save_last:
        _write(state, solver.checkpoint_path(), epoch)
        faults.kill_point('checkpoint_saved', epoch=epoch)
    if cfg.save_every and epoch % cfg.save_every == 0:
        keep = cfg.get('keep_every_states') or []
        _write({k: v for k, v in state.items() if k in keep} if keep else state,
               solver.epoch_checkpoint_path(epoch), epoch)
    keep_last = cfg.get('keep_last')
    if keep_last:
        # AudioCraft's own pruning, with the `keep_last` that StandardSolver.save_checkpoints forgets to pass.
        ac_checkpoint.flush_stale_checkpoints(solver.checkpoint_path(), keep_last=int(keep_last))


def _write(state: dict, path: Path, epoch: int) -> None:
    with checkpoint_io.atomic_write(path) as f:
        torch.save(state, f)
        faults.kill_point('checkpoint_write', epoch=epoch, file=path.name)
    logger.info("Checkpoint saved to %s", path)


def adapter_digest(solver: tp.Any) -> str:
    """sha1 of the adapter's tensors (sorted by name): equal digests mean bit-identical adapters."""
    sha = hashlib.sha1()
    for name, tensor in sorted(solver.adapter.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def check_adapter_in_sync(solver: tp.Any) -> None:
    """Log the adapter digest; with DDP, raise on every rank if any rank's adapter differs from rank 0's."""
    digest = adapter_digest(solver)
    solver.logger.info("Adapter digest after epoch %d on rank %d of %d: %s", solver.epoch - 1,
                       flashy.distrib.rank(), flashy.distrib.world_size(), digest)
    if not flashy.distrib.is_distributed():
        return
    reference = flashy.distrib.broadcast_object(digest, src=0)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    differs = torch.tensor([float(digest != reference)], device=device)
    flashy.distrib.all_reduce(differs)
    if differs.item() > 0:
        raise RuntimeError(
            f"The LoRA adapter differs across ranks after epoch {solver.epoch - 1} ({int(differs.item())} rank(s) "
            f"out of sync with rank 0; this rank's digest {digest[:12]}, rank 0's {reference[:12]}). Gradients were "
            "not all-reduced: keep optim.eager_sync=true and fsdp.use=false, and report this with the solver logs.")


# ---------------------------------------------------------------------------------------------------- loading
def prepare_latest(solver: tp.Any) -> None:
    """Before AudioCraft's `load_checkpoints`: make sure `checkpoint.th`, if present, is complete and readable."""
    outcome: tp.Tuple[str, str] = ('ok', '')
    if flashy.distrib.is_rank_zero():
        try:
            _prepare_on_rank_zero(Path(solver.folder), solver.checkpoint_path(use_fsdp=False))
        except CheckpointError as exc:
            outcome = ('error', str(exc))
    outcome = flashy.distrib.broadcast_object(outcome, src=0)
    if outcome[0] == 'error':
        raise CheckpointError(outcome[1])


def after_load(solver: tp.Any, state: tp.Optional[dict]) -> None:
    """After AudioCraft's `load_checkpoints`: keep dora's history.json equal to what training resumes from."""
    training = solver.cfg.get('execute_only') is None and solver.cfg.get('continue_from') is None
    if state is None and solver.history and training:
        logger.warning("history.json lists %d epoch(s) but there is no checkpoint to resume them from: starting "
                       "this XP from epoch 1.", len(solver.history))
        solver.history[:] = []
    if flashy.distrib.is_rank_zero() and (state is not None or not solver.history):
        solver.xp.link.update_history(solver.history)


def _prepare_on_rank_zero(folder: Path, latest: Path) -> None:
    for leftover in sorted(folder.glob('.checkpoint*.tmp')) + sorted(folder.glob('checkpoint*.th.tmp')):
        logger.warning("Removing %s, left by a checkpoint write that was interrupted.", leftover)
        leftover.unlink(missing_ok=True)
    if not latest.exists():
        return
    problem = unreadable(latest)
    if problem is None:
        return
    fallback = _newest_resumable(folder)
    if fallback is None:
        raise CheckpointError(
            f"Checkpoint {latest} is unreadable ({problem}) and there is no earlier complete checkpoint "
            f"(checkpoint_<epoch>.th, kept with checkpoint.save_every=1) to resume from. Restore {latest.name} from "
            f"a backup, or move it out of {folder} to restart this XP from epoch 1.")
    quarantine = _free_name(latest.with_name(latest.name + '.corrupt'))
    os.replace(latest, quarantine)
    with open(fallback, 'rb') as src, checkpoint_io.atomic_write(latest) as dst:
        shutil.copyfileobj(src, dst)
    logger.warning("Checkpoint %s is unreadable (%s): moved it to %s and resuming from %s, the newest complete "
                   "checkpoint.", latest, problem, quarantine.name, fallback.name)


def unreadable(path: Path) -> tp.Optional[str]:
    """Why the torch checkpoint at `path` can't be read (truncated, bad zip, CRC mismatch), or None if it can.

    Reads the whole file and checks every member's CRC, without unpickling anything.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if bad is not None:
        return f"CRC mismatch in {bad}"
    return None


def _newest_resumable(folder: Path) -> tp.Optional[Path]:
    epochs = []
    for path in folder.glob('checkpoint_*.th'):
        suffix = path.name[len('checkpoint_'):-len('.th')]
        if suffix.isdigit():
            epochs.append((int(suffix), path))
    for _, path in sorted(epochs, reverse=True):
        if unreadable(path) is not None:
            logger.warning("Epoch checkpoint %s is unreadable too; trying an older one.", path)
            continue
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable", we say why and move on
            logger.warning("Epoch checkpoint %s can't be loaded (%s); trying an older one.", path, exc)
            continue
        if all(key in state for key in RESUMABLE_KEYS):
            return path
        logger.warning("Epoch checkpoint %s lacks %s (checkpoint.keep_every_states): not resumable.", path,
                       [k for k in RESUMABLE_KEYS if k not in state])
    return None


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f'{path.name}.{n}')
        n += 1
    return candidate


@contextlib.contextmanager
def model_hash_reads_16_bit():
    """While active, AudioCraft's solver module hashes 16-bit weights through an int16 view of their bytes.

    AudioCraft logs a hash of the model (`utils.model_hash`, in `__init__` and `restore`) read through numpy, which
    has no bfloat16: the frozen base's storage dtype under bf16 autocast (`lora.base_dtype=auto`). float32 weights
    hash as before."""
    from audiocraft.solvers import base
    original = base.model_hash

    class _Bytes:
        def __init__(self, model: torch.nn.Module):
            self.model = model

        def parameters(self):
            return (p.view(torch.int16) if p.dtype in (torch.bfloat16, torch.float16) else p
                    for p in self.model.parameters())
    base.model_hash = lambda model: original(_Bytes(model))
    try:
        yield
    finally:
        base.model_hash = original


class BaseFingerprint:
    """State source holding the base fingerprint: a checkpoint of another base is refused on restore."""

    def __init__(self, name: str, fingerprint: str):
        self.name = name
        self.fingerprint = fingerprint

    def state_dict(self) -> dict:
        return {'base_model': self.name, 'fingerprint': self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state and state.get('fingerprint') != self.fingerprint:
            raise BaseModelError(
                f"This checkpoint was trained on base {state.get('base_model')!r} (fingerprint "
                f"{str(state.get('fingerprint'))[:12]}) but the current base is {self.name!r} (fingerprint "
                f"{self.fingerprint[:12]}). Use the same base_model, or start a new XP.")


class RandomState:
    """State source for every RNG that training consumes, so that a resumed XP continues exactly.

    Covers torch (CPU and CUDA: LoRA dropout, sampler order), Python's `random` (text merge/drop in MusicDataset,
    T5 word dropout), numpy, and the private generators of AudioCraft's CFG and attribute dropout modules.
    Stored as tensors/lists only, so the checkpoint stays loadable with `weights_only=True`.
    """

    def __init__(self, model: torch.nn.Module):
        self.generators = {name: getattr(model, name).rng for name in ('cfg_dropout', 'att_dropout')
                           if hasattr(getattr(model, name, None), 'rng')}

    def state_dict(self) -> dict:
        import random
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            'torch': torch.get_rng_state(),
            'python': random.getstate(),
            'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype('int64')), 'pos': int(pos),
                      'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
            'generators': {name: gen.get_state() for name, gen in self.generators.items()},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # the generator of this rank's own device: rank 0 writes the checkpoint, every rank restores it onto its
            # device (all ranks are seeded alike and draw alike, so their generators move in step)
            state['cuda_device'] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        import random
        import numpy as np
        if not state:
            return
        torch.set_rng_state(state['torch'])
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))
        npst = state['numpy']
        np.random.set_state((npst['kind'], npst['keys'].numpy().astype('uint32'), npst['pos'], npst['has_gauss'],
                             npst['cached_gaussian']))
        for name, gen_state in state.get('generators', {}).items():
            if name in self.generators:
                self.generators[name].set_state(gen_state)
        if 'cuda_device' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state['cuda_device'])  # onto torch.cuda.current_device(): this rank's
        elif 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state['cuda'])  # (checkpoints written before: every device of rank 0)


def export_state(cfg) -> str:
    """`export_state` (best | last): which adapter a run exports."""
    value = str(cfg.get('export_state', 'best'))
    if value not in ('best', 'last'):
        raise LoRAConfigError(f"export_state={value!r}: use best (the epoch with the lowest valid CE) or last.")
    return value


def _valid_scores(history: tp.Sequence[dict], metric: tp.Optional[str]) -> tp.List[tp.Optional[float]]:
    return [(entry.get('valid') or {}).get(metric) for entry in history] if metric else []


def best_state_kept(history: tp.Sequence[dict], metric: tp.Optional[str]) -> bool:
    """Whether AudioCraft's best state holds a validated epoch: it compares with min() of the scores so far, which a
    NaN (or missing) first score keeps NaN, so it never moves past its initial state."""
    scores = _valid_scores(history, metric)
    return bool(scores) and scores[0] is not None and math.isfinite(scores[0])


def exported_epoch(history: tp.Sequence[dict], metric: tp.Optional[str], best: bool) -> dict:
    """What adapter_config.json records about the exported state: `epoch` (1-based; the last epoch whose `valid`
    stage reached the lowest `metric`, as AudioCraft's best_state keeps the latest of equal scores), `last_epoch`,
    `selected_by`."""
    last = len(history)
    scores = _valid_scores(history, metric)
    if best and any(score is not None for score in scores):
        if not best_state_kept(history, metric):
            return {'epoch': last, 'last_epoch': last,
                    'selected_by': f'last epoch (epoch 1 had no finite valid {metric}: no best state was kept)'}
        low = min(score for score in scores if score is not None and math.isfinite(score))
        epoch = max(i + 1 for i, score in enumerate(scores) if score == low)
        return {'epoch': epoch, 'last_epoch': last, 'selected_by': f'lowest valid {metric} ({low:.4f})'}
    return {'epoch': last, 'last_epoch': last, 'selected_by': 'last epoch'}


def check_restorable(state: dict, base: BaseFingerprint, adapter: torch.nn.Module) -> None:
    """Before any tensor is loaded: the checkpoint's base (fingerprint) and adapter shapes are this run's, or a
    UserError says which differ and what to do (AudioCraft would stop on the first tensor with a size mismatch)."""
    if state.get('base'):
        base.load_state_dict(state['base'])
    expected = {name: tuple(t.shape) for name, t in adapter.state_dict().items()}
    for where, tensors in (('model', state.get('model')), ('best_state', (state.get('best_state') or {}).get('model'))):
        for name, tensor in (tensors or {}).items():
            if name in expected and tuple(tensor.shape) != expected[name]:
                raise UserError(
                    f"The checkpoint's adapter doesn't fit this run: {where} {name} is {tuple(tensor.shape)}, this "
                    f"run's is {expected[name]}. It was trained with other LoRA settings (lora.rank, lora.targets) "
                    "or on a base of other dimensions. Resume with the settings and base it was trained with, or "
                    "start a new XP (without continue_from, or with another signature).")


@contextlib.contextmanager
def continue_from_named(continue_from: tp.Optional[str]) -> tp.Iterator[None]:
    """AudioCraft's RuntimeError for a continue_from that resolves to no checkpoint, as a UserError with the forms."""
    try:
        yield
    except RuntimeError as exc:
        if not str(exc).startswith('Could not resolve continue_from'):
            raise
        raise UserError(f"continue_from={continue_from}: no checkpoint there. Give `//sig/<sig>` (an XP in the runs' "
                        "folder, `<checkout>/outputs/xps/<sig>` by default), an XP folder, or a checkpoint.th "
                        "path.") from exc
