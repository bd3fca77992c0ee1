"""loss.masked_cross_entropy, the solver's training loss: AudioCraft's per-codebook masked cross-entropy (CPU, float32:
the means up to their summation order, an ulp; the gradients bit for bit), without boolean gathers (no host sync, runs
on fake tensors) or per-codebook slice gradients."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from audiocraft.solvers.musicgen import MusicGenSolver

from audiocraft_lora.lora import lora_parameters
from audiocraft_lora.loss import masked_cross_entropy

from helpers import OpsSeen, debug_lora_lm


def _step(lm, codes, loss_fn, pad_from: int = 30):
    from audiocraft.modules.conditioners import ConditioningAttributes
    attributes = [ConditioningAttributes(text={'description': f'trap beat {i}'}) for i in range(codes.shape[0])]
    out = lm.compute_predictions(codes, [], lm.condition_provider(lm.condition_provider.tokenize(attributes)))
    mask = out.mask.clone()
    mask[0, :, pad_from:] = False  # (a padded clip: the solver masks its tail too)
    with OpsSeen() as seen:
        ce, per_codebook = loss_fn(out.logits, codes, mask)
        params = [p for p in lora_parameters(lm).values() if p.requires_grad]
        grads = torch.autograd.grad(ce, params)
    return ce, per_codebook, grads, seen.names


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:  # (float32: the mean's sum over the kept rows in another order)
    return bool(torch.allclose(a, b, rtol=4e-7, atol=0))


@pytest.mark.parametrize('smallest_chunks', [False, True])
def test_lm_loss_is_audiocrafts_and_adapter_gradients_bit_for_bit(monkeypatch, smallest_chunks):
    from audiocraft_lora import loss
    if smallest_chunks:  # (the log-softmax's chunks: one codebook of one clip each)
        monkeypatch.setattr(loss, '_CHUNK_BYTES', 1)
    codes = torch.randint(0, 32, (2, 4, 40), generator=torch.Generator().manual_seed(0))
    lm = debug_lora_lm()
    ours = _step(lm, codes, masked_cross_entropy)
    theirs = _step(lm, codes, lambda *a: MusicGenSolver._compute_cross_entropy(None, *a))
    assert _close(ours[0], theirs[0]) and all(_close(a, b) for a, b in zip(ours[1], theirs[1]))
    assert all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2]))
    assert all(bool(g.isfinite().all()) for g in ours[2])  # (the NaN logits' gradient never reaches the LM)
    assert 'index' in theirs[3] and 'index' not in ours[3]  # (boolean gathers: on CUDA a host sync each)
    assert theirs[3].count('select_backward') == 4 and 'select_backward' not in ours[3]


def test_nan_logits_of_invalid_steps_and_empty_codebooks_as_audiocraft():
    torch.manual_seed(0)
    B, K, T, card = 3, 4, 17, 11
    logits = torch.randn(B, card, K, T).permute(0, 2, 3, 1)  # (AudioCraft's layout: card innermost in memory last)
    targets = torch.randint(0, card, (B, K, T))
    mask = torch.rand(B, K, T) > 0.3
    logits = logits.masked_fill((~mask & (torch.rand(B, K, T) > 0.5))[..., None], float('nan'))
    ce, per = masked_cross_entropy(logits, targets, mask)
    ref, ref_per = MusicGenSolver._compute_cross_entropy(None, logits, targets, mask)
    assert _close(ce, ref) and all(_close(a, b) for a, b in zip(per, ref_per)) and ce.isfinite()
    mask[:, 2] = False  # a codebook with no valid step: NaN, as AudioCraft's mean of nothing
    ce, per = masked_cross_entropy(logits, targets, mask)
    assert per[2].isnan() and MusicGenSolver._compute_cross_entropy(None, logits, targets, mask)[1][2].isnan()


def test_runs_on_fake_tensors_and_refuses_mismatched_shapes():
    with FakeTensorMode():
        logits = torch.randn(2, 4, 10, 8, requires_grad=True)
        ce, per = masked_cross_entropy(logits, torch.randint(0, 8, (2, 4, 10)), torch.ones(2, 4, 10, dtype=torch.bool))
        ce.backward()
        assert ce.shape == () and len(per) == 4 and logits.grad.shape == logits.shape
    with pytest.raises(ValueError, match=r'\[B, K, T, card\]'):
        masked_cross_entropy(torch.randn(2, 4, 10, 8), torch.zeros(2, 3, 10, dtype=torch.long),
                             torch.ones(2, 3, 10, dtype=torch.bool))


def test_under_bf16_autocast_as_the_solver_computes_it():
    """The solver computes the loss inside autocast (the logits bf16, cross_entropy in float32): the same loss and
    adapter gradients as AudioCraft's there too (cuda_checks.py's `loss` check is this on a GPU)."""
    codes = torch.randint(0, 32, (2, 4, 40), generator=torch.Generator().manual_seed(1))
    lm = debug_lora_lm()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours = _step(lm, codes, masked_cross_entropy)
        theirs = _step(lm, codes, lambda *a: MusicGenSolver._compute_cross_entropy(None, *a))
    assert ours[0].dtype == torch.float32 and _close(ours[0], theirs[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2]))
    assert all(bool(g.isfinite().all()) for g in ours[2]) and any(bool(g.abs().sum() > 0) for g in ours[2])


def test_float16_logits_overflowing_in_ignored_rows_leave_the_gradient_finite():
    """Under float16 autocast an ignored (padded) row's logits may overflow: its gradient stays finite (zero), and
    the loss and the other rows' gradients are AudioCraft's."""
    torch.manual_seed(0)
    B, K, T, card = 2, 4, 9, 16
    targets = torch.randint(0, card, (B, K, T))
    mask = torch.ones(B, K, T, dtype=torch.bool)
    mask[0, :, -3:] = False
    base = torch.randn(B, K, T, card).half()
    base[0, :, -1, 3] = float('inf')  # (a padded row, overflowed)
    ours, theirs = base.clone().requires_grad_(), base.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.float16):
        ce, _ = masked_cross_entropy(ours, targets, mask)
        ref, _ = MusicGenSolver._compute_cross_entropy(None, theirs, targets, mask)
    ce.backward()
    ref.backward()
    assert torch.isfinite(ce) and _close(ce, ref) and bool(ours.grad.isfinite().all())
    assert torch.equal(ours.grad[mask], theirs.grad[mask]) and not bool(ours.grad[~mask].any())


@pytest.mark.parametrize('chunk_blocks', [None, 1, 3, 4])
def test_keeps_no_float32_log_softmax_from_forward_to_backward(monkeypatch, chunk_blocks):
    """Under bf16 autocast the float32 log-softmax runs a row chunk at a time and is made again in backward, not
    kept: after the forward the loss holds far less than one codebook's float32 logits, and the gradient is the one
    of torch's cross-entropy per codebook, bit for bit, whatever the chunks. The logits are a permuted view, as the
    LM's reverted ones: no contiguous copy of them is kept either."""
    from audiocraft_lora import loss
    from audiocraft_lora.memory_estimate import PeakTracker
    torch.manual_seed(0)
    B, K, T, card = 5, 4, 50, 64
    if chunk_blocks:  # ([T, card] blocks of one clip's codebook a chunk: 3 (the last chunk of a clip shorter), 4
        monkeypatch.setattr(loss, '_CHUNK_BYTES', chunk_blocks * T * card * 4)  # (a clip), 1; None: the batch)
        assert {len(range(4)[k]) for _, k in loss._chunks(torch.empty(B, K, T, card))} == \
            ({4} if chunk_blocks == 4 else {chunk_blocks, 4 % chunk_blocks} - {0})
    base = torch.randn(B, card, K, T).bfloat16().permute(0, 2, 3, 1)  # ([B, K, T, card] with card outermost)
    targets = torch.randint(0, card, (B, K, T))
    mask = torch.rand(B, K, T) > 0.2
    base[~mask & (torch.rand(B, K, T) > 0.5)] = float('nan')  # (the delay pattern's invalid steps)
    one_codebook_fp32 = B * T * card * 4
    results = []
    for chunked in (True, False):
        logits = base.clone().requires_grad_()
        with PeakTracker() as tracker, torch.autocast('cpu', dtype=torch.bfloat16):
            if chunked:
                ce, per = masked_cross_entropy(logits, targets, mask)
            else:  # (the same ops, unchunked and kept for backward: AudioCraft's and torch's way)
                ignored = targets.masked_fill(~mask, -100)
                per = [torch.nn.functional.cross_entropy(logits[:, k].reshape(-1, card), ignored[:, k].reshape(-1),
                                                         ignore_index=-100) for k in range(K)]
                ce = sum(per) / K
            held = tracker.current
        ce.backward()
        results.append((ce.detach(), torch.stack([p.detach() for p in per]), logits.grad, held))
    (ce, per, grad, held), (ref, ref_per, ref_grad, ref_held) = results
    assert held < one_codebook_fp32 / 4, (held, one_codebook_fp32)
    assert ref_held >= K * one_codebook_fp32  # (what the chunks save)
    assert _close(ce, ref) and _close(per, ref_per) and ce.isfinite()
    assert torch.equal(grad.isnan(), ref_grad.isnan()) and bool(grad[mask].isfinite().all())
    assert torch.equal(torch.nan_to_num(grad), torch.nan_to_num(ref_grad))
