"""AudioCraft's packed q/k/v split with its gradient written once, in the projection's own layout.

AudioCraft's self-attention projects q, k and v with one `in_proj` GEMM, views the `[B, T, 3 x dim]` output as
`[B, H, 3, T, D]` (a permutation, no copy) and splits it with xformers' `ops.unbind`. In backward the attention kernel
returns three separate gradients; xformers stacks them into a new contiguous `[B, H, 3, T, D]` tensor, and the
permutation's backward then copies that again (a `clone`) into the `[B, T, 3 x dim]` layout the `in_proj` backward
reads: two passes over the packed gradient, ~0.59 GB a layer at musicgen-small batch 16 x 30 s. Here the split's
backward writes the three gradients straight into a tensor with the packed view's strides, so the permutation's
backward is a view: one pass (~2.7 ms of a ~140 ms step at 2.6 TB/s). The same values, bit for bit.

`install` points AudioCraft's transformer module at an `ops` whose `unbind` is this split (xformers' other functions
unchanged), for every model in the process. Under torch.compile it is `torch.unbind`, which dynamo traces (xformers'
Function it can't): the compiled layers stay one graph each. Where the attention's backward already wrote the three
gradients into one buffer in the packed layout (PyTorch's memory-efficient attention does when q/k/v are views of one
tensor), the split's backward returns a view of it: no pass at all.
"""
import typing as tp

import torch

__all__ = ['unbind', 'install']


def _dense(x: torch.Tensor) -> bool:
    """Whether `x`'s strides are a permutation of a contiguous tensor's (a tensor of its own can have them)."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(x.stride(), x.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _packed_view(grads: tp.Sequence[torch.Tensor], dim: int, shape: torch.Size, stride: tp.Sequence[int],
                 dtype: torch.dtype) -> tp.Optional[torch.Tensor]:
    """The gradients as one tensor of the packed layout, where they already are its parts in one buffer (the
    memory-efficient attention's backward allocates its q/k/v gradients packed when q/k/v are so): a view, no copy.
    None otherwise."""
    first = grads[0]
    part_stride = tuple(st for index, st in enumerate(stride) if index != dim)
    for index, grad in enumerate(grads):
        if (grad.dtype != dtype or grad.stride() != part_stride
                or grad.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or grad.storage_offset() != first.storage_offset() + index * stride[dim]):
            return None
    return first.as_strided(shape, stride, first.storage_offset())


class _Split(torch.autograd.Function):
    """`x.unbind(dim)`, whose backward writes the gradients into a tensor laid out as `x` is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int):  # type: ignore
        ctx.dim, ctx.layout = dim, (x.shape, x.stride(), x.dtype, x.device)
        ctx.dense = _dense(x)
        return x.unbind(dim)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore
        # (an unused part's gradient comes as zeros: autograd materialises them for a Function)
        shape, stride, dtype, device = ctx.layout
        if not ctx.dense:  # (a layout no tensor of its own can take: torch's stack, as torch.unbind's backward)
            return torch.stack(grads, ctx.dim), None
        packed = _packed_view(grads, ctx.dim, shape, stride, dtype)
        if packed is not None:  # (the attention's backward wrote them packed already: nothing to copy)
            return packed, None
        out = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        for index, grad in enumerate(grads):
            out.select(ctx.dim, index).copy_(grad)
        return out, None


def unbind(x: torch.Tensor, dim: int = 0) -> tp.Tuple[torch.Tensor, ...]:
    """`torch.unbind` forward; in backward one pass writing the gradients in `x`'s layout (`torch.unbind` itself
    under torch.compile)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not x.requires_grad:
        return torch.unbind(x, dim)
    return _Split.apply(x, dim)


class _Ops:
    """xformers' `ops` with `unbind` above."""
    unbind = staticmethod(unbind)

    def __init__(self, ops: tp.Any):
        self._ops = ops

    def __getattr__(self, name: str):  # everything but unbind: xformers' own
        return getattr(self._ops, name)


def install(enabled: bool = True) -> bool:
    """Make AudioCraft's transformer split the packed q/k/v with `unbind` above (idempotent), or with `enabled=False`
    with xformers' own again (benchmarks/step_time.py: AudioCraft's full fine-tune as it is); returns `enabled`."""
    from audiocraft.modules import transformer
    if enabled and not isinstance(transformer.ops, _Ops):
        transformer.ops = _Ops(transformer.ops)
    elif not enabled and isinstance(transformer.ops, _Ops):
        transformer.ops = transformer.ops._ops
    return enabled
