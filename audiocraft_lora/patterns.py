"""The delay pattern's logits reverted with `index_select` (`lora.index_select_logits`, on by default).

AudioCraft's `LMModel.compute_predictions` maps the LM's logits on the interleaved sequence back to frames with
`Pattern.revert_pattern_logits`, which gathers with advanced indexing (`logits[:, :, indexes]`). Its backward is a
sort-based `index_put_(accumulate=True)` over the whole `[B, card, K x S]` logits: about 10 ms of an 84 ms
musicgen-small step at batch 4 x 30 s on an H100 (`benchmarks/profile_step.py`). `index_select` gathers the same
values; its backward is an `index_add_`. Every index is distinct except the appended special-token column, whose
gradient is dropped, so the gradients are the same too.

AudioCraft appends that special-token column with a `cat`: a third copy of the logits, next to the LM's stacked
logits and the reverted ones, at the moment the forward holds all its activations (the step's peak under `selective`
checkpointing: 0.37 GiB at musicgen-small batch 16 x 30 s). `_RevertLogits` gathers from the logits as they are and
writes the special token where the pattern has no step; its backward is AudioCraft's (index_add into a zero tensor
with the special column, which is dropped): the same values and gradients, bit for bit.

The LM's pattern provider keeps building AudioCraft's patterns; its (per-instance, cached) `get_pattern` is wrapped to
hand out `IndexSelectPattern`s with the same layout.
"""
import functools
import typing as tp

from audiocraft.modules.codebooks_patterns import Pattern
import torch
from torch import nn

__all__ = ['IndexSelectPattern', 'use_index_select_logits']


class IndexSelectPattern(Pattern):
    """AudioCraft's `Pattern` whose `revert_pattern_logits` gathers with `index_select` (see the module doc)."""

    def revert_pattern_logits(self, logits: torch.Tensor, special_token: float, keep_only_valid_steps: bool = False):
        B, card, K, S = logits.shape
        indexes, mask = self._build_reverted_sequence_scatter_indexes(
            S, K, keep_only_valid_steps, is_model_output=True, device=logits.device)
        values = _RevertLogits.apply(logits.reshape(B, card, -1), indexes.view(-1), mask.view(-1), special_token)
        return values.view(B, card, K, indexes.shape[-1]), indexes, mask


class _RevertLogits(torch.autograd.Function):
    """`cat([logits, special column]).index_select(2, indexes)` without the cat (see the module doc)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, indexes: torch.Tensor, valid: torch.Tensor,
                special_token: float) -> torch.Tensor:
        values = logits.index_select(2, indexes.masked_fill(~valid, 0))  # (the special index: past the end)
        values.masked_fill_(~valid, special_token)
        ctx.save_for_backward(indexes)
        ctx.shape = logits.shape
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        indexes, = ctx.saved_tensors
        B, card, steps = ctx.shape
        grad_in = grad.new_zeros(B, card, steps + 1).index_add_(2, indexes, grad)  # as cat + index_select's
        return grad_in[:, :, :steps], None, None, None


def _index_select_pattern(get_pattern: tp.Callable[[int], Pattern], timesteps: int) -> Pattern:
    pattern = get_pattern(timesteps)
    if isinstance(pattern, IndexSelectPattern) or type(pattern) is not Pattern:
        return pattern
    return IndexSelectPattern(pattern.layout, timesteps=pattern.timesteps, n_q=pattern.n_q)


def use_index_select_logits(lm: nn.Module, enabled: bool = True) -> bool:
    """Make `lm.pattern_provider` hand out `IndexSelectPattern`s (or, with `enabled=False`, AudioCraft's again).
    Returns whether it does."""
    provider = getattr(lm, 'pattern_provider', None)
    if provider is None:
        return False
    current = provider.__dict__.get('get_pattern')
    original = getattr(current, '_audiocraft_get_pattern', None)
    if enabled and original is None:
        base = current if current is not None else provider.get_pattern
        wrapped = functools.lru_cache(100)(functools.partial(_index_select_pattern, base))
        wrapped._audiocraft_get_pattern = base  # type: ignore[attr-defined]
        provider.get_pattern = wrapped
    elif not enabled and original is not None:
        provider.get_pattern = original
    return enabled
