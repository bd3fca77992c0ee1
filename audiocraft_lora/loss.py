"""The training loss: AudioCraft's per-codebook masked cross-entropy, without slicing each codebook and gathering rows,
and without keeping a float32 log-softmax of the logits from the forward to the backward.

`MusicGenSolver._compute_cross_entropy` takes each codebook's logits with `logits[:, k]` (made contiguous) and keeps
the valid rows with a boolean mask. The mask's row count is read on the host (a sync per codebook) and the rows are
copied; in backward each slice gets a zero-filled gradient of the whole `[B, K, T, card]` logits, added up (4 fills
and 3 adds at MusicGen's 4 codebooks: ~6 GB of traffic at musicgen-small batch 16 x 30 s, ~2.5 ms on an H100), and
each gather one more zero fill. Under autocast, each codebook's cross-entropy also keeps its float32 log-softmax for
backward: twice the bf16 logits' size in all.

`masked_cross_entropy` ignores the masked targets (`ignore_index`) instead of gathering the kept ones: the mean over
the same rows, no host sync (so fake tensors can run it: the memory estimate uses it as is). `_RowChunkedCE` runs the
float32 log-softmax over chunks of the logits (at most 64 MiB of float32, or what AudioCraft's per-codebook loss held
at once: whole clips, or a few codebooks of one clip), keeps each row's negative log-likelihood only, and in backward
makes each chunk's log-softmax again and writes its gradient into one buffer in the logits' dtype. Each row goes
through the same aten ops as `F.cross_entropy` (a float32 copy, log_softmax, nll_loss; in backward nll_loss's `-(g /
count)` at the target and log_softmax's backward), so the gradients are bit for bit AudioCraft's on CPU; the
per-codebook means sum the rows in another order (an ulp). On CUDA under bf16 autocast AudioCraft's own loss is a
little coarser: CUDA's autocast casts `log_softmax` and `nll_loss` to float32 but not `cross_entropy`, whose
composite asks for the log-softmax in the input's dtype, so its log-probabilities are rounded to bf16 (CPU's autocast
casts `cross_entropy` itself). This loss keeps them float32 on every device: the loss of AudioCraft's on float32
logits; 1e-4 of the loss from AudioCraft's under CUDA autocast (session 20's H200, cuda_checks.py `loss`: 6.02932 vs
6.02997, the logits' gradient within one bf16 rounding). Cost: one more memory-bound pass over the logits in backward
and a few launches a chunk. The estimated peak of musicgen-small batch 16 x 30 s with `selective` checkpointing
(benchmarks/memory_plan.py) went from 18.40 to 17.94 GiB with this and patterns.py's revert without a cat.

The delay pattern's invalid steps have NaN logits (AudioCraft's special token). Ignored rows add nothing to the loss;
their NaN gradient goes to the special-token column the pattern's revert appends, whose gradient is dropped, so no NaN
reaches the LM. In float16 (autocast on GPUs without bf16) a padded row's logits may also overflow to inf, whose NaN
gradient would reach the LM (a skipped step): there the ignored rows' logits are zeroed first (one pass over the
logits, which bf16 and float32, with float32's range, don't need). tests/test_loss.py compares with AudioCraft's
loss on CPU, in float32 and under bf16 autocast; cuda_checks.py's `loss` check on a GPU.
"""
import typing as tp

import torch
from torch.nn import functional as F

__all__ = ['masked_cross_entropy']

_IGNORED = -100


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.List[torch.Tensor]]:
    """(mean over codebooks of each codebook's mean cross-entropy over its `mask`ed positions, the per-codebook
    values detached): logits [B, K, T, card], targets and mask [B, K, T], as `MusicGenSolver._compute_cross_entropy`."""
    B, K, T = targets.shape
    if logits.shape[:-1] != targets.shape or mask.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask "
                         f"{tuple(mask.shape)} don't match: [B, K, T, card], [B, K, T], [B, K, T]")
    ignored = targets.masked_fill(~mask, _IGNORED)
    if logits.dtype == torch.float16:  # (an ignored row whose fp16 logits overflowed would give a NaN gradient)
        logits = logits.masked_fill(~mask.unsqueeze(-1), 0.)
    nll = _RowChunkedCE.apply(logits, ignored)  # [B, K, T] float32: 0 at ignored rows
    # (a tensor, as nll_loss's total_weight: on CUDA dividing by a Python number would multiply by its reciprocal,
    # and the gradients would no longer be AudioCraft's bit for bit)
    counts = (ignored != _IGNORED).sum(dim=(0, 2)).float()
    per_codebook = nll.sum(dim=(0, 2)) / counts  # (NaN for a codebook with no counted step, as AudioCraft's)
    return per_codebook.sum() / K, list(per_codebook.detach().unbind())


_CHUNK_BYTES = 64 << 20  # float32 bytes of logits per chunk at most: the loss's transient memory


def _chunks(logits: torch.Tensor) -> tp.Iterator[tp.Tuple[slice, slice]]:
    """(clips, codebooks) of each chunk: whole [T, card] blocks of one clip's codebook, as many as fit in
    `_CHUNK_BYTES` of float32 but no more than a codebook of the batch (what AudioCraft's loss held at once), and
    whole clips where a clip fits (fewer launches). Each chunk is made contiguous in float32 (the LM's reverted logits
    are a permuted view)."""
    B, K, T, card = logits.shape
    unit = max(1, 4 * T * card)
    units = max(1, min(_CHUNK_BYTES, B * unit) // unit)
    if units >= K:
        clips = units // K
        return ((slice(b, b + clips), slice(None)) for b in range(0, B, clips))
    return ((slice(b, b + 1), slice(k, k + units)) for b in range(B) for k in range(0, K, units))


def _log_softmax(part: torch.Tensor) -> torch.Tensor:
    """[rows, card] float32 log-softmax of a chunk (autocast's cross_entropy: a float32 copy first).

    Always a fresh copy, to float32 and contiguous at once, even of float32 logits: CUDA's log_softmax picks its
    kernel by the input's alignment, and a slice at an odd offset could sum in another order than AudioCraft's
    freshly allocated per-codebook copy."""
    fresh = torch.empty(part.shape, dtype=torch.float32, device=part.device).copy_(part)
    return torch.log_softmax(fresh.view(-1, part.shape[-1]), 1)


class _RowChunkedCE(torch.autograd.Function):
    """Per-row negative log-likelihood `[B, K, T]` (float32, 0 where the target is ignored) of logits `[B, K, T, card]`
    (any float dtype and layout, cast to float32 a chunk at a time, `_chunks`); keeps only the logits for backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nll = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for part in _chunks(logits):  # (nll_loss with ignore_index: 0 at ignored rows)
            nll[part] = F.nll_loss(_log_softmax(logits[part]), targets[part].reshape(-1), ignore_index=_IGNORED,
                                   reduction='none').view(nll[part].shape)
        ctx.save_for_backward(logits, targets)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for part in _chunks(logits):
            log_p = _log_softmax(logits[part])
            rows = targets[part].reshape(-1)
            # nll_loss's backward: -(g / count) at the target of each counted row, 0 elsewhere
            grad_log_p = torch.zeros_like(log_p)
            grad_log_p.scatter_(1, rows.clamp(min=0).unsqueeze(1),
                                torch.where(rows != _IGNORED, -grad_nll[part].reshape(-1), 0.).unsqueeze(1))
            grad[part] = torch._log_softmax_backward_data(grad_log_p, log_p, 1, torch.float32).view(grad[part].shape)
        return grad, None
