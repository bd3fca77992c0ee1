"""LoRA dropout inside the rank-r products (`lora.dropout_kernel`): no mask and no dropped-out copy of the input.

With LoRA dropout the fast path's projection is `y = x W^T + s (dropout(x) A^T) B^T`. torch's dropout writes
`dropout(x)` and a bool mask (5 bytes an element with the read of x), the rank-r product reads it again, and
backward adds `s ((g B) A) * mask / (1 - p)` to dx through a written `[N, in]` product and an `addcmul_` (9 bytes an
element); both tensors are kept from forward to backward (3 bytes an element: ~5 GiB at musicgen-small batch 16 x
30 s, all four dropout sites of every layer). Here the decision of each element is drawn by a counter-based
generator from a per-call seed (a one-element tensor drawn from torch's generator: `draw_seed`) wherever it is
needed, and three Triton kernels fold it into the products (dropout_triton.py):

- `rank_product`: `u = s / (1 - p) * (keep * x) A^T` in one pass over x (forward);
- `masked_update_`: `dx += keep * (g_B A) / (1 - p)` in place, with `g_B = s g B` ([N, r]): one read and one write
  of dx (backward);
- `rank_grad`: `dA = (g_B)^T (keep * x) / (1 - p)`, float32, over x (backward);
- `masked_backward_`: the last two in one kernel, each decision drawn once (`FUSED_BACKWARD`, off: slower in the step).

Backward keeps x (which dA reads anyway) and the seed, no mask: LoRA dropout then costs the memory of no dropout,
and activation checkpointing and the layers' CUDA graphs keep nothing for it but the seed (a capture replays its
draw, and the kernels read it from the graph's memory). Each call gets a new seed, so masks are as independent as
torch's; they are not torch's masks (another stream of the same Philox generator), so a step is not bit for bit the
one torch's dropout would take with the same generator state: the same distribution, keep probability
`1 - round(65536 p) / 65536` (`keep_scale` is its inverse, so the expectation is exact).

`auto` uses them for fast-path projections on CUDA, in bf16 or fp16, up to rank `MAX_RANK`, after `kernels_ok` has
checked them on the device against torch (once per device; `check` before training); elsewhere (CPU, float32,
inside torch.compile) it is torch's dropout. The ops are torch custom ops with fake implementations, so the memory
estimate, selective checkpointing's policy (`rank_product`'s `[N, r]` output is kept, as a matmul's) and
`benchmarks/gpu_model.py` see them. Tests run the kernels on CPU tensors under `TRITON_INTERPRET=1`.
"""
import functools
import logging
import os
import typing as tp

import torch

from .norm_kernels import _bits, _on

logger = logging.getLogger(__name__)

__all__ = ['MAX_RANK', 'threshold', 'keep_scale', 'applies', 'draw_seed', 'rank_product', 'rank_product_beside',
           'masked_update_', 'rank_grad', 'masked_backward_', 'keep_mask', 'kernels_ok', 'check', 'set_dropout_kernel',
           'wants_dropout_kernel', 'FUSED_BACKWARD']

MAX_RANK = 128
# Tiles, from an offline sm_90 compile of the kernels (session 17's review: registers and grid, not yet timed):
# rank_product 64 x 64 at 8 warps (62 registers); masked_update 64 x 64 at 4 warps (80; at 128 columns 167
# registers and 3 programs an SM); rank_grad 64 x 64 (95 registers, ~5 programs an SM; at 128 columns 218), its row
# blocks per program a power of two giving at least _GRAD_PROGRAMS programs (about two waves on an H100)
_BM, _BK, _WARPS = 64, 64, 8
_UPDATE_BM, _UPDATE_BK = 64, 64
_GRAD_BM, _GRAD_BK, _GRAD_PROGRAMS = 64, 64, 1024
# Backward by `masked_backward_` (one kernel: each decision drawn once, the rank-r gradient read once) instead of
# `masked_update_` then `rank_grad` (each drawing them): off, timed on an H200 in session 20: alone 1.78 vs 1.83 ms
# (benchmarks/cuda_checks.py's dropout line) but slower in the recipe's graphed step, 0.0824 vs 0.0805 s
# (step_time.py's `_fdrop` cases; with `selective` 0.0892 vs 0.0880 s). The kernels are bound by instructions more
# than bytes (session 18 on an H100: linear2 of small b16 forward + backward 1.85 ms with the kernels, 1.71 with
# torch's dropout, 1.22 without); compiled for sm_90a (benchmarks/sm90_stats.py) the two take ~59 instructions an
# element, 42-49% of them the draw, the fused one ~44, at 211 registers (8 warps an SM).
FUSED_BACKWARD = False


