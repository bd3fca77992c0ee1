"""The LoRA solver built through dora, as `dora run solver=musicgen/lora_debug` builds it."""
import copy
import io
from pathlib import Path
import sys

import pytest
import torch

from audiocraft_lora.errors import BaseModelError, LoRAConfigError
from audiocraft_lora.lora import canonical_name
from helpers import DEBUG_ARGS, build_solver

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from cuda_checks import fit_one_batch  # noqa: E402


def _train_steps(solver, n: int) -> None:
    solver.model.cfg_dropout.p = 0.0  # CFG dropout may drop every condition of a tiny batch: keep all here
    loader = iter(solver.dataloaders['train'])
    solver.model.train()
    solver._current_stage = 'train'  # as flashy's run_stage('train', ...) does, so solver.is_training holds
    try:
        for idx in range(n):
            metrics = solver.run_step(idx, next(loader), {})
            assert torch.isfinite(metrics['ce'])
    finally:
        solver._current_stage = None


def test_three_steps_change_only_the_adapter(dora_dir):
    solver, _ = build_solver(DEBUG_ARGS)
    before = copy.deepcopy(solver.model.state_dict())
    _train_steps(solver, 3)
    after = solver.model.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter_keys = {k for k in before if '.lora_A.' in k or '.lora_B.' in k}
    assert changed, "nothing was trained"
    assert changed <= adapter_keys, f"frozen weights changed: {sorted(changed - adapter_keys)[:5]}"
    # every LoRA B (zero at init) got gradient and moved, in both self- and cross-attention
    moved_b = {k for k in changed if '.lora_B.' in k}
    moved_b = {canonical_name(k) for k in moved_b}  # model keys depend on lora.fast_path; canonical ones don't
    assert any('self_attn.in_proj.lora_B' in k for k in moved_b)
    assert any('cross_attention.in_proj.lora_B' in k for k in moved_b)
    # the optimizer only knows the adapter
    optimized = {id(p) for group in solver.optimizer.param_groups for p in group['params']}
    assert optimized == {id(p) for p in solver.adapter.parameters()}


