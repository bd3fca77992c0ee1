"""A non-finite loss or gradient norm is caught before `optimizer.step()`: the step is skipped and counted, and too
many in a row stop training with a message naming the fixes.

NaN is injected with the `nan_loss` fault (audiocraft_lora/faults.py: the real training loss times NaN, graph kept),
in-process on a solver built through dora, and in a real `dora run` subprocess.
"""
import copy
import json

import pytest
import torch

from audiocraft_lora.guards import TrainingDivergedError
from helpers import DEBUG_ARGS, build_solver, run_dora

FAULT = 'AUDIOCRAFT_LORA_FAULT'


def _enter_train(solver):
    solver.model.cfg_dropout.p = 0.0  # CFG dropout may drop every condition of a tiny batch: keep all here
    solver.model.train()
    solver._current_stage = 'train'  # as flashy's run_stage('train', ...) does, so solver.is_training holds
    return iter(solver.dataloaders['train'])


def _assert_same(a, b, path='state'):
    """Recursive exact equality of nested containers of tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} changed"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_a_nan_step_is_skipped_before_the_optimizer_and_counted(dora_dir, monkeypatch, caplog):
    solver, _ = build_solver(DEBUG_ARGS)
    loader = _enter_train(solver)
    try:
        solver.run_step(0, next(loader), {})  # a good step first, so Adam has moments and the scheduler moved
        adapter = copy.deepcopy(solver.adapter.state_dict())
        optimizer = copy.deepcopy(solver.optimizer.state_dict())
        scheduler = copy.deepcopy(solver.lr_scheduler.state_dict())
        assert optimizer['state'], "the optimizer should have state after one step"

        monkeypatch.setenv(FAULT, 'nan_loss:step=1')
        with caplog.at_level('WARNING'):
            metrics = solver.run_step(1, next(loader), {})  # AudioCraft alone raises "Model probably diverged."
        assert set(metrics) == {'lr'}, "ce/ppl/grad_norm of a skipped step must not enter the epoch averages"
        _assert_same(adapter, solver.adapter.state_dict(), 'adapter')
        _assert_same(optimizer, solver.optimizer.state_dict(), 'optimizer')
        _assert_same(scheduler, solver.lr_scheduler.state_dict(), 'lr_scheduler')
        assert all(p.grad is None or not p.grad.any() for p in solver.adapter.parameters()), "grads not cleared"
        assert all(torch.isfinite(p).all() for p in solver.adapter.parameters())
        assert 'Skipped optimizer step at epoch 1 step 1: non-finite loss' in caplog.text
        assert solver.nonfinite_guard.total == 1 and solver.nonfinite_guard.consecutive == 1
        assert solver.state_dict()['nonfinite'] == {'skipped_steps': 1, 'consecutive': 1}

        metrics = solver.run_step(2, next(loader), {})  # the next good step trains again and resets the run
        assert torch.isfinite(metrics['ce']) and torch.isfinite(metrics['grad_norm'])
        changed = [k for k, v in solver.adapter.state_dict().items() if not torch.equal(v, adapter[k])]
        assert changed, "a good step after a skipped one must update the adapter"
        assert solver.state_dict()['nonfinite'] == {'skipped_steps': 1, 'consecutive': 0}
        assert solver.lr_scheduler.state_dict()['last_epoch'] == scheduler['last_epoch'] + 1
    finally:
        solver._current_stage = None


def test_the_count_survives_a_checkpoint_round_trip(dora_dir, monkeypatch):
    solver, _ = build_solver(DEBUG_ARGS)
    loader = _enter_train(solver)
    monkeypatch.setenv(FAULT, 'nan_loss:step=0')
    try:
        solver.run_step(0, next(loader), {})
    finally:
        solver._current_stage = None
    state = solver.state_dict()
    other, _ = build_solver(DEBUG_ARGS)
    assert other.nonfinite_guard.total == 0
    other.load_state_dict(state)
    assert (other.nonfinite_guard.total, other.nonfinite_guard.consecutive) == (1, 1)


def test_max_consecutive_bad_steps_stop_with_a_message_naming_the_fixes(dora_dir, monkeypatch):
    solver, _ = build_solver(DEBUG_ARGS + ['nonfinite.max_consecutive=3'])
    initial = copy.deepcopy(solver.adapter.state_dict())
    loader = _enter_train(solver)
    monkeypatch.setenv(FAULT, 'nan_loss')  # every step
    try:
        solver.run_step(0, next(loader), {})
        solver.run_step(1, next(loader), {})
        with pytest.raises(TrainingDivergedError) as info:
            solver.run_step(2, next(loader), {})
    finally:
        solver._current_stage = None
    message = str(info.value)
    assert '3 optimizer steps in a row had a non-finite loss' in message
    assert 'optim.lr=' in message and 'check the data' in message and 'nonfinite.max_consecutive' in message
    _assert_same(initial, solver.adapter.state_dict(), 'adapter')  # not one bad update went through
    assert solver.optimizer.state_dict()['state'] == {}, "the optimizer never stepped"


def test_dora_run_skips_counts_then_stops_cleanly(tmp_path, monkeypatch):
    """One NaN step in epoch 1 (skipped, counted in history and checkpoint), then NaN every step of epoch 2: exit 2."""
    args = ['solver=musicgen/lora_debug', 'optim.epochs=3', 'optim.updates_per_epoch=3', 'nonfinite.max_consecutive=2',
            'dataset.valid.num_samples=4', 'dataset.evaluate.num_samples=2', 'generate.every=100']
    monkeypatch.setenv(FAULT, 'nan_loss:epoch=1,step=1;nan_loss:epoch=2')
    proc = run_dora(args, tmp_path / 'outputs')
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'error: Training stopped at epoch 2, step 1: 2 optimizer steps in a row' in proc.stderr
    assert 'Traceback' not in proc.stderr
    folder = next(p for p in (tmp_path / 'outputs' / 'xps').iterdir() if p.is_dir())
    history = json.loads((folder / 'history.json').read_text())
    assert len(history) == 1
    assert history[0]['train']['skipped_steps'] == 1 and history[0]['train']['skipped_steps_total'] == 1
    assert all(v == v for v in history[0]['train'].values()), f"NaN in the epoch averages: {history[0]['train']}"
    ckpt = torch.load(folder / 'checkpoint.th', weights_only=True)
    assert ckpt['nonfinite'] == {'skipped_steps': 1, 'consecutive': 0}
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert all(torch.isfinite(v).all() for group in ckpt['optimizer']['state'].values() for v in group.values())


def test_with_a_grad_scaler_a_nan_step_is_skipped_and_the_scale_lowered(dora_dir, monkeypatch):
    """The fp16 path (GradScaler), exercised on CPU: the guard replaces `scaler.step`, AudioCraft's
    `scaler.update()` still runs and backs the scale off."""
    solver, _ = build_solver(DEBUG_ARGS)
    solver.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)  # what build_model sets for fp16 on CUDA
    loader = _enter_train(solver)
    try:
        solver.run_step(0, next(loader), {})
        assert solver.optimizer.state_dict()['state'], "a good step goes through the scaler to the optimizer"
        adapter = copy.deepcopy(solver.adapter.state_dict())
        optimizer = copy.deepcopy(solver.optimizer.state_dict())
        scale = solver.scaler.get_scale()
        monkeypatch.setenv(FAULT, 'nan_loss:step=1')
        metrics = solver.run_step(1, next(loader), {})
    finally:
        solver._current_stage = None
    assert set(metrics) == {'lr'}
    _assert_same(adapter, solver.adapter.state_dict(), 'adapter')
    _assert_same(optimizer, solver.optimizer.state_dict(), 'optimizer')
    assert solver.scaler.get_scale() == scale * solver.scaler.get_backoff_factor()
    assert solver.nonfinite_guard.consecutive == 1  # a NaN loss is not an fp16 overflow: it counts
    assert 'step' not in vars(solver.scaler) and 'step' not in vars(solver.lr_scheduler)  # overrides removed


def test_a_skipped_step_does_not_move_the_ema(dora_dir, monkeypatch):
    solver, _ = build_solver(DEBUG_ARGS + ['optim.ema.use=true', 'optim.ema.updates=1', 'optim.ema.decay=0.5'])
    assert solver.ema is not None
    loader = _enter_train(solver)
    try:
        solver.run_step(0, next(loader), {})
        solver.ema.step()  # as StandardSolver.common_train_valid does after every run_step
        ema = copy.deepcopy(solver.ema.state_dict())
        monkeypatch.setenv(FAULT, 'nan_loss:step=1')
        solver.run_step(1, next(loader), {})
        solver.ema.step()
        _assert_same(ema, solver.ema.state_dict(), 'ema')
        monkeypatch.delenv(FAULT)
        solver.run_step(2, next(loader), {})
        solver.ema.step()
    finally:
        solver._current_stage = None
    moved = [k for k, v in solver.ema.state_dict()['state']['model'].items()
             if not torch.equal(v, ema['state']['model'][k])]
    assert moved, "the EMA must update again after a good step"