def threshold(p: float) -> int:
    """16-bit threshold of dropout probability `p`: an element is kept where its draw is at least this."""
    return min(65535, max(0, round(float(p) * 65536)))


def keep_scale(p: float) -> float:
    """1 / (probability of keeping an element) at `p`'s threshold: the scale that keeps the expectation exact."""
    return 65536.0 / (65536 - threshold(p))


# Triton's interpreter (the tests: CPU tensors) is chosen when the kernels are defined, so read once, at import too
_INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'


def _on_gpu(t: torch.Tensor) -> bool:
    """Where the kernels run: CUDA tensors (CPU ones under Triton's interpreter, for the tests)."""
    return t.device.type == 'cuda' or (_INTERPRETED and t.device.type == 'cpu')


def applies(x: torch.Tensor, dtype: torch.dtype, rank: int) -> bool:
    """Whether the kernels take the dropout of input `x`, computed in `dtype`, of a rank-`rank` adapter."""
    return (dtype in (torch.bfloat16, torch.float16) and 0 < rank <= MAX_RANK and _on_gpu(x)
            and not torch.compiler.is_compiling())


def draw_seed(device: torch.device) -> torch.Tensor:
    """A call's seed: one int64 drawn from torch's generator on `device` (a CUDA graph replays the draw: a new seed
    at every replay; torch's checkpoint restores the generator around a recompute: the same seed again)."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import dropout_triton
    return dropout_triton


def _block_rank(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


def _flags(t: torch.Tensor) -> dict:
    return {'BF16': t.dtype == torch.bfloat16, 'LOW': not _INTERPRETED}


def _rank_product(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, scale: float, p: float,
                  beside: bool) -> torch.Tensor:
    x, a = x.contiguous(), a.contiguous()
    (rows, cols), rank = x.shape, a.shape[0]
    out = x.new_empty(rows, cols + rank if beside else rank)
    if rows:
        with _on(x.device):
            _kernels().rank_product_kernel[(-(-rows // _BM),)](
                _bits(x), _bits(a), _bits(out[:, cols:] if beside else out), _bits(out), seed, rows, cols, rank,
                out.stride(0), scale * keep_scale(p), threshold(p), BM=_BM, BK=_BK, BR=_block_rank(rank),
                STEPS=-(-cols // _BK), COPY=beside, num_warps=_WARPS, **_flags(x))
    return out


@torch.library.custom_op('audiocraft_lora::dropout_rank_product', mutates_args=())
def rank_product(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, scale: float, p: float) -> torch.Tensor:
    """`scale * keep_scale(p) * (keep * x) @ a.T`: x [N, in], a [r, in] (same dtype) -> [N, r] in x's dtype."""
    return _rank_product(x, a, seed, scale, p, beside=False)


@rank_product.register_fake
def _(x, a, seed, scale, p):
    return x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op('audiocraft_lora::dropout_rank_product_beside', mutates_args=())
def rank_product_beside(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, scale: float,
                        p: float) -> torch.Tensor:
    """`[x | rank_product(x, ...)]` ([N, in + r]) in one pass over x: x copied beside u, so that `[x | u] @ [W | B]^T`
    is the projection in one GEMM (where the input is narrower than the output, cheaper than adding `u B^T` to it)."""
    return _rank_product(x, a, seed, scale, p, beside=True)


@rank_product_beside.register_fake
def _(x, a, seed, scale, p):
    return x.new_empty(x.shape[0], x.shape[1] + a.shape[0])


