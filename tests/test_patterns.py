"""lora.index_select_logits: the delay pattern's logits reverted with index_select give AudioCraft's values and
gradients exactly."""
import copy

import torch

from audiocraft.modules.codebooks_patterns import Pattern
from audiocraft.modules.conditioners import ConditioningAttributes
from audiocraft.solvers.musicgen import MusicGenSolver

from audiocraft_lora import base_models, memory_estimate
from audiocraft_lora.lora import LoRASettings, inject_lora, lora_parameters
from audiocraft_lora.patterns import IndexSelectPattern, use_index_select_logits


def _lm():
    torch.manual_seed(0)
    lm = base_models.build_lm(base_models.load_lm_package(base_models.resolve_base('debug')))
    inject_lora(lm, LoRASettings(rank=4, alpha=8, init='random'))
    return lm.train()


def _step(lm, codes):
    torch.manual_seed(1)  # the same dropout draws for both
    attributes = [ConditioningAttributes(text={'description': f'trap beat {i}'}) for i in range(codes.shape[0])]
    out = lm.compute_predictions(codes, [], lm.condition_provider(lm.condition_provider.tokenize(attributes)))
    ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)  # type: ignore
    grads = torch.autograd.grad(ce, list(lora_parameters(lm).values()))
    return out, ce, grads


def test_same_logits_loss_and_adapter_gradients_as_audiocraft():
    reference = _lm()
    fast = copy.deepcopy(reference)
    assert use_index_select_logits(fast)
    codes = torch.randint(0, 64, (3, 4, 37))
    expected, fast_out = _step(reference, codes), _step(fast, codes)
    assert isinstance(fast.pattern_provider.get_pattern(37), IndexSelectPattern)
    assert type(reference.pattern_provider.get_pattern(37)) is Pattern  # the copy's wrapper left the original alone
    assert torch.equal(expected[0].mask, fast_out[0].mask)
    assert torch.allclose(expected[0].logits, fast_out[0].logits, equal_nan=True, rtol=0, atol=0)  # nan: no target
    assert torch.equal(expected[1], fast_out[1])
    assert all(torch.equal(a, b) for a, b in zip(expected[2], fast_out[2]))


def test_turned_off_the_provider_hands_out_audiocrafts_patterns_again():
    lm = _lm()
    use_index_select_logits(lm)
    use_index_select_logits(lm)  # twice: wrapped once
    assert isinstance(lm.pattern_provider.get_pattern(11), IndexSelectPattern)
    assert use_index_select_logits(lm, enabled=False) is False
    assert type(lm.pattern_provider.get_pattern(11)) is Pattern
    assert 'get_pattern' in vars(lm.pattern_provider)  # AudioCraft's own cached get_pattern, as it set it


def test_the_memory_estimate_runs_through_the_index_select_pattern():
    lm = _lm()
    plain = memory_estimate.estimate_step(lm, None, memory_estimate.StepShape(2, 40), None)
    use_index_select_logits(lm)
    fast = memory_estimate.estimate_step(lm, None, memory_estimate.StepShape(2, 40), None)
    assert fast.step > 0 and fast.resident == plain.resident
    assert abs(fast.step - plain.step) <= 0.05 * plain.step  # same tensors but for the backward's scatter
    assert 'revert_pattern_logits' in IndexSelectPattern.__dict__  # the estimate's patch was taken off again
    assert IndexSelectPattern.revert_pattern_logits.__module__ == 'audiocraft_lora.patterns'


def test_revert_makes_no_copy_of_the_logits_beside_the_reverted_ones():
    """AudioCraft appends the special-token column with a cat (a third logits-sized tensor at the forward's peak);
    the revert here creates only the reverted logits, with the special token (NaN) where the pattern has no step."""
    from audiocraft.modules.codebooks_patterns import DelayedPatternProvider
    pattern = DelayedPatternProvider(n_q=4).get_pattern(30)
    fast = IndexSelectPattern(pattern.layout, timesteps=pattern.timesteps, n_q=pattern.n_q)
    logits = torch.randn(2, 64, 4, 31, requires_grad=True)  # [B, card, K, S]
    with memory_estimate.PeakTracker() as tracker:
        values, _, mask = fast.revert_pattern_logits(logits, float('nan'), keep_only_valid_steps=True)
    ref, _, ref_mask = pattern.revert_pattern_logits(logits, float('nan'), keep_only_valid_steps=True)
    assert torch.equal(mask, ref_mask) and not bool(mask.all())
    assert torch.allclose(values, ref, equal_nan=True, rtol=0, atol=0) and bool(values[..., ~mask].isnan().all())
    assert tracker.peak < values.numel() * values.element_size() * 1.1, (tracker.peak, values.numel() * 4)
    grad = torch.randn_like(values)
    assert torch.equal(torch.autograd.grad(values, logits, grad)[0], torch.autograd.grad(ref, logits, grad)[0])
