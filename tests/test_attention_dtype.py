"""lora.attention_in_autocast_dtype: the pre-attention layer norms hand the attentions the autocast dtype; logits,
loss and adapter gradients stay bit for bit those of AudioCraft's float32 round trip, and the round trip is gone."""
import copy

import pytest
import torch

from audiocraft_lora.attention_dtype import attention_inputs_in_autocast_dtype
from audiocraft_lora.speed import SpeedSettings, apply_to_model

from helpers import debug_lora_lm as _lm, lora_step as _step, sample_tokens


class _Casts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts casts between float32 and bfloat16 by direction."""

    def __init__(self):
        super().__init__()
        self.to_float32 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 \
                and out.dtype == torch.float32 and out.dim() == 3:
            self.to_float32 += 1
        return out


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_bit_for_bit_the_same_step_without_the_float32_round_trip(dropout):
    reference = _lm(dropout)
    # (fused_norms off on both sides: its norms hand the attentions bf16 themselves)
    apply_to_model(reference, SpeedSettings(attention_in_autocast_dtype=False, fused_norms=False), True,
                   torch.bfloat16)
    low = copy.deepcopy(reference)
    info = apply_to_model(low, SpeedSettings(fused_norms=False), True, torch.bfloat16)
    layers = len(low.transformer.layers)
    assert info['attention_in_autocast_dtype'] == 2 * layers  # norm1 and norm_cross of every layer
    codes = torch.randint(0, 64, (2, 4, 31), generator=torch.Generator().manual_seed(2))
    with _Casts() as ref_casts:
        expected = _step(reference, codes)
    with _Casts() as casts:
        got = _step(low, codes)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert all(torch.equal(g, e) for g, e in zip(got[2], expected[2]))
    # AudioCraft casts every attention's bf16 output to float32 ([B, T, dim] activations); now none is
    assert ref_casts.to_float32 - casts.to_float32 >= 2 * layers, (ref_casts.to_float32, casts.to_float32)


def test_does_nothing_without_autocast_and_comes_off_again():
    lm = _lm(0.0)
    reference = copy.deepcopy(lm)
    assert attention_inputs_in_autocast_dtype(lm) == attention_inputs_in_autocast_dtype(lm)  # idempotent
    assert sum(len(m._forward_hooks) for m in lm.modules()) == 2 * len(lm.transformer.layers)
    codes = torch.randint(0, 64, (2, 4, 31), generator=torch.Generator().manual_seed(3))
    expected, got = _step(reference, codes, autocast=False), _step(lm, codes, autocast=False)
    assert torch.equal(got[0], expected[0]) and all(torch.equal(g, e) for g, e in zip(got[2], expected[2]))
    attention_inputs_in_autocast_dtype(lm, enabled=False)
    assert sum(len(m._forward_hooks) for m in lm.modules()) == 0


def test_only_with_the_fast_path_under_autocast():
    """peft's plain path casts its LoRA branch's input to float32 itself (its dropout would round differently)."""
    for fast_path, autocast in ((False, True), (True, False)):
        lm = _lm(0.1)
        info = apply_to_model(lm, SpeedSettings(fast_path=fast_path, base_dtype='float32'), autocast, torch.bfloat16)
        assert 'attention_in_autocast_dtype' not in info


def test_generation_under_autocast_is_unchanged():
    """AudioCraft's token-by-token generation (streaming cache, CFG) samples the same tokens with the hooks on."""
    reference = _lm(0.0).eval()
    low = copy.deepcopy(reference)
    apply_to_model(low, SpeedSettings(), True, torch.bfloat16)
    assert torch.equal(sample_tokens(reference), sample_tokens(low))
