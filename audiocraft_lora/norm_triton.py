"""Triton's JIT kernels of `norm_kernels` (see there): imported only where they are used, so that a machine
without Triton imports the rest. Defined at import, so `TRITON_INTERPRET=1` must be set before."""
import triton
import triton.language as tl

__all__ = ['triton', 'forward_kernel', 'backward_kernel']


@triton.jit
def store(pointer, value, inside, BF16: tl.constexpr):
    if BF16:  # to nearest even by hand (the pointer: a bf16 tensor viewed as int16)
        bits = value.to(tl.uint32, bitcast=True)
        bits = tl.where(value != value, 0x7FC00000, bits)  # any NaN as the quiet one first: no carry out of it
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(pointer, bits.to(tl.int16), mask=inside)  # (truncated: the low 16 bits)
    else:
        tl.store(pointer, value.to(pointer.dtype.element_ty), mask=inside)


@triton.jit
def forward_kernel(X, Y, H, W, B, OUT, MEAN, RSTD, width, eps, BLOCK: tl.constexpr, HAS_Y: tl.constexpr,
                   OUT_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    offsets = row * width + cols
    x = tl.load(X + offsets, mask=inside, other=0.).to(tl.float32)
    if HAS_Y:
        x = x + tl.load(Y + offsets, mask=inside, other=0.).to(tl.float32)
        tl.store(H + offsets, x, mask=inside)
    mean = tl.sum(x, axis=0) / width
    centered = tl.where(inside, x - mean, 0.)
    rstd = 1. / tl.sqrt(tl.sum(centered * centered, axis=0) / width + eps)
    w = tl.load(W + cols, mask=inside, other=0.).to(tl.float32)
    b = tl.load(B + cols, mask=inside, other=0.).to(tl.float32)
    store(OUT + offsets, centered * rstd * w + b, inside, OUT_BF16)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def backward_kernel(G, X, W, MEAN, RSTD, GH, DX, DY, width, BLOCK: tl.constexpr, HAS_GH: tl.constexpr,
                    HAS_DY: tl.constexpr, DY_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    offsets = row * width + cols
    g = tl.load(G + offsets, mask=inside, other=0.).to(tl.float32)
    x = tl.load(X + offsets, mask=inside, other=0.).to(tl.float32)
    w = tl.load(W + cols, mask=inside, other=0.).to(tl.float32)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    xhat = tl.where(inside, (x - mean) * rstd, 0.)
    wg = tl.where(inside, w * g, 0.)
    c1 = tl.sum(xhat * wg, axis=0) / width
    c2 = tl.sum(wg, axis=0) / width
    dx = (wg - (xhat * c1 + c2)) * rstd
    if HAS_GH:
        dx = tl.load(GH + offsets, mask=inside, other=0.).to(tl.float32) + dx
    tl.store(DX + offsets, dx, mask=inside)
    if HAS_DY:
        store(DY + offsets, dx, inside, DY_BF16)
