"""The training loss: AudioCraft's per-codebook masked cross-entropy, without slicing each codebook and gathering rows.

`MusicGenSolver._compute_cross_entropy` takes each codebook's logits with `logits[:, k]` (made contiguous) and keeps
the valid rows with a boolean mask. The mask's row count is read on the host (a sync per codebook) and the rows are
copied; in backward each slice gets a zero-filled gradient of the whole `[B, K, T, card]` logits, added up (4 fills
and 3 adds at MusicGen's 4 codebooks: ~6 GB of traffic at musicgen-small batch 16 x 30 s, ~2.5 ms on an H100), and
each gather one more zero fill. `masked_cross_entropy` takes the codebooks from one `unbind` (backward: one stack) and
ignores the masked targets (`ignore_index`) instead of gathering the kept ones: the mean over the same rows, no host
sync (so fake tensors can run it: the memory estimate uses it as is).

The delay pattern's invalid steps have NaN logits (AudioCraft's special token). Ignored rows add nothing to the loss;
their NaN gradient goes to the special-token column the pattern's revert appends, whose gradient is dropped, so no NaN
reaches the LM. In float16 (autocast on GPUs without bf16) a padded row's logits may also overflow to inf, whose NaN
gradient would reach the LM (a skipped step): there the ignored rows' logits are zeroed first (one pass over the
logits, which bf16 and float32, with float32's range, don't need). On CPU in float32 the gradients equal
AudioCraft's bit for bit and the losses up to the order of the mean's sum (an ulp; tests/test_loss.py); on CUDA too,
the means' float32 sums run in another order.
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
    ce = torch.zeros([], device=targets.device)
    per_codebook: tp.List[torch.Tensor] = []
    for k, logits_k in enumerate(logits.unbind(1)):
        q_ce = F.cross_entropy(logits_k.reshape(-1, logits.shape[-1]), ignored[:, k].reshape(-1),
                               ignore_index=_IGNORED)
        ce = ce + q_ce
        per_codebook.append(q_ce.detach())
    return ce / K, per_codebook