def test_bf16_autocast_stores_the_frozen_base_in_bf16_trains_and_restores(dora_dir, caplog):
    """autocast_dtype=bfloat16 (every GPU recipe): the frozen base is stored in bf16 (lora.base_dtype=auto), and
    AudioCraft's model-hash log lines (read through numpy, which has no bfloat16) in __init__ and restore still work
    (both crashed on a GPU)."""
    import logging
    from audiocraft.solvers import base
    original_hash = base.model_hash
    with caplog.at_level(logging.INFO):
        solver, _ = build_solver(DEBUG_ARGS + ['autocast=true', 'autocast_dtype=bfloat16'])
        solver.restore()  # no checkpoint yet: loads nothing, logs the hash
    assert caplog.text.count('Model hash: ') == 2
    assert base.model_hash is original_hash  # AudioCraft's function is back
    frozen = {name: p.dtype for name, p in solver.model.transformer.named_parameters() if not p.requires_grad
              and p.ndim == 2}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen
    assert all(p.dtype == torch.float32 for p in solver.adapter.parameters())
    before = copy.deepcopy(solver.model.state_dict())
    _train_steps(solver, 2)
    changed = {k for k, v in solver.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all('.lora_A.' in k or '.lora_B.' in k for k in changed)


def test_checkpoint_holds_no_base_weight_and_loads_weights_only(dora_dir):
    solver, _ = build_solver(DEBUG_ARGS + ['lora.rank=2', 'lora.alpha=4'])
    _train_steps(solver, 1)
    state = solver.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    size = buffer.tell()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # torch >= 2.6 default: no pickled OmegaConf objects

    base_tensors = {k: v for k, v in solver.model.state_dict().items() if '.lora_' not in k}
    base_bytes = sum(v.numel() * v.element_size() for v in base_tensors.values())

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    base_shapes = {tuple(v.shape) for v in base_tensors.values() if v.numel() > 64}
    adapter_keys = set(solver.adapter.state_dict())
    assert set(loaded['model']) == adapter_keys
    assert not any(k for k in loaded['model'] if '.lora_' not in k)
    big = [t for t in tensors(loaded) if t.numel() > 64]
    assert not any(tuple(t.shape) in base_shapes and t.numel() > 4096 for t in big), "a base weight leaked"
    assert size < 0.35 * base_bytes, (size, base_bytes)
    assert loaded['base']['fingerprint'] == solver.base_fingerprint


def test_checkpoint_of_another_base_is_refused(dora_dir):
    solver, _ = build_solver(DEBUG_ARGS)
    state = solver.state_dict()
    state['base']['fingerprint'] = 'f' * 64
    with pytest.raises(BaseModelError, match='was trained on base'):
        solver.load_state_dict(state)


def test_padding_is_masked_by_default(dora_dir):
    solver, _ = build_solver(DEBUG_ARGS)
    assert solver.cfg.tokens.padding_with_special_token is True


@pytest.mark.parametrize('args, error, match', [
    (['lora.rank=0'], LoRAConfigError, 'lora.rank must be a positive integer'),
    (['lora.targets=[self_attn.in_proj,attention.q]'], LoRAConfigError, 'Unknown LoRA target'),
    (['base_model=/nonexistent/musicgen-small'], BaseModelError, "can't be found"),
    (['base_model=facebook/musicgen-nonexistent-xyz'], BaseModelError, 'not in the local Hugging Face cache'),
    (['generate.lm.unprompted_samples=false'], LoRAConfigError,  # AudioCraft: UnboundLocalError rtf, after epoch 1
     r'prompted_samples=true needs generate.lm.unprompted_samples=true'),
])
def test_bad_configuration_fails_before_training(dora_dir, args, error, match, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(error, match=match):
        build_solver(DEBUG_ARGS + args)


def test_fsdp_is_refused_with_what_to_use_instead(dora_dir):
    with pytest.raises(BaseModelError, match=r'fsdp.use=true is not supported with LoRA.*dora run -d'):
        build_solver(DEBUG_ARGS + ['fsdp.use=true'])


def test_warmup_as_long_as_training_is_refused_before_any_step(dora_dir):
    # lora_debug warms up for 4 updates: 1 epoch x 4 updates would divide by zero in AudioCraft's cosine schedule
    with pytest.raises(LoRAConfigError, match=r'schedule.cosine.warmup=4 but training has 4 updates.*divide by zero'):
        build_solver(DEBUG_ARGS + ['optim.epochs=1', 'optim.updates_per_epoch=4'])


def test_generate_stage_with_no_samples_asked_makes_none(dora_dir):
    """AudioCraft's generate stage ends in `UnboundLocalError: rtf` when it is asked for no samples."""
    no_samples = ['generate.lm.unprompted_samples=false', 'generate.lm.prompted_samples=false']
    solver, _ = build_solver(DEBUG_ARGS + no_samples)
    assert set(solver.run_stage('generate', solver.generate_audio)) == {'duration'}  # flashy's own metric


@pytest.mark.parametrize('overrides', [['autocast=false'], ['autocast=true', 'autocast_dtype=bfloat16',
                                                             'lora.fused_optimizer=true',
                                                             'lora.keep_merged_weights=true']],
                         ids=['cpu-defaults', 'gpu-defaults'])
def test_steps_on_one_batch_fit_it(dora_dir, overrides):
    """The adapter learns: 20 steps on one fixed batch lower its cross-entropy well below where it started, with the
    solver's CPU settings and with what it picks on a GPU (bf16 autocast, fused AdamW, merged weights kept, shared
    adapter casts). A wiring bug that trains nothing (stale adapter copies in forward, gradients to the wrong tensors)
    leaves the loss where it was. (benchmarks/cuda_checks.py runs the same on CUDA.)"""
    ces = fit_one_batch(['device=cpu'] + overrides)
    assert ces[-1] < 0.92 * ces[0], ces


def test_every_speed_setting_is_in_the_recipes_and_outside_the_xp_signature():
    """A `lora.*` speed key missing from lora_default.yaml can't be overridden (Hydra struct); one missing from
    dora.exclude would give the same training a new XP (and no resume) when only its speed changes."""
    from dataclasses import fields
    from omegaconf import OmegaConf
    from audiocraft_lora.checkout import CONFIG_DIR
    from audiocraft_lora.speed import SpeedSettings
    declared = OmegaConf.load(CONFIG_DIR / 'solver' / 'musicgen' / 'lora_default.yaml').lora
    excluded = set(OmegaConf.load(CONFIG_DIR / 'config.yaml').dora.exclude)
    for field in fields(SpeedSettings):
        assert field.name in declared and f'lora.{field.name}' in excluded, field.name


def test_resume_keeps_this_runs_optimizer_kernel_not_the_checkpoints(dora_dir):
    """lora.fused_optimizer may change between resumes (a CPU checkpoint resumed on a GPU): torch's
    Optimizer.load_state_dict would otherwise bring back the checkpoint's foreach/fused flags."""
    written, _ = build_solver(DEBUG_ARGS + ['lora.fused_optimizer=false'])
    _train_steps(written, 1)
    state = written.state_dict()
    resumed, _ = build_solver(DEBUG_ARGS + ['lora.fused_optimizer=true'])
    resumed.load_state_dict(state)
    group = resumed.optimizer.param_groups[0]
    assert group['fused'] is True and not group['foreach']
    assert resumed.optimizer.state_dict()['state'][0]['step'] == 1  # what was learned did come back
    _train_steps(resumed, 1)  # and the fused kernel steps with it


def test_cuda_generator_is_saved_per_device_and_restored_on_each_ranks_own(monkeypatch):
    """Rank 0 writes the checkpoint; rank r trains on cuda:r, whose generator moved like rank 0's cuda:0 (same seed,
    same draws). Saving every device's state from rank 0 would restore untouched generators on ranks >= 1."""
    from audiocraft_lora.checkpointing import RandomState
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': torch.tensor([7, 7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda s, device='cuda': calls.append(('device', s.tolist())))
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: calls.append(('all', len(states))))
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    source = RandomState(torch.nn.Module())
    state = source.state_dict()
    assert state['cuda_device'].tolist() == [7, 7] and 'cuda' not in state
    source.load_state_dict(state)
    old = dict(state, cuda=[torch.zeros(2, dtype=torch.uint8)] * 2)  # a checkpoint written before
    del old['cuda_device']
    source.load_state_dict(old)
    assert calls == [('device', [7, 7]), ('all', 2)]