@torch.library.custom_op('audiocraft_lora::dropout_masked_update', mutates_args=('dx',))
def masked_update_(dx: torch.Tensor, gb: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    """`dx += keep_scale(p) * keep * (gb @ a)` in place: dx [N, in] (contiguous), gb [N, r], a [r, in]."""
    if not dx.is_contiguous():
        raise ValueError("masked_update_ writes dx in place: it must be contiguous")
    gb, a = gb.contiguous(), a.contiguous()
    rows, cols = dx.shape
    if rows:
        with _on(dx.device):
            grid = (-(-rows // _UPDATE_BM), -(-cols // _UPDATE_BK))
            _kernels().masked_update_kernel[grid](
                _bits(dx), _bits(gb), _bits(a), seed, rows, cols, a.shape[0], keep_scale(p), threshold(p),
                BM=_UPDATE_BM, BK=_UPDATE_BK, BR=_block_rank(a.shape[0]), **_flags(dx))


@masked_update_.register_fake
def _(dx, gb, a, seed, p):
    return None


@torch.library.custom_op('audiocraft_lora::dropout_rank_grad', mutates_args=())
def rank_grad(gb: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """`keep_scale(p) * gb.T @ (keep * x)` in float32: gb [N, r], x [N, in] (rows may be apart: `[x | u]`'s x) ->
    [r, in] (the adapter's dA)."""
    gb = gb.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _grad_parts(lambda grid, parts, **tiles: _kernels().rank_grad_kernel[grid](
        _bits(gb), _bits(x), parts, seed, x.shape[0], x.shape[1], gb.shape[1], x.stride(0), keep_scale(p),
        threshold(p), **tiles), gb, x)


@rank_grad.register_fake
def _(gb, x, seed, p):
    return x.new_empty(gb.shape[1], x.shape[1], dtype=torch.float32)


def _grad_parts(launch: tp.Callable[..., None], gb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dA (float32 [r, in]) from a kernel writing partial sums over row blocks: `launch(grid, parts, **tiles)` on gb
    [N, r] (contiguous) and x [N, in] (unit column stride; rows may be apart), its row blocks per program a power of
    two (few compiled variants) giving at least _GRAD_PROGRAMS programs."""
    (rows, cols), rank = x.shape, gb.shape[1]
    if not rows:
        return x.new_zeros(rank, cols, dtype=torch.float32)
    blocks, row_blocks = -(-cols // _GRAD_BK), -(-rows // _GRAD_BM)
    steps = 1 << max(0, (row_blocks * blocks // _GRAD_PROGRAMS).bit_length() - 1)
    parts = torch.empty(-(-row_blocks // steps), rank, cols, dtype=torch.float32, device=x.device)
    with _on(x.device):
        launch((blocks, parts.shape[0]), parts, BM=_GRAD_BM, BK=_GRAD_BK, BR=_block_rank(rank), STEPS=steps,
               **_flags(x))
    return parts.sum(0)


@torch.library.custom_op('audiocraft_lora::dropout_masked_backward', mutates_args=('dx',))
def masked_backward_(dx: torch.Tensor, gb: torch.Tensor, a: torch.Tensor, x: torch.Tensor, seed: torch.Tensor,
                     p: float) -> torch.Tensor:
    """`masked_update_(dx, gb, a, seed, p)` and `rank_grad(gb, x, seed, p)` (returned) in one kernel that draws each
    decision once (`FUSED_BACKWARD`): the same values, dA's sums in rank_grad's order."""
    if not dx.is_contiguous():
        raise ValueError("masked_backward_ writes dx in place: it must be contiguous")
    gb, a = gb.contiguous(), a.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _grad_parts(lambda grid, parts, **tiles: _kernels().masked_backward_kernel[grid](
        _bits(dx), _bits(gb), _bits(a), _bits(x), parts, seed, x.shape[0], x.shape[1], gb.shape[1], x.stride(0),
        keep_scale(p), threshold(p), **tiles), gb, x)


@masked_backward_.register_fake
def _(dx, gb, a, x, seed, p):
    return x.new_empty(gb.shape[1], x.shape[1], dtype=torch.float32)


@torch.library.custom_op('audiocraft_lora::dropout_keep', mutates_args=())
def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The [rows, cols] bool decisions the kernels draw under `seed` (the tests' reference; a trainable base)."""
    out = torch.empty(rows, cols, dtype=torch.int8, device=seed.device)
    if rows and cols:
        with _on(seed.device):
            grid = (-(-rows // _UPDATE_BM), -(-cols // _UPDATE_BK))
            _kernels().keep_kernel[grid](seed, out, rows, cols, threshold(p), BM=_UPDATE_BM, BK=_UPDATE_BK)
    return out.bool()


@keep_mask.register_fake
def _(seed, rows, cols, p):
    return torch.empty(rows, cols, dtype=torch.bool, device=seed.device)


_CHECKED: tp.Dict[tp.Tuple[torch.device, bool], bool] = {}  # (device, FUSED_BACKWARD): the check's verdict


def kernels_ok(device: tp.Union[str, torch.device]) -> bool:
    """Whether the kernels run on `device` and agree with torch (once per device; False, with a warning, where they
    can't: no Triton, an unsupported GPU, a compiler error). Not checked during a CUDA graph capture (a check syncs):
    False there, and `check` runs it before training."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    key = (device, FUSED_BACKWARD)
    if key in _CHECKED:
        return _CHECKED[key]
    if device.type == 'cuda' and torch.cuda.is_current_stream_capturing():
        return False
    try:
        error = _disagreement(device)
    except Exception as exc:
        error = f'{type(exc).__name__}: {exc}'
    if error and FUSED_BACKWARD:  # (`check` then tries the two-kernel backward)
        logger.warning("lora.dropout_kernel: the fused backward kernel (FUSED_BACKWARD) can't be used on %s (%s).",
                       device, error)
    elif error:
        logger.warning("lora.dropout_kernel: the Triton LoRA dropout kernels can't be used on %s (%s); LoRA dropout "
                       "runs torch's dropout there (its mask kept for backward).", device, error)
    _CHECKED[key] = not error
    return not error


def _disagreement(device: torch.device) -> tp.Optional[str]:
    """What differs between the kernels and torch on `device` (None: nothing): ragged sizes (rows, columns not a
    multiple of 8, ranks 8 and 24 padded; dA's partial sums over several row blocks a program), bf16 and fp16, against
    float32 products with the kernels' own mask; each kernel's mask read back exactly; the keep rate; a new seed, a
    new mask."""
    global _GRAD_PROGRAMS
    programs = _GRAD_PROGRAMS
    _GRAD_PROGRAMS = 2  # (dA's programs take several row blocks each, as at training sizes)
    try:
        return _products_disagree(device) or _masks_disagree(device)
    finally:
        _GRAD_PROGRAMS = programs


def _products_disagree(device: torch.device) -> tp.Optional[str]:
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for rows, cols, rank in ((70, 200, 8), (331, 96, 24)):
            x = torch.randn(rows, cols, device=device, generator=gen).to(dtype)
            a = torch.randn(rank, cols, device=device, generator=gen).to(dtype)
            gb = torch.randn(rows, rank, device=device, generator=gen).to(dtype)
            dx = torch.randn(rows, cols, device=device, generator=gen).to(dtype)
            seed, p = torch.tensor([12345], device=device), 0.25
            kept = keep_mask(seed, rows, cols, p) * keep_scale(p)
            checks = {
                'rank_product': (rank_product(x, a, seed, 0.5, p).float(), 0.5 * (x.float() * kept) @ a.float().t()),
                'rank_grad': (rank_grad(gb, x, seed, p), gb.float().t() @ (x.float() * kept)),
            }
            ref = dx.float() + kept * (gb.float() @ a.float())
            fused = dx.clone() if FUSED_BACKWARD else None
            masked_update_(dx, gb, a, seed, p)
            checks['masked_update_'] = (dx.float(), ref)
            both = rank_product_beside(x, a, seed, 0.5, p)  # [x | u]: x as it is, u as rank_product's, bit for bit
            if fused is not None:  # the two kernels' values (up to the products' rounding), on x and on [x | u]'s x
                for name, xs in (('x', x), ('[x | u]', both[:, :cols])):
                    out = fused.clone()
                    grad = masked_backward_(out, gb, a, xs, seed, p)
                    checks[f'masked_backward_ dA on {name}'] = (grad, checks['rank_grad'][0])
                    checks[f'masked_backward_ dx on {name}'] = (out.float(), dx.float())
            for name, (got, want) in checks.items():
                if not _rows_close(got, want, 1e-3 if name.startswith('masked_backward_') else 2e-2):
                    return f"{name} differs from torch's product ({dtype}, {rows}x{cols}, rank {rank})"
            if not (torch.equal(both[:, :cols], x) and torch.equal(both[:, cols:], rank_product(x, a, seed, 0.5, p))
                    and torch.equal(rank_grad(gb, both[:, :cols], seed, p), rank_grad(gb, x, seed, p))):
                return f"rank_product_beside differs from x and rank_product ({dtype}, {rows}x{cols}, rank {rank})"
    return None


def _masks_disagree(device: torch.device) -> tp.Optional[str]:
    """Each kernel's decisions read back exactly (x = 1, A one-hot on 16 columns across group and row edges, p = 0.5:
    keep_scale 2) against `keep_mask`; the keep rate; a new seed, a new mask."""
    rows, cols, seed = 200, 1003, torch.tensor([99], device=device)
    columns = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 500, 999, 1001, 1002], device=device)
    a = torch.zeros(16, cols, device=device, dtype=torch.bfloat16)
    a[torch.arange(16, device=device), columns] = 1
    ones = torch.ones(rows, cols, device=device, dtype=torch.bfloat16)
    want = keep_mask(seed, rows, cols, 0.5).float() * 2
    dx = torch.zeros(rows, cols, device=device, dtype=torch.bfloat16)
    masked_update_(dx, torch.ones(rows, 16, device=device, dtype=torch.bfloat16), a, seed, 0.5)
    got = {'rank_product': rank_product(ones, a, seed, 1.0, 0.5).float(), 'masked_update_': dx.float()[:, columns],
           'rank_grad': rank_grad(torch.ones(rows, 16, device=device, dtype=torch.bfloat16), ones, seed, 0.5)}
    if FUSED_BACKWARD:
        fused = torch.zeros(rows, cols, device=device, dtype=torch.bfloat16)
        fused_grad = masked_backward_(fused, torch.ones(rows, 16, device=device, dtype=torch.bfloat16), a, ones, seed,
                                      0.5)
        if not (torch.equal(fused.float()[:, columns], want[:, columns]) and torch.equal(fused_grad[0], want.sum(0))):
            return "masked_backward_'s mask differs from keep_mask's"
    if not torch.equal(got['rank_grad'][0], want.sum(0)):
        return "rank_grad's mask differs from keep_mask's"
    for name in ('rank_product', 'masked_update_'):
        if not torch.equal(got[name], want[:, columns]):
            return f"{name}'s mask differs from keep_mask's"
    mask = keep_mask(torch.tensor([7], device=device), 512, 1003, 0.5)
    rate = mask.float().mean().item()
    if abs(rate - 0.5) > 0.01:
        return f"the keep rate at p=0.5 is {rate:.4f}"
    pairs = {'neighbouring columns': (mask[:, :-1], mask[:, 1:]), 'columns 4 apart': (mask[:, :-4], mask[:, 4:]),
             "a row's last (partial) group and the next row's first": (mask[:-1, -3:], mask[1:, :3]),  # (1003 % 8)
             'another seed': (mask, keep_mask(torch.tensor([8], device=device), 512, 1003, 0.5))}
    for name, (left, right) in pairs.items():  # (independent draws agree half the time at p = 0.5)
        agree = (left == right).float().mean().item()
        if abs(agree - 0.5) > 0.05:
            return f"the decisions of {name} agree {agree:.3f} of the time (0.5 expected)"
    return None


def _rows_close(got: torch.Tensor, ref: torch.Tensor, tolerance: float) -> bool:
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return bool(((got - ref).abs() <= tolerance * scale).all())


def set_dropout_kernel(model: torch.nn.Module, on: bool) -> int:
    """Fast-path LoRA linears of `model` draw their dropout inside the rank-r products (`on`: dropout_kernels, where
    their rank allows) or by torch; returns how many with dropout were set on."""
    from .speed import _fast_linears_with_dropout, _has_dropout
    linears, _ = _fast_linears_with_dropout(model)
    count = 0
    for module in linears:
        fits = all(lora_a.weight.shape[0] <= MAX_RANK for lora_a in module.lora_A.values())
        module.__dict__['_lora_dropout_kernel'] = bool(on) and fits
        count += bool(on) and fits and _has_dropout(module)
    return count


def wants_dropout_kernel(model: torch.nn.Module) -> bool:
    """Whether a fast-path LoRA linear of `model` with dropout is set to draw it inside the rank-r products."""
    from .speed import _fast_linears_with_dropout, _has_dropout
    linears, _ = _fast_linears_with_dropout(model)
    return any(_has_dropout(m) and m.__dict__.get('_lora_dropout_kernel', False) for m in linears)


def check(model: torch.nn.Module, device: tp.Union[str, torch.device], required: bool = False) -> tp.Optional[bool]:
    """Before training, with the LM on `device`: whether the kernels serve `model`'s fast-path LoRA dropout there
    (None: nothing asks for them). Where they can't (another device, a failed check), its projections are set back to
    torch's dropout; `required` (`lora.dropout_kernel=true`) raises instead."""
    from .errors import LoRAConfigError
    if not wants_dropout_kernel(model):
        return None
    global FUSED_BACKWARD
    device = torch.device(device)
    if FUSED_BACKWARD and device.type == 'cuda' and not kernels_ok(device):
        logger.warning("dropout_kernels.FUSED_BACKWARD: the fused backward kernel failed its check on %s; backward "
                       "runs masked_update_ and rank_grad instead.", device)
        FUSED_BACKWARD = False
    ok = kernels_ok(device) if device.type == 'cuda' else (_INTERPRETED and device.type == 'cpu')
    if not ok and required:
        raise LoRAConfigError(f"lora.dropout_kernel=true: the Triton LoRA dropout kernels can't be used on {device} "
                              "(CUDA only, and they must pass their check: see the warning above). Set "
                              "lora.dropout_kernel=auto or false to use torch's dropout.")
    if not ok:
        set_dropout_kernel(model, False)
    return ok
