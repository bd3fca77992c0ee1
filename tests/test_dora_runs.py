"""End-to-end: `dora run solver=musicgen/lora_debug` in a subprocess, export, and exact resume."""
import json
from pathlib import Path

import pytest
import torch

from helpers import conditioned_logits, run_dora

FAST = ['dataset.valid.num_samples=4', 'dataset.evaluate.num_samples=2', 'optim.updates_per_epoch=3',
        'generate.every=100']
DETERMINISTIC_KEYS = ('ce', 'ppl', 'lr', 'grad_norm', 'ce_q1', 'ce_q4')


def _xp_folder(dora_dir: Path) -> Path:
    xps = [p for p in (dora_dir / 'xps').iterdir() if p.is_dir()]
    assert len(xps) == 1, xps
    return xps[0]


def _history(folder: Path):
    return json.loads((folder / 'history.json').read_text())


def _numbers(history):
    return [{stage: {k: v for k, v in metrics.items() if k in DETERMINISTIC_KEYS}
             for stage, metrics in epoch.items() if stage in ('train', 'valid')} for epoch in history]


def test_lora_debug_end_to_end_exports_an_adapter_that_reloads(tmp_path):
    proc = run_dora(['solver=musicgen/lora_debug'], tmp_path / 'outputs')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Train |' in proc.stderr or 'Train |' in proc.stdout  # progress lines as it goes
    folder = _xp_folder(tmp_path / 'outputs')
    adapter_dir = folder / 'adapter'
    assert (adapter_dir / 'adapter_model.safetensors').exists()
    samples = list((folder / 'samples').rglob('*.wav'))
    assert samples, 'no generated samples'
    history = _history(folder)
    assert len(history) == 2 and 'generate' in history[-1]

    # the exported adapter, put on a fresh base, gives the same logits as the trained model's best state
    from audiocraft_lora import adapters, base_models
    from audiocraft_lora.lora import inject_lora, AdapterParameters
    adapter = adapters.load_adapter(adapter_dir)
    scores = [entry['valid']['ce'] for entry in history]
    best = max(i + 1 for i, score in enumerate(scores) if score == min(scores))
    assert (adapter.config['epoch'], adapter.config['last_epoch']) == (best, 2)
    assert adapter.config['selected_by'].startswith('lowest valid ce')
    base = base_models.resolve_base('debug')
    pkg = base_models.load_lm_package(base)
    adapters.check_base_matches(adapter, 'debug', base_models.fingerprint_state(pkg['best_state']))
    fresh = base_models.build_lm(pkg)
    inject_lora(fresh, adapter.settings)
    AdapterParameters(fresh).load_state_dict(adapter.state)

    ckpt = torch.load(folder / 'checkpoint.th', weights_only=True)
    trained = base_models.build_lm(pkg)
    inject_lora(trained, adapter.settings)
    AdapterParameters(trained).load_state_dict(ckpt['best_state']['model'])
    codes = torch.randint(0, 256, (2, 4, 20), generator=torch.Generator().manual_seed(1))
    prompts = ['trap beat', 'lofi hip hop']
    assert torch.equal(conditioned_logits(fresh, codes, prompts), conditioned_logits(trained, codes, prompts))
    untouched = base_models.build_lm(pkg)
    assert not torch.equal(conditioned_logits(untouched, codes, prompts), conditioned_logits(fresh, codes, prompts))


@pytest.mark.parametrize('precision', [[], ['autocast=true', 'autocast_dtype=bfloat16']], ids=['fp32', 'bf16'])
def test_stop_and_resume_reproduces_the_uninterrupted_history(tmp_path, precision):
    """(bf16 autocast: the fast path's adapter copies (adapter_casts) are refreshed after the restore.)"""
    args = ['solver=musicgen/lora_debug', 'optim.epochs=4'] + FAST + precision
    interrupted, straight = tmp_path / 'a', tmp_path / 'b'
    proc = run_dora(args + ['stop_at_epoch=2'], interrupted)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = _xp_folder(interrupted)
    assert len(_history(folder)) == 2
    proc = run_dora(args, interrupted)  # same XP signature: resumes from the checkpoint
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _xp_folder(interrupted) == folder
    proc = run_dora(args, straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, reference = _history(folder), _history(_xp_folder(straight))
    assert len(resumed) == len(reference) == 4
    assert _numbers(resumed) == _numbers(reference)
    # and the adapters are bit-identical
    a = torch.load(folder / 'checkpoint.th', weights_only=True)['model']
    b = torch.load(_xp_folder(straight) / 'checkpoint.th', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_config_exits_with_a_clear_message(tmp_path):
    proc = run_dora(['solver=musicgen/lora_debug', 'lora.rank=0'], tmp_path / 'outputs')
    assert proc.returncode == 2
    assert 'lora.rank must be a positive integer' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_execute_only_export_rewrites_the_adapter_of_the_same_finished_xp(tmp_path):
    import shutil
    args = ['solver=musicgen/lora_debug'] + FAST
    dora_dir = tmp_path / 'outputs'
    proc = run_dora(args, dora_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = _xp_folder(dora_dir)
    original = (folder / 'adapter' / 'adapter_model.safetensors').read_bytes()
    shutil.rmtree(folder / 'adapter')
    proc = run_dora(args + ['execute_only=export', 'execute_inplace=true'], dora_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _xp_folder(dora_dir) == folder  # execute_* are not in the signature: the same XP, not a new one
    assert (folder / 'adapter' / 'adapter_model.safetensors').read_bytes() == original
    assert len(_history(folder)) == 2  # nothing retrained
    # the last epoch's adapter instead of the best-valid one: the same XP, the checkpoint's current adapter
    proc = run_dora(args + ['execute_only=export', 'execute_inplace=true', 'export_state=last'], dora_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _xp_folder(dora_dir) == folder
    from audiocraft_lora import adapters
    last = adapters.load_adapter(folder / 'adapter')
    assert (last.config['epoch'], last.config['selected_by']) == (2, 'last epoch')
    current = torch.load(folder / 'checkpoint.th', weights_only=True)['model']
    assert set(last.state) and all(torch.equal(last.state[k], current[k].float()) for k in last.state)


def test_fused_adamw_under_bf16_autocast_trains_like_the_foreach_one(tmp_path):
    """The solver's optimizer on CUDA (`lora.fused_optimizer=auto`: torch's fused AdamW) with the fast path's adapter
    copies (adapter_casts): the fused kernel moves no version counter, and copies that missed its steps would train
    on stale adapters. Same data, same seed: the two runs' adapters differ only by the two kernels' rounding."""
    args = ['solver=musicgen/lora_debug', 'optim.epochs=2', 'autocast=true', 'autocast_dtype=bfloat16',
            'optim.lr=1e-2'] + FAST
    states = {}
    for fused in ('true', 'false'):
        proc = run_dora(args + [f'lora.fused_optimizer={fused}'], tmp_path / fused)
        assert proc.returncode == 0, proc.stderr[-3000:]
        states[fused] = torch.load(_xp_folder(tmp_path / fused) / 'checkpoint.th', weights_only=True)['model']
    moved = 0.0
    for key, value in states['false'].items():
        diff = float((states['true'][key].float() - value.float()).abs().max())
        assert diff <= 1e-3 * float(value.float().abs().max()) + 1e-6, (key, diff)
        moved = max(moved, float(value.float().abs().max()))
    assert moved > 0
