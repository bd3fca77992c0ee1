"""Peak-memory estimate before training (memory_estimate) and `lora.activation_checkpointing=auto`."""
import dataclasses
import logging

import pytest
import torch

from audiocraft_lora import memory_estimate, memory_plan
from audiocraft_lora.errors import LoRAConfigError, OutOfMemory
from audiocraft_lora.speed import SpeedSettings


def test_peak_tracker_counts_each_storage_while_it_lives():
    x = torch.ones(1000)  # made outside: not counted
    with memory_estimate.PeakTracker() as tracker:
        a = x * 2                      # 4000 B
        view = a.view(10, 100)         # same storage: nothing more
        b = a + 1                      # 8000 B live
        assert (tracker.current, tracker.peak) == (8000, 8000)
        del a, view                    # freed when the last reference goes
        assert tracker.current == 4000
        c = torch.empty(3000)          # 4000 + 12000
        del b, c
    assert (tracker.current, tracker.peak) == (0, 16000)
    with memory_estimate.PeakTracker(round_to=512) as rounded:
        _ = torch.empty(10)            # 40 B is a 512 B block for CUDA's allocator
    assert rounded.peak == 512


def test_patterns_built_before_the_estimate_still_build_their_indexes_on_real_tensors(monkeypatch):
    """AudioCraft's patterns bind their (cached) numpy index builders when created, here by valid_positions before the
    fake step. On CUDA the step then asks for indexes on 'cuda:0', not cached: they must still be built on real
    tensors (this failed on an H100). Emptying the caches after valid_positions gives the same miss on the CPU."""
    from audiocraft_lora import base_models
    lm = base_models.build_lm(base_models.load_lm_package(base_models.resolve_base('debug')))
    real_valid_positions = memory_estimate.valid_positions

    def valid_positions_then_miss(lm, batch, frames, device='cpu'):
        valid = real_valid_positions(lm, batch, frames, device)
        pattern = lm.pattern_provider.get_pattern(frames)
        pattern._build_pattern_sequence_scatter_indexes.cache_clear()
        pattern._build_reverted_sequence_scatter_indexes.cache_clear()
        return valid
    monkeypatch.setattr(memory_estimate, 'valid_positions', valid_positions_then_miss)
    estimate = memory_estimate.estimate_step(lm, None, memory_estimate.StepShape(2, 40), None)
    assert estimate.step > 0
    pattern = lm.pattern_provider.get_pattern(40)
    assert 'build_pattern_sequence' not in vars(pattern)  # nothing left patched on the instance or the class
    assert type(pattern).build_pattern_sequence.__qualname__ == 'Pattern.build_pattern_sequence'
    assert hasattr(pattern._build_pattern_sequence_scatter_indexes, 'cache_clear')  # its own cached builder back


def _shape(solver, cached: bool) -> memory_estimate.StepShape:
    duration = float(solver.cfg.dataset.segment_duration)
    cm = solver.compression_model
    return memory_estimate.StepShape(batch=int(solver.cfg.dataset.batch_size),
                                 frames=memory_plan.ceil_frames(duration, cm.frame_rate),
                                 samples=None if cached else int(duration * cm.sample_rate), channels=cm.channels)


