"""The text conditioning of graphed steps padded to a few lengths, the added keys masked (`lora.graph_text_bucket`).

A CUDA graph replays fixed shapes, and AudioCraft pads each batch's text conditioning to the batch's longest
description, so a graph serves one text length. With AudioCraft's text augmentation on (`merge_text_p`,
`drop_desc_p`, `drop_other_p`: metadata merged into or replacing descriptions) a batch of 16 meets a new longest
length at most steps: 80 clips with trap-style metadata, T5 tokens, gave 62 lengths in 100 steps, 28% of them in
the 8 most common (`benchmarks/text_lengths.py`). Steps beyond `lora.graph_shapes` run eagerly and recomputed, so
most steps of a real run would have been slower than without graphs.

Here a graphed step's conditioning (`[B, L, dim]`) is padded with zeros to the next multiple of `multiple` tokens,
P, and each cross-attention masks keys L..P-1 (`scaled_dot_product_attention`'s `attn_mask`: their weights are
exactly 0, their gradients too). AudioCraft's own padding (keys up to L, zeros for shorter descriptions) is kept
and attended as before, so each query attends to the very keys of the plain step: the same values up to the order
of the attention kernel's float sums (a masked kernel); the gradient of the conditioning is the plain one. A few
signatures (P) then cover every length: L of 1..32 share one at the default 32. And since any longer padding is
exact too, a step whose P has no graph, once `lora.graph_shapes` are taken, takes the shortest captured P that holds
it (layer_graphs.LayerGraphs.padded_size).

How: the mask is one boolean tensor per P, filled in place at the first layer of each step, which the captured
kernels read (a graph reads its tensors where they were at capture). Each cross-attention module's `forward` becomes
an instance attribute that, while a graphed layer call runs (`applied`), hands its `scaled_dot_product_attention` the
mask (a `TorchFunctionMode`, this thread only); the call must take it exactly once, or it raises naming
`lora.graph_text_bucket=1`. It needs AudioCraft's attention as MusicGen builds it (`custom`, `memory_efficient`,
the efficient attention backend `torch`): `unsupported` says why not, and the lengths stay exact then. Where the
attention kernels refuse the mask (`TextMaskError`) at a capture, the graphs drop the padding and go on at exact
lengths (layer_graphs.LayerGraphs.drop_buckets). A step run eagerly beyond the graphs applies its own copy of the
mask, which its recomputation in backward reads (a later forward may have refilled the shared one).
Tests: tests/test_text_buckets.py.
"""
import contextlib
import functools
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ['TextBuckets', 'TextMaskError', 'padded_length', 'unsupported', 'install', 'remove']

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def padded_length(length: int, multiple: int) -> int:
    """The next multiple of `multiple` from `length` (`length` itself when `multiple` is 1)."""
    return -(-int(length) // int(multiple)) * int(multiple)


def unsupported(layers: tp.Sequence[nn.Module]) -> tp.Optional[str]:
    """Why the cross-attentions of AudioCraft transformer `layers` can't take the key mask (None: they can)."""
    from audiocraft.modules import transformer
    from audiocraft.modules.transformer import StreamingMultiheadAttention
    backend = getattr(transformer, '_efficient_attention_backend', None)
    if backend != 'torch':
        return f"AudioCraft's efficient attention backend is {backend!r}, not 'torch'"
    for index, layer in enumerate(layers):
        attention = getattr(layer, 'cross_attention', None)
        if not isinstance(attention, StreamingMultiheadAttention):
            return f"layer {index} has no AudioCraft cross-attention"
        if not (attention.custom and attention.memory_efficient and attention.cross_attention):
            return f"layer {index}'s cross-attention is not AudioCraft's custom memory-efficient one"
    return None


class TextMaskError(RuntimeError):
    """The cross-attention can't take the text mask (no masked kernel here, or not one masked attention call)."""


class _KeyMask(TorchFunctionMode):
    """Hands `mask` to the `scaled_dot_product_attention` calls without a mask of their own (AudioCraft's
    cross-attention passes none), and counts them."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask
        self.applied = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _SDPA and len(args) == 3 and kwargs.get('attn_mask') is None and not kwargs.get('is_causal'):
            keys = args[1].shape[-2]
            if keys != self.mask.shape[-1]:
                raise TextMaskError(f"The cross-attention got {keys} keys, the text mask is for "
                                    f"{self.mask.shape[-1]}: set lora.graph_text_bucket=1.")
            kwargs['attn_mask'] = self.mask.view(1, 1, 1, -1)  # (broadcast over batch, heads, queries)
            self.applied += 1
            try:
                return func(*args, **kwargs)
            except RuntimeError as error:
                if isinstance(error, torch.OutOfMemoryError):
                    raise
                raise TextMaskError(f"The cross-attention failed with the text mask of lora.graph_text_bucket "
                                    f"({error}). Set lora.graph_text_bucket=1 to train without it.") from error
        return func(*args, **kwargs)


class TextBuckets:
    """The padded conditioning of the step in flight and the masks, one per padded length and device."""

    def __init__(self, multiple: int):
        if int(multiple) < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.multiple = int(multiple)
        self.masks: tp.Dict[tp.Tuple[int, torch.device], torch.Tensor] = {}
        self.current: tp.Optional[torch.Tensor] = None  # the mask of the layer call running (`applied`)
        self._step: tp.Optional[tp.Tuple[torch.Tensor, torch.Tensor]] = None  # (conditioning as given, padded)

    def pad(self, cross: torch.Tensor, size: tp.Optional[int] = None) -> torch.Tensor:
        """`cross` [B, L, dim] padded with zeros to `size` tokens (default: the next multiple of `multiple`), its mask
        set to keep keys 0..L-1 (at the first layer of a step; later layers get the same tensor from `padded`)."""
        length = cross.shape[1]
        size = padded_length(length, self.multiple) if size is None else int(size)
        if size < length:
            raise ValueError(f"can't pad {length} text tokens to {size}")
        mask = self.masks.get((size, cross.device))
        if mask is None:
            mask = self.masks[(size, cross.device)] = torch.empty(size, dtype=torch.bool, device=cross.device)
        mask.fill_(True)  # in place: the graphs read this tensor
        mask[length:] = False
        padded = F.pad(cross, (0, 0, 0, size - length)) if size > length else cross
        self._step = (cross, padded)
        return padded

    def padded(self, cross: torch.Tensor) -> torch.Tensor:
        """What `pad` gave for this step's `cross` (padded again if it is another tensor)."""
        if self._step is not None and self._step[0] is cross:
            return self._step[1]
        return self.pad(cross)

    def mask_for(self, padded: torch.Tensor) -> torch.Tensor:
        return self.masks[(padded.shape[1], padded.device)]

    @contextlib.contextmanager
    def applied(self, padded: torch.Tensor, mask: tp.Optional[torch.Tensor] = None) -> tp.Iterator[None]:
        """The cross-attentions called inside mask the keys `pad` added to `padded` (or apply `mask`: an eager
        step's own copy, which its recomputation in backward reads after later steps may have refilled the
        shared one)."""
        previous, self.current = self.current, self.mask_for(padded) if mask is None else mask
        try:
            yield
        finally:
            self.current = previous

    def release(self) -> None:
        self.masks.clear()
        self._step, self.current = None, None


def _masked_forward(buckets: TextBuckets, original: tp.Callable, *args, **kwargs):
    """A cross-attention's forward: the plain one, with the step's key mask while a graphed layer call runs."""
    mask = buckets.current
    if mask is None:
        return original(*args, **kwargs)
    mode = _KeyMask(mask)
    with mode:
        out = original(*args, **kwargs)
    if mode.applied != 1:
        raise TextMaskError(f"The cross-attention made {mode.applied} unmasked scaled_dot_product_attention calls, "
                           "not one: it can't take the text mask. Set lora.graph_text_bucket=1.")
    return out


def install(layers: tp.Sequence[nn.Module], multiple: int) -> TextBuckets:
    """Give each layer's cross-attention the masked forward (an instance attribute; names don't change)."""
    remove(layers)
    buckets = TextBuckets(multiple)
    for layer in layers:
        attention = layer.cross_attention
        attention.forward = functools.partial(_masked_forward, buckets, attention.forward)
    return buckets


def remove(layers: tp.Sequence[nn.Module]) -> None:
    """Undo `install` (the cross-attentions' own forward again)."""
    for layer in layers:
        attention = getattr(layer, 'cross_attention', None)
        forward = attention.__dict__.get('forward') if attention is not None else None
        if isinstance(forward, functools.partial) and forward.func is _masked_forward:
            del attention.__dict__['forward']
