"""Attention in the autocast dtype end to end (`lora.attention_in_autocast_dtype`, on by default).

Under CUDA autocast AudioCraft's layer norms return float32 (the residual stream's dtype), and its attention module
casts its output back to its query's dtype: `x.to(dtype)`, a rearrange to [B, T, dim] (a copy, in float32) and
`out_proj`, which casts it to bf16 again. Every attention (self and cross, every layer) so pays three passes over
[N, dim] in forward (bf16 -> float32, the float32 copy, float32 -> bf16) and again in backward.

With this on, the layer norms in front of the attentions (`norm1`, `norm_cross`) hand their output in the autocast
dtype (a forward hook). That is exactly what the q/k/v projection casts it to anyway, so no value changes
(tests/test_attention_dtype.py: logits, loss and gradients bit for bit); the attention's output then stays in bf16:
one rearrange copy at half the bytes, no casts. The residual stream, the layer norms' own arithmetic and the
feed-forward block are untouched; without autocast the hook does nothing.
"""
import typing as tp

import torch
from torch import nn

__all__ = ['attention_inputs_in_autocast_dtype']

_NORMS = ('norm1', 'norm_cross')  # the norms whose only reader is an attention (self, cross)


def _in_autocast_dtype(module: nn.Module, inputs: tp.Any, output: torch.Tensor) -> tp.Optional[torch.Tensor]:
    device_type = output.device.type
    if output.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return output.to(torch.get_autocast_dtype(device_type))
    return None  # unchanged


def attention_inputs_in_autocast_dtype(model: nn.Module, enabled: bool = True) -> int:
    """Give (or take back) the pre-attention layer norms of AudioCraft's transformer layers the hook above
    (idempotent); returns how many norms have it."""
    from audiocraft.modules.transformer import StreamingTransformerLayer
    count = 0
    for layer in model.modules():
        if not isinstance(layer, StreamingTransformerLayer):
            continue
        for name in _NORMS:
            norm = getattr(layer, name, None)
            if not isinstance(norm, nn.Module):
                continue
            hooks = norm._forward_hooks
            for key in [k for k, hook in hooks.items() if hook is _in_autocast_dtype]:
                del hooks[key]
            if enabled:
                norm.register_forward_hook(_in_autocast_dtype)
                count += 1
    return count