def _real_lm_step_peak(solver) -> int:
    """Peak of what a real LM step creates (tokens given: the token-cache case), tracked the same way."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft_lora.loss import masked_cross_entropy
    lm, shape = solver.model, _shape(solver, cached=True)
    codes = torch.randint(0, lm.card, (shape.batch, lm.num_codebooks, shape.frames))
    attributes = [ConditioningAttributes(text={'description': memory_estimate.DESCRIPTION}) for _ in range(shape.batch)]
    tokenized = lm.condition_provider.tokenize(attributes)
    trainable = [p for p in lm.parameters() if p.requires_grad]
    lm.train()
    with memory_estimate.PeakTracker() as tracker:
        out = lm.compute_predictions(codes, [], lm.condition_provider(tokenized))
        ce, _ = masked_cross_entropy(out.logits, codes, out.mask)  # the solver's CE (loss.py)
        del out
        grads = torch.autograd.grad(ce, trainable)
        del ce, grads
    return tracker.peak


def _build(tmp_path_factory, dropout: float, *extra: str):
    from helpers import DEBUG_ARGS, build_solver
    from audiocraft_lora import train
    folder = tmp_path_factory.mktemp('outputs')
    old = train.main.dora.dir
    train.main.dora.dir = folder
    try:
        # long enough segments that the LM's activations, not EnCodec's encode, make the peak
        solver, _ = build_solver(DEBUG_ARGS + ['lora.memory_budget_gib=64', 'dataset.segment_duration=12',
                                               f'lora.dropout={dropout}', *extra])
    finally:
        train.main.dora.dir = old
    return solver


@pytest.fixture(scope='module')
def solver(tmp_path_factory):
    return _build(tmp_path_factory, 0.0)


def test_estimate_equals_a_real_step_for_every_plan(solver):
    """The fake-tensor trace creates exactly what the real step creates, whatever the checkpointing plan."""
    estimates = {}
    for plan in memory_plan.plans_for(solver.model):
        memory_plan.apply_plan(solver.model, plan)
        estimate = memory_estimate.estimate_step(solver.model, solver.compression_model, _shape(solver, cached=True),
                                             None)
        real = _real_lm_step_peak(solver)
        assert abs(estimate.step - real) <= 0.02 * real, (plan, estimate.step, real)
        estimates[plan] = estimate.peak
    peaks = [estimates[plan] for plan in memory_plan.plans_for(solver.model)]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks), peaks  # leaner and leaner
    memory_plan.apply_plan(solver.model, memory_plan.PLANS[0])


def test_the_plain_peft_path_is_estimated_too(tmp_path_factory):
    """lora.fast_path=false: peft re-parametrizes the fused q/k/v at every forward (in place, refused on fake tensors
    unless the estimate swaps it), and materialises W + BA, so it needs more than the fast path."""
    plain = _build(tmp_path_factory, 0.0, 'lora.fast_path=false')
    wrapped = dict(plain.model.named_parameters())
    estimate = memory_estimate.estimate_step(plain.model, None, _shape(plain, cached=True), None)
    real = _real_lm_step_peak(plain)
    assert abs(estimate.step - real) <= 0.02 * real, (estimate.step, real)
    assert all(p is wrapped[name] for name, p in plain.model.named_parameters())  # the real parameters are back
    assert not any(isinstance(p, torch._subclasses.fake_tensor.FakeTensor) for p in plain.model.parameters())


def test_estimate_counts_the_encode_and_changes_nothing(solver):
    params = {name: p.detach().clone() for name, p in solver.model.named_parameters()}
    rng = torch.get_rng_state()
    cached = memory_estimate.estimate_step(solver.model, solver.compression_model, _shape(solver, cached=True), None)
    encoded = memory_estimate.estimate_step(solver.model, solver.compression_model, _shape(solver, cached=False), None)
    assert encoded.step > cached.step  # EnCodec's encode of the batch (no token cache) is part of the step
    assert cached.resident == encoded.resident > sum(p.numel() * 4 for p in params.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in solver.model.parameters())
    assert all(torch.equal(p, params[name]) for name, p in solver.model.named_parameters())


def _plan(solver, budget_gib, mode='auto', replay=False):
    """Run the solver's planning again with these settings, batches as from a token cache (at this tiny scale the
    debug EnCodec's encode outweighs the LM's step; at MusicGen's the LM's does, up to whole-layer checkpointing)."""
    from omegaconf import open_dict
    with open_dict(solver.cfg):
        solver.cfg.cache.path, solver.cfg.cache.write = 'tokens', False
    solver.speed_settings = dataclasses.replace(solver.speed_settings, activation_checkpointing=mode,
                                                checkpoint_fraction=1.0, checkpoint_rest='none',
                                                dropout_replay=replay, memory_budget_gib=budget_gib)
    solver.memory_estimate = memory_plan.plan_training(solver)  # what build_model does
    return solver.speed_settings


def test_auto_takes_the_least_recompute_that_fits(solver):
    shape = _shape(solver, cached=True)
    peaks = []
    for plan in memory_plan.plans_for(solver.model):
        memory_plan.apply_plan(solver.model, plan)
        peaks.append(memory_estimate.estimate_step(solver.model, solver.compression_model, shape, None))
    plans = memory_plan.plans_for(solver.model)
    assert len(plans) == 4  # no LoRA dropout (lora.dropout=0): no replay rung
    for index, plan in enumerate(plans):
        budget_gib = memory_plan.needed(peaks[index]) / 2 ** 30 * 1.0001  # just enough for this plan
        settings = _plan(solver, budget_gib)
        assert (settings.activation_checkpointing, settings.checkpoint_fraction, settings.checkpoint_rest,
                settings.dropout_replay) == plan
        modes = [getattr(layer, '_lora_checkpointing', 'none') for layer in solver.model.transformer.layers]
        expected = {'none': ['none', 'none'], 'selective': ['selective', 'selective'],
                    'torch': ['torch', 'selective'] if plan[1] < 1 else ['none', 'none']}[plan[0]]
        assert modes == expected, (plan, modes)
        assert solver.model.transformer.checkpointing == ('torch' if plan[0] == 'torch' else 'none')
        assert solver.memory_estimate['plan'] == memory_plan.plan_name(plan)
    _plan(solver, 64)
    assert solver.speed_settings.activation_checkpointing == 'none'


def test_no_plan_fits_stops_before_training_with_the_batch_that_fits(solver):
    memory_plan.apply_plan(solver.model, memory_plan.PLANS[-1])
    leanest = memory_estimate.estimate_step(solver.model, solver.compression_model, _shape(solver, cached=True), None)
    budget_gib = memory_plan.needed(leanest) / 2 ** 30 * 0.999  # just short
    with pytest.raises(OutOfMemory, match=r'No checkpointing plan fits: rerun with dataset.batch_size=3 '):
        _plan(solver, budget_gib)
    _plan(solver, 64)


def test_an_explicit_plan_over_budget_is_warned_about(solver, caplog):
    with caplog.at_level(logging.WARNING):
        settings = _plan(solver, 1e-4, mode='selective')
    assert settings.activation_checkpointing == 'selective'  # the user's choice stays
    assert 'will likely run out of memory: lora.activation_checkpointing=auto' in caplog.text
    _plan(solver, 64)


def test_an_estimate_that_fails_leaves_training_unplanned_with_a_warning(solver, caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError('aten.some_op has no fake implementation')
    memory_plan.apply_plan(solver.model, memory_plan.PLANS[-1])  # a plan applied before the estimate broke
    monkeypatch.setattr(memory_plan, 'estimate_step', broken)
    with caplog.at_level(logging.WARNING):
        settings = _plan(solver, 1e-4)  # would stop with OutOfMemory if the estimate had run
    assert "Could not estimate the training step's peak memory (RuntimeError: aten.some_op" in caplog.text
    assert (settings.activation_checkpointing, settings.checkpoint_fraction, settings.checkpoint_rest) == \
        ('none', 1.0, 'none')
    assert solver.model.transformer.checkpointing == 'none'
    assert all(getattr(layer, '_lora_checkpointing', 'none') == 'none' for layer in solver.model.transformer.layers)
    assert solver.memory_estimate is None
    with caplog.at_level(logging.WARNING):
        assert _plan(solver, 1e-4, mode='selective').activation_checkpointing == 'selective'  # explicit: kept
    monkeypatch.undo()
    _plan(solver, 64)


def test_auto_is_none_where_there_is_no_budget(solver):
    assert memory_plan.device_budget('auto', 'cpu') is None
    assert memory_plan.device_budget('none', 'cuda') is None
    assert memory_plan.device_budget(1.5, 'cpu') == int(1.5 * 2 ** 30)
    settings = _plan(solver, 'auto')  # on the CPU: nothing to plan for
    assert settings.activation_checkpointing == 'none'


def test_bad_memory_settings_are_refused():
    with pytest.raises(LoRAConfigError, match='memory_budget_gib must be auto, none or a number'):
        SpeedSettings(memory_budget_gib='lots').validate()
    with pytest.raises(LoRAConfigError, match='memory_budget_gib must be'):
        SpeedSettings(memory_budget_gib=-2).validate()
    with pytest.raises(LoRAConfigError, match='auto chooses checkpoint_fraction'):
        SpeedSettings(activation_checkpointing='auto', checkpoint_fraction=0.5).validate()
    SpeedSettings(activation_checkpointing='auto', memory_budget_gib=24).validate()


def test_encoding_in_chunks_gives_the_same_tokens_at_a_fraction_of_the_peak(solver):
    from audiocraft_lora.encoding import ChunkedEncode, chunk_encoder, encode_in_chunks
    model = solver.compression_model
    assert isinstance(model.encode, ChunkedEncode) and model.encode.chunk == 0  # auto, planned for 64 GiB: all 4
    audio = torch.randn(5, model.channels, int(model.sample_rate))
    whole, _ = type(model).encode(model, audio)
    chunked, scale = encode_in_chunks(type(model).encode.__get__(model), 2, audio)  # 2 + 2 + 1 items
    assert scale is None and torch.equal(chunked, whole)
    peaks = {}
    for chunk in (0, 1):
        chunk_encoder(model, chunk)
        peaks[chunk] = memory_estimate.estimate_step(solver.model, model, _shape(solver, cached=False), None).step
    chunk_encoder(model, 4)
    assert peaks[1] < 0.5 * peaks[0], peaks  # batch 4 encoded one item at a time; the encode made the peak
    with pytest.raises(LoRAConfigError, match='lora.encode_chunk must be auto or a whole number'):
        SpeedSettings(encode_chunk=-1).validate()
    with pytest.raises(LoRAConfigError, match='lora.encode_chunk must be auto or a whole number'):
        SpeedSettings(encode_chunk='most').validate()
    SpeedSettings(encode_chunk='auto').validate()


def test_dora_run_stops_before_training_when_nothing_fits(dora_dir):
    from helpers import DEBUG_ARGS, run_dora
    proc = run_dora(DEBUG_ARGS + ['lora.memory_budget_gib=0.01'], dora_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.split('error: ', 1)[1]
    assert 'needs an estimated' in error and 'No checkpointing plan fits: rerun with a GPU with more memory' in error
    assert 'lora.memory_budget_gib=none to try anyway' in error
    assert 'Traceback' not in proc.stderr
    assert not list(dora_dir.rglob('checkpoint*.th'))  # stopped before any step


def test_with_lora_dropout_auto_first_replays_the_masks(tmp_path_factory):
    """With LoRA dropout, the rung after `none` keeps no dropout mask (fast path): less memory, same recompute."""
    from audiocraft_lora.fast_lora import FastLoraLinear
    solver = _build(tmp_path_factory, 0.1)
    plans = memory_plan.plans_for(solver.model)
    assert plans[:2] == [('none', 1.0, 'none', False), ('none', 1.0, 'none', True)]
    shape = _shape(solver, cached=True)
    estimates = []
    for plan in plans[:3]:
        memory_plan.apply_plan(solver.model, plan)
        estimates.append(memory_estimate.estimate_step(solver.model, solver.compression_model, shape, None))
    assert estimates[0].peak > estimates[1].peak > estimates[2].peak
    settings = _plan(solver, memory_plan.needed(estimates[1]) / 2 ** 30 * 1.0001)
    assert (settings.activation_checkpointing, settings.dropout_replay) == ('none', True)
    linears = [m for m in solver.model.modules() if isinstance(m, FastLoraLinear)]
    assert linears and all(m._lora_replay_dropout for m in linears)
    settings = _plan(solver, 64)  # room enough: masks kept, no extra dropout pass
    assert settings.dropout_replay is False and not any(m._lora_replay_dropout for m in linears)


def test_an_explicit_dropout_replay_is_kept_by_auto(tmp_path_factory):
    from audiocraft_lora.fast_lora import FastLoraLinear
    solver = _build(tmp_path_factory, 0.1)
    settings = _plan(solver, 64, replay=True)  # room for `none`: but the user asked for the replay
    assert (settings.activation_checkpointing, settings.dropout_replay) == ('none', True)
    assert all(m._lora_replay_dropout for m in solver.model.modules() if isinstance(m, FastLoraLinear))


def test_auto_keeps_the_merged_weights_only_where_they_fit(solver):
    from audiocraft_lora.speed import set_keep_merged

    def flags():
        return {m.__dict__['_lora_keep_merged'] for m in solver.model.modules() if '_lora_keep_merged' in m.__dict__}
    _plan(solver, 64)
    assert solver.memory_estimate['keep_merged_weights'] is True and flags() == {True}
    shape = _shape(solver, cached=True)
    peaks = {}
    for keep in (False, True):
        set_keep_merged(solver.model, keep)
        peaks[keep] = memory_estimate.estimate_step(solver.model, solver.compression_model, shape, None)
    assert peaks[True].peak > peaks[False].peak  # held from forward to backward: they cost memory
    _plan(solver, memory_plan.needed(peaks[False]) / 2 ** 30 * 1.000001)  # room for the step, not for them
    assert solver.speed_settings.activation_checkpointing == 'none'
    assert solver.memory_estimate['keep_merged_weights'] is False and flags() == {False}
    _plan(solver, 64)
