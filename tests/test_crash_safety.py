"""kill -9 at several points of a real `dora run`, unreadable checkpoints and `checkpoint.keep_last`.

The kills are the `kill@...` faults of audiocraft_lora/faults.py (the process SIGKILLs itself at a chosen point, no
cleanup runs). After each, the same command is simply run again, as a user (or a preempted job) would: it must
resume, never load a partial or corrupt checkpoint, and end with the history and adapter of an uninterrupted run.
"""
import json
from pathlib import Path
import shutil
import signal
import struct
import zipfile

import pytest
import torch

from audiocraft_lora import checkpointing
from helpers import run_dora

FAULT = 'AUDIOCRAFT_LORA_FAULT'
ARGS = ['solver=musicgen/lora_debug', 'optim.epochs=3', 'optim.updates_per_epoch=3', 'checkpoint.save_every=1',
        'checkpoint.keep_last=2', 'dataset.valid.num_samples=4', 'dataset.evaluate.num_samples=2', 'generate.every=100',
        'dataset.generate.num_samples=1', 'generate.lm.gen_duration=1', 'generate.lm.prompt_duration=0.5']
DETERMINISTIC_KEYS = ('ce', 'ppl', 'lr', 'grad_norm', 'ce_q1', 'ce_q4', 'skipped_steps')


def _xp_folder(dora_dir: Path) -> Path:
    xps = [p for p in (dora_dir / 'xps').iterdir() if p.is_dir()]
    assert len(xps) == 1, xps
    return xps[0]


def _numbers(folder: Path):
    history = json.loads((folder / 'history.json').read_text())
    return [{stage: {k: v for k, v in metrics.items() if k in DETERMINISTIC_KEYS}
             for stage, metrics in epoch.items() if stage in ('train', 'valid')} for epoch in history]


def _log(proc) -> str:
    return proc.stdout + proc.stderr


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def _flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor of a torch checkpoint (a zip archive): silent bit rot."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack('<HH', data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the local header's extra field pads for alignment
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _run(dora_dir: Path, monkeypatch, fault: str = '', args=ARGS):
    if fault:
        monkeypatch.setenv(FAULT, fault)
    else:
        monkeypatch.delenv(FAULT, raising=False)
    return run_dora(list(args), dora_dir)


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    dora_dir = tmp_path_factory.mktemp('reference') / 'outputs'
    proc = run_dora(ARGS, dora_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _xp_folder(dora_dir)


def test_keep_last_bounds_the_epoch_checkpoints_on_disk(reference):
    assert sorted(p.name for p in reference.glob('checkpoint_*.th')) == ['checkpoint_2.th', 'checkpoint_3.th']
    assert (reference / 'checkpoint.th').exists()
    assert not list(reference.glob('*.tmp')) and not list(reference.glob('.*.tmp'))
    latest, last_epoch = _checkpoint(reference / 'checkpoint.th'), _checkpoint(reference / 'checkpoint_3.th')
    assert all(torch.equal(latest['model'][k], last_epoch['model'][k]) for k in latest['model'])
    assert len(latest['history']) == 3


def test_kill_9_and_unreadable_checkpoints_then_rerun_resumes_to_the_uninterrupted_history(tmp_path, monkeypatch,
                                                                                          reference):
    """One XP, seven runs of the same command: three kill -9s, a refusal, a fallback; the end equals `reference`."""
    dora_dir = tmp_path / 'outputs'

    # 1. killed in the middle of a training step of epoch 2: epoch 1's checkpoint is what's on disk
    proc = _run(dora_dir, monkeypatch, 'kill@train_step:epoch=2,step=1')
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    folder = _xp_folder(dora_dir)
    latest = folder / 'checkpoint.th'
    assert len(_checkpoint(latest)['history']) == 1

    # 2. rerun, killed while checkpoint.th of epoch 2 is being written: the old one is intact, a temp file is left
    proc = _run(dora_dir, monkeypatch, 'kill@checkpoint_write:epoch=2,file=checkpoint.th')
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "Loading existing checkpoint" in _log(proc)
    assert len(_checkpoint(latest)['history']) == 1
    leftovers = list(folder.glob('.checkpoint.th.*.tmp'))
    assert len(leftovers) == 1, sorted(p.name for p in folder.iterdir())

    # 3. rerun, killed right after checkpoint.th of epoch 3 is in place (before the epoch copy and history.json)
    proc = _run(dora_dir, monkeypatch, 'kill@checkpoint_saved:epoch=3')
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert f'Removing {leftovers[0]}' in _log(proc), "the partial write must be cleaned up, never loaded"
    assert not leftovers[0].exists()
    assert len(_checkpoint(latest)['history']) == 3
    assert len(json.loads((folder / 'history.json').read_text())) == 2  # dora's history is one epoch behind

    # 4. rerun without faults: nothing left to train, history.json caught up, adapter exported
    proc = _run(dora_dir, monkeypatch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Train | Epoch' not in _log(proc)  # no training step ran (the summaries are only replayed)
    assert (folder / 'adapter' / 'adapter_model.safetensors').exists()
    _assert_same_as_reference(folder, reference, best_state=True)

    # 5. a checkpoint.th cut short (disk full, a copy interrupted by hand...) and no epoch checkpoint to fall back
    #    on: refused, naming the fix, the evidence left in place
    assert sorted(p.name for p in folder.glob('checkpoint_*.th')) == ['checkpoint_1.th', 'checkpoint_2.th']
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    corrupt_bytes = latest.read_bytes()
    _flip_a_tensor_byte(folder / 'checkpoint_2.th')  # silent bit rot in the newest epoch checkpoint
    assert 'CRC mismatch' in checkpointing.unreadable(folder / 'checkpoint_2.th')
    aside = tmp_path / 'aside'
    aside.mkdir()
    for path in folder.glob('checkpoint_*.th'):
        shutil.move(str(path), aside / path.name)
    proc = _run(dora_dir, monkeypatch)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f'error: Checkpoint {latest} is unreadable' in proc.stderr
    assert 'restart this XP from epoch 1' in proc.stderr and 'Traceback' not in proc.stderr
    assert latest.read_bytes() == corrupt_bytes

    # 6. with the epoch checkpoints back: checkpoint_2.th is damaged too, so training resumes from checkpoint_1.th
    #    (with a warning), redoes epochs 2 and 3, and ends exactly where the uninterrupted run did
    for path in aside.iterdir():
        shutil.move(str(path), folder / path.name)
    proc = _run(dora_dir, monkeypatch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoint_1.th" in _log(proc)
    assert (folder / 'checkpoint.th.corrupt').read_bytes() == corrupt_bytes
    _assert_same_as_reference(folder, reference)


def _assert_same_as_reference(folder: Path, reference: Path, best_state: bool = False) -> None:
    assert _numbers(folder) == _numbers(reference)
    ours, theirs = _checkpoint(folder / 'checkpoint.th'), _checkpoint(reference / 'checkpoint.th')
    assert all(torch.equal(ours['model'][k], theirs['model'][k]) for k in theirs['model'])
    if best_state:
        assert all(torch.equal(ours['best_state']['model'][k], theirs['best_state']['model'][k])
                   for k in theirs['best_state']['model'])
