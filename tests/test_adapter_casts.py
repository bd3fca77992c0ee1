"""adapter_casts: the LoRA weights cast to the autocast dtype once per optimizer step for the whole model give the
same training bit for bit, are refreshed whenever the weights change, and take the per-projection casts away.
CPU, bf16 autocast."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from audiocraft_lora import base_models
from audiocraft_lora.adapter_casts import AdapterCasts
from audiocraft_lora.lora import LoRASettings, inject_lora, lora_parameters
from audiocraft_lora.speed import SpeedSettings, apply_to_model
from test_fast_lora import PROMPTS, _loss


@pytest.fixture
def codes():
    return torch.randint(0, 256, (2, 4, 40), generator=torch.Generator().manual_seed(1))


def _lm(pkg, shared: bool):
    lm = base_models.build_lm(pkg)
    inject_lora(lm, LoRASettings(rank=4, alpha=8, init='random', dropout=0.0))
    info = apply_to_model(lm, SpeedSettings(), autocast=True, autocast_dtype=torch.bfloat16)
    assert info['adapter_casts'] == len(lora_parameters(lm))  # every adapter weight has a copy
    if not shared:
        for module in lm.modules():
            module.__dict__.pop('_lora_cast_slots', None)
    return lm.train()


def _registry(lm) -> AdapterCasts:
    registries = {id(slot[0]): slot[0] for m in lm.modules() for pair in m.__dict__.get('_lora_cast_slots', {}).values()
                  for slot in pair}
    assert len(registries) == 1
    return next(iter(registries.values()))


class _Casts(TorchDispatchMode):
    """The inputs of every dtype conversion run under it."""

    def __init__(self):
        super().__init__()
        self.sources = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy:
            self.sources.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('kind', [{'foreach': False}, {'foreach': True}, {'fused': True}],
                         ids=['for-loop', 'foreach', 'fused'])
def test_shared_casts_train_bit_for_bit_like_casting_at_every_use(debug_lm_pkg, codes, kind):
    """With every AdamW implementation: the fused one (the solver's on CUDA) updates the weights in place without
    moving their version counters, so the copies must be refreshed by the optimizer step itself."""
    torch.manual_seed(0)
    shared = _lm(debug_lm_pkg, shared=True)
    ref = _lm(debug_lm_pkg, shared=False)
    ref.load_state_dict(shared.state_dict())
    optimizers = [torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2, **kind)
                  for lm in (shared, ref)]
    registry = _registry(shared)
    for step in range(3):
        losses = []
        for lm, optimizer in zip((shared, ref), optimizers):
            optimizer.zero_grad()
            loss = _loss(lm, codes, torch.bfloat16)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
        for key, param in lora_parameters(ref).items():
            torch.testing.assert_close(lora_parameters(shared)[key].grad, param.grad, atol=0, rtol=0, msg=key)
        assert registry.refreshes == step + 1  # once per step, for every weight at once (one foreach copy)
        for optimizer in optimizers:
            optimizer.step()
    _loss(shared, codes, torch.bfloat16)
    _loss(shared, codes, torch.bfloat16)
    assert registry.refreshes == 4  # after the last step: once; a second forward with the same weights: no refresh


def test_no_adapter_weight_is_cast_per_projection(debug_lm_pkg, codes):
    counts = {}
    for shared in (True, False):
        lm = _lm(debug_lm_pkg, shared)
        _loss(lm, codes, torch.bfloat16)  # (the shared copies are made here)
        adapters = {p.data_ptr() for p in lora_parameters(lm).values()}
        with _Casts() as casts:
            _loss(lm, codes, torch.bfloat16).backward()
        counts[shared] = sum(source.data_ptr() in adapters for source in casts.sources)
    assert counts[True] == 0
    assert counts[False] > 2 * len(lm.transformer.layers) * 5  # A and B of 5+ projections a layer, every forward


def test_weights_changed_replaced_or_copied_are_never_served_stale(debug_lm_pkg, codes):
    torch.manual_seed(0)
    shared = _lm(debug_lm_pkg, shared=True)
    ref = _lm(debug_lm_pkg, shared=False)
    ref.load_state_dict(shared.state_dict())

    def same():
        torch.testing.assert_close(_loss(shared, codes, torch.bfloat16), _loss(ref, codes, torch.bfloat16),
                                   atol=0, rtol=0)
    same()
    with torch.no_grad():  # in place (load_state_dict, an optimizer): the version counter moves
        for lm in (shared, ref):
            lm.transformer.layers[0].linear1.lora_B['default'].weight.add_(0.5)
            lm.transformer.layers[0].self_attn.in_proj.lora_B.weight.add_(0.5)
    same()
    for lm in (shared, ref):  # a new Parameter: not the registered one, cast where used
        layer = lm.transformer.layers[1]
        layer.linear2.lora_A['default'].weight = nn.Parameter(torch.full_like(layer.linear2.lora_A['default'].weight,
                                                                              0.01))
        layer.cross_attention.in_proj.lora_B.weight = nn.Parameter(
            torch.full_like(layer.cross_attention.in_proj.lora_B.weight, 0.02))
    same()
    clone = copy.deepcopy(shared)  # the copy has its own copies: changing the original leaves it alone
    expected = _loss(clone, codes, torch.bfloat16)
    with torch.no_grad():
        shared.transformer.layers[0].linear2.lora_B['default'].weight.add_(1.0)
    torch.testing.assert_close(_loss(clone, codes, torch.bfloat16), expected, atol=0, rtol=0)
    assert _registry(clone) is not _registry(shared)


def test_copies_made_under_inference_mode_can_be_saved_for_backward():
    """(AudioCraft's LM itself can't train after an inference_mode forward: its pattern index caches become inference
    tensors. The copies must not add to that.)"""
    weight = nn.Parameter(torch.randn(4, 8))
    casts = AdapterCasts([weight])
    with torch.inference_mode():
        copy_ = casts.get(0, torch.bfloat16)
    assert not copy_.is_inference()
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    (x @ casts.get(0, torch.bfloat16).t()).sum().backward()  # saved for backward: raises for an inference tensor
    assert casts.refreshes == 1
    torch.testing.assert_close(x.grad, weight.detach().to(torch.bfloat16).sum(0).expand(3, 8), atol=0, rtol=0)


def test_without_autocast_nothing_is_shared(debug_lm_pkg):
    lm = base_models.build_lm(debug_lm_pkg)
    inject_lora(lm, LoRASettings(rank=4, init='random'))
    info = apply_to_model(lm, SpeedSettings(), autocast=False, autocast_dtype=torch.float32)
    assert 'adapter_casts' not in info
    assert not any('_lora_cast_slots' in m.__dict__ for m in lm.modules())
