"""packed_qkv: AudioCraft's packed q/k/v split whose backward writes the three gradients once, in the projection's
layout: the same gradients bit for bit, without xformers' stack and the permutation's clone."""
import pytest
import torch

from audiocraft_lora import packed_qkv

from helpers import OpsSeen, debug_lora_lm, lora_step


@pytest.fixture
def audiocraft_ops():
    """AudioCraft's transformer `ops` restored after the test (install is process-wide)."""
    from audiocraft.modules import transformer
    original = transformer.ops
    yield transformer
    transformer.ops = original


def test_lm_step_gradients_are_xformers_bit_for_bit_without_its_stack_and_clone(audiocraft_ops):
    codes = torch.randint(0, 32, (2, 4, 40), generator=torch.Generator().manual_seed(0))
    steps, made = [], []
    for ours in (False, True):
        packed_qkv.install(ours)
        assert isinstance(audiocraft_ops.ops, packed_qkv._Ops) == ours
        lm = debug_lora_lm()
        with OpsSeen(lambda t: t.dim() == 5) as seen:  # (the packed [B, H, 3, T, D] q/k/v, its gradient)
            steps.append(lora_step(lm, codes, autocast=False))
        made.append(seen.names)
    (_, ce0, grads0), (_, ce1, grads1) = steps
    assert torch.equal(ce0, ce1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    layers = len(lm.transformer.layers)
    assert made[0].count('stack') == made[0].count('clone') == layers  # (xformers: two passes a layer)
    assert 'stack' not in made[1] and 'clone' not in made[1]
    assert made[1].count('empty_strided') == layers  # (one buffer a layer, written once)


def test_split_matches_torch_unbind_for_unused_parts_and_layouts_no_tensor_can_take():
    base = torch.randn(2, 5, 3, 4, 6)
    for x in (base.permute(0, 3, 2, 1, 4), base[..., ::2].permute(0, 3, 2, 1, 4)):  # (dense; strided: stack)
        grads = []
        for split in (torch.unbind, packed_qkv.unbind):
            leaf = x.detach().clone().requires_grad_() if split is torch.unbind else x.detach().requires_grad_()
            q, k, v = split(leaf, 2)
            (q * 2 + v.sin()).sum().backward()  # (k unused: a None gradient)
            grads.append(leaf.grad)
        assert torch.equal(grads[0], grads[1])
        assert grads[1][:, :, 1].abs().sum() == 0
    with torch.no_grad():
        assert all(t.grad_fn is None for t in packed_qkv.unbind(base.requires_grad_(), 2))


def test_install_is_idempotent_and_undone(audiocraft_ops):
    packed_qkv.install(False)  # (an earlier test in this process may have installed it)
    original = audiocraft_ops.ops
    packed_qkv.install()
    wrapped = audiocraft_ops.ops
    packed_qkv.install()
    assert audiocraft_ops.ops is wrapped and wrapped.unbind is packed_qkv.unbind
    assert wrapped.memory_efficient_attention is original.memory_efficient_attention  # (xformers' other functions)
    packed_qkv.install(False)
    assert audiocraft_ops.ops is original


def test_gradients_already_packed_are_returned_as_a_view_without_a_copy():
    """An attention backward that writes q/k/v's gradients packed (views of one buffer in x's layout): the split's
    backward returns that buffer as x's gradient, no copy; separate gradients are copied into one."""
    packed = torch.randn(2, 5, 3, 4, 6)  # ([B, T, 3, H, D]: the projection's output)
    x = packed.permute(0, 3, 2, 1, 4)  # ([B, H, 3, T, D]: AudioCraft's view, split on dim 2)
    grad_buffer = torch.randn(2, 5, 3, 4, 6)
    grads = grad_buffer.permute(0, 3, 2, 1, 4).unbind(2)  # (the parts of one packed buffer)
    for given, copied in ((grads, False), ([g.clone() for g in grads], True)):
        leaf = x.detach().requires_grad_()
        q, k, v = packed_qkv.unbind(leaf, 2)
        with OpsSeen() as seen:
            torch.autograd.backward((q, k, v), given)
        assert torch.equal(leaf.grad, grad_buffer.permute(0, 3, 2, 1, 4))
        assert ('copy_' in seen.names) == copied, seen.names
