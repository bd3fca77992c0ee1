"""2-process DDP on CPU (gloo) through the entry point users run: `dora run -d --ddp_workers 2 ...`.

dora's `-d` starts one `python -m dora run` per rank with RANK/WORLD_SIZE/MASTER_ADDR set (dora/executor.py); on a
machine without GPUs `--ddp_workers` gives the count, and audiocraft_lora/train.py picks the gloo backend (dora's
default, nccl, asserts on CPU). AudioCraft divides `dataset.batch_size` by the world size, so both runs below train
on global batches of 4. Every source of per-process randomness that would legitimately make the two runs differ is
turned off (LoRA dropout, CFG dropout, MusicDataset's text merge/drop, shuffling; 3 s segments read whole, so no clip
is padded and each rank's mean loss has the same number of tokens): what remains is the order of float reductions.
"""
import json
from pathlib import Path
import re

import torch

from helpers import run_dora

FAULT = 'AUDIOCRAFT_LORA_FAULT'
ARGS = ['solver=musicgen/lora_debug', 'optim.epochs=1', 'optim.updates_per_epoch=4', 'schedule.cosine.warmup=2',
        'lora.dropout=0',
        '+base_overrides.classifier_free_guidance.training_dropout=0', 'dataset.train.shuffle=false',
        'dataset.train.merge_text_p=0', 'dataset.train.drop_desc_p=0', 'dataset.train.drop_other_p=0',
        'dataset.segment_duration=3', 'dataset.min_segment_ratio=1.0', 'dataset.valid.num_samples=4',
        'dataset.evaluate.num_samples=2', 'dataset.generate.num_samples=2', 'generate.every=100',
        'generate.lm.gen_duration=1', 'generate.lm.prompt_duration=0.5']
DIGEST = re.compile(r'Adapter digest after epoch (\d+) on rank (\d) of (\d): ([0-9a-f]{40})')


def _xp_folder(dora_dir: Path) -> Path:
    xps = [p for p in (dora_dir / 'xps').iterdir() if p.is_dir()]
    assert len(xps) == 1, xps
    return xps[0]


def test_two_process_ddp_keeps_ranks_identical_and_matches_one_process(tmp_path, monkeypatch):
    # a NaN loss on rank 1 only, at step 1: both ranks must skip that step together (the flag is all-reduced)
    monkeypatch.setenv(FAULT, 'nan_loss:epoch=1,step=1,rank=1')
    proc = run_dora(['-d', '--ddp_workers', '2'] + ARGS, tmp_path / 'ddp')
    ddp = _xp_folder(tmp_path / 'ddp')
    worker_log = (ddp / 'worker_1.log').read_text() if (ddp / 'worker_1.log').exists() else ''
    assert proc.returncode == 0, proc.stderr[-3000:] + worker_log[-3000:]

    logs = {rank: (ddp / f'solver.log.{rank}').read_text() for rank in (0, 1)}
    digests = {rank: DIGEST.findall(log) for rank, log in logs.items()}
    assert [d[:3] for d in digests[0]] == [('1', '0', '2')] and [d[:3] for d in digests[1]] == [('1', '1', '2')]
    assert digests[0][0][3] == digests[1][0][3], "the adapters of the two ranks differ"
    for log in logs.values():
        assert 'Skipped optimizer step at epoch 1 step 1: non-finite loss on 1 of 2 rank(s)' in log

    monkeypatch.setenv(FAULT, 'nan_loss:epoch=1,step=1')
    proc = run_dora(ARGS, tmp_path / 'single')
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = _xp_folder(tmp_path / 'single')

    a = torch.load(ddp / 'checkpoint.th', weights_only=True)
    b = torch.load(single / 'checkpoint.th', weights_only=True)
    assert a['nonfinite']['skipped_steps'] == b['nonfinite']['skipped_steps'] == 1
    steps = {float(ckpt['optimizer']['state'][0]['step']) for ckpt in (a, b)}
    assert steps == {3.0}, steps  # 4 steps, 1 skipped
    # LoRA B starts at zero: after 3 updates of lr <= 5e-4 its entries are ~1e-3. Adam divides by sqrt(v), so
    # float-reduction noise on near-zero gradients shows up as ~1e-5 differences; a real desync would be ~1e-3.
    moved = [k for k in b['model'] if '.lora_B.' in k and b['model'][k].abs().max() > 5e-4]
    assert len(moved) == len([k for k in b['model'] if '.lora_B.' in k]), "the adapter did not train"
    for key in b['model']:
        torch.testing.assert_close(a['model'][key], b['model'][key], rtol=1e-3, atol=3e-5, msg=key)
    train_a = json.loads((ddp / 'history.json').read_text())[0]['train']
    train_b = json.loads((single / 'history.json').read_text())[0]['train']
    assert abs(train_a['ce'] - train_b['ce']) < 1e-4, (train_a['ce'], train_b['ce'])


def test_base_overrides_reach_the_trained_model(dora_dir):
    """The comparison above needs CFG dropout off; `base_overrides` must reach the LM, not only the config."""
    from helpers import DEBUG_ARGS, build_solver
    solver, _ = build_solver(DEBUG_ARGS + ['+base_overrides.classifier_free_guidance.training_dropout=0'])
    assert solver.model.cfg_dropout.p == 0.0
    default, _ = build_solver(DEBUG_ARGS)
    assert default.model.cfg_dropout.p == 0.3  # the debug base's own value
