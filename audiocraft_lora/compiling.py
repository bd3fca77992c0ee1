"""What lets `torch.compile` take each of AudioCraft's transformer layers as one graph (`lora.compile`).

AudioCraft's attention, as it is, breaks dynamo's graph inside every self-attention, and a break there makes dynamo
give up on the layer's whole frame (it runs eagerly, uncompiled):

- `_get_mask` hands out xformers' `LowerTriangularMask` object even on the torch SDPA backend, where the only thing
  AudioCraft reads of it is `attn_mask is not None` (it becomes `is_causal=True`); dynamo can't put that object in a
  graph. `causal_marker_masks` gives each causal attention module of a model a `_get_mask` that returns `True` on
  exactly that path (memory-efficient attention, torch backend, more than one step, no streaming cache) and
  AudioCraft's own mask everywhere else.
- `ops.unbind`, xformers' autograd Function splitting the packed q/k/v, can't be traced: `packed_qkv.install` (which
  `speed.apply_to_model` runs for every model) points AudioCraft's transformer module at an `unbind` that is
  `torch.unbind` under torch.compile.

Neither changes a value (tests/test_compile_lever.py: the compiled layers' losses and gradients equal eager ones, and
each layer is one graph).
"""
import functools

import torch
from torch import nn

__all__ = ['causal_marker_masks']


def _marker_or_audiocraft_mask(module: nn.Module, current_steps: int, device: torch.device, dtype: torch.dtype):
    from audiocraft.modules import transformer
    if (module.memory_efficient and transformer._efficient_attention_backend == 'torch' and current_steps != 1
            and 'past_keys' not in module._streaming_state):
        return True  # read only as `attn_mask is not None`: SDPA's is_causal
    return type(module)._get_mask(module, current_steps, device, dtype)


def causal_marker_masks(model: nn.Module) -> int:
    """Give every causal StreamingMultiheadAttention of `model` the traceable `_get_mask` (an instance attribute; the
    class is untouched); returns how many modules got it."""
    from audiocraft.modules.transformer import StreamingMultiheadAttention
    count = 0
    for module in model.modules():
        if isinstance(module, StreamingMultiheadAttention) and module.causal:
            module._get_mask = functools.partial(_marker_or_audiocraft_mask, module)
            count += 1
    return count
