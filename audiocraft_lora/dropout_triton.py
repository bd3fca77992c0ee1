"""Triton's JIT kernels of `dropout_kernels` (see there): imported only where they are used, so that a machine
without Triton imports the rest. Defined at import, so `TRITON_INTERPRET=1` must be set before.

Every kernel draws the dropout decision of element (row, col) of an `[M, K]` input the same way, whatever its tiling:
Philox4x32-10 (`tl.randint4x`; torch's dropout uses the same generator) at counter `row * ceil(K / 8) + col // 8`
under the call's seed gives four 32-bit words, i.e. eight 16-bit values, one for each of the eight columns of that
group; the element is kept where its value is at least `threshold` (`round(p * 65536)`).

The row count `M` is not specialized on (one compiled kernel for any batch x length); the rest is. A kernel's first
launch for a new specialization loads a module, which CUDA forbids during a graph capture: the layers' CUDA graphs
run every signature eagerly (their warmup) before capturing it, and `kernels_ok` runs before training.

Operands are bf16 (passed as int16 views: `BF16`) or fp16; `LOW`: the products run in that dtype on tensor cores
(GPUs), else in float32 (Triton's interpreter, which has no bf16: the same products, bf16 values being exact in
float32), accumulated in float32 either way."""
import triton
import triton.language as tl

from .norm_triton import store

__all__ = ['triton', 'keep_kernel', 'rank_product_kernel', 'masked_update_kernel', 'rank_grad_kernel',
           'masked_backward_kernel']


@triton.jit
def _halves(word):
    return tl.interleave(word & 0xFFFF, word >> 16)


@triton.jit
def keep_tile(seed, rows, col_start, groups, threshold, BK: tl.constexpr):
    """[BM, BK] bool: which elements of rows `rows` ([BM] int64) and columns col_start..col_start + BK (col_start
    and BK multiples of 8) dropout keeps."""
    counters = rows[:, None] * groups + (col_start // 8 + tl.arange(0, BK // 8))[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    values = tl.interleave(tl.interleave(_halves(w0), _halves(w1)), tl.interleave(_halves(w2), _halves(w3)))
    return values >= threshold


@triton.jit
def _load(pointer, inside, BF16: tl.constexpr):
    """float32 values of a bf16 (int16 view: its bits widened, exact) or fp16 tensor; 0 outside."""
    if BF16:
        bits = tl.load(pointer, mask=inside, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(pointer, mask=inside, other=0.).to(tl.float32)


@triton.jit
def _dot(left, right, acc, BF16: tl.constexpr, LOW: tl.constexpr):
    """acc + left @ right (float32 values of the operands' dtype: exact in it)."""
    if LOW:
        dtype: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
        return tl.dot(left.to(dtype), right.to(dtype), acc)
    else:
        return tl.dot(left, right, acc, input_precision='ieee')


@triton.jit(do_not_specialize=['M'])
def keep_kernel(SEED, OUT, M, K, threshold, BM: tl.constexpr, BK: tl.constexpr):
    """OUT [M, K] (int8): the keep decisions (what `keep_mask` returns, for the tests and a trainable base)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    col_start = tl.program_id(1) * BK
    cols = col_start + tl.arange(0, BK)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    keep = keep_tile(tl.load(SEED), rows, col_start, (K + 7) // 8, threshold, BK)
    tl.store(OUT + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=inside)


@triton.jit(do_not_specialize=['M'])
def rank_product_kernel(X, A, U, XC, SEED, M, K, R, stride, scale, threshold, BM: tl.constexpr, BK: tl.constexpr,
                        BR: tl.constexpr, STEPS: tl.constexpr, BF16: tl.constexpr, LOW: tl.constexpr,
                        COPY: tl.constexpr):
    """U [M, R] (rows `stride` apart) = scale * (keep * X [M, K]) @ A^T (A [R, K]): one pass over X, no mask written;
    `COPY`: X itself also written to XC (rows `stride` apart: [X | U] in one buffer). STEPS: ceil(K / BK) (loop bounds
    known at compile time: Triton's interpreter can't loop to a runtime bound with numpy 2)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    seed = tl.load(SEED)
    groups = (K + 7) // 8
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for step in range(STEPS):
        col_start = step * BK
        cols = col_start + tl.arange(0, BK)
        inside = (rows < M)[:, None] & (cols < K)[None, :]
        x = _load(X + rows[:, None] * K + cols[None, :], inside, BF16)
        if COPY:
            store(XC + rows[:, None] * stride + cols[None, :], x, inside, BF16)  # (exact: x's own values)
        x = tl.where(keep_tile(seed, rows, col_start, groups, threshold, BK), x, 0.)
        a = _load(A + ranks[None, :] * K + cols[:, None], (ranks < R)[None, :] & (cols < K)[:, None], BF16)
        acc = _dot(x, a, acc, BF16, LOW)
    store(U + rows[:, None] * stride + ranks[None, :], acc * scale, (rows < M)[:, None] & (ranks < R)[None, :], BF16)


@triton.jit(do_not_specialize=['M'])
def masked_update_kernel(DX, GB, A, SEED, M, K, R, scale, threshold, BM: tl.constexpr, BK: tl.constexpr,
                         BR: tl.constexpr, BF16: tl.constexpr, LOW: tl.constexpr):
    """DX [M, K] += scale * keep * (GB [M, R] @ A [R, K]), in place: the rank-r product is never written."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    col_start = tl.program_id(1) * BK
    cols = col_start + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    gb = _load(GB + rows[:, None] * R + ranks[None, :], (rows < M)[:, None] & (ranks < R)[None, :], BF16)
    a = _load(A + ranks[:, None] * K + cols[None, :], (ranks < R)[:, None] & (cols < K)[None, :], BF16)
    update = _dot(gb, a, tl.zeros((BM, BK), dtype=tl.float32), BF16, LOW) * scale
    keep = keep_tile(tl.load(SEED), rows, col_start, (K + 7) // 8, threshold, BK)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    pointers = DX + rows[:, None] * K + cols[None, :]
    store(pointers, _load(pointers, inside, BF16) + tl.where(keep, update, 0.), inside, BF16)


@triton.jit
def _column_part(BK: tl.constexpr, BR: tl.constexpr):
    """dA's programs (j, s): columns j * BK.. (their first, all of them) and part s; the ranks 0..BR."""
    col_start = tl.program_id(0) * BK
    return col_start, tl.program_id(1), col_start + tl.arange(0, BK), tl.arange(0, BR)


@triton.jit(do_not_specialize=['M'])
def rank_grad_kernel(GB, X, PART, SEED, M, K, R, stride, scale, threshold, BM: tl.constexpr, BK: tl.constexpr,
                     BR: tl.constexpr, STEPS: tl.constexpr, BF16: tl.constexpr, LOW: tl.constexpr):
    """PART [P, R, K] (float32): partial sums over rows of scale * GB^T @ (keep * X) (X's rows `stride` apart).
    Program (j, s) takes columns j * BK.. and the STEPS row blocks from s * STEPS * BM on; the sum of the P parts is
    dA."""
    col_start, part, cols, ranks = _column_part(BK, BR)
    seed = tl.load(SEED)
    groups = (K + 7) // 8
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for step in range(STEPS):
        rows = (part.to(tl.int64) * STEPS + step) * BM + tl.arange(0, BM)
        gbt = _load(GB + rows[None, :] * R + ranks[:, None], (rows < M)[None, :] & (ranks < R)[:, None], BF16)
        x = _load(X + rows[:, None] * stride + cols[None, :], (rows < M)[:, None] & (cols < K)[None, :], BF16)
        x = tl.where(keep_tile(seed, rows, col_start, groups, threshold, BK), x, 0.)
        acc = _dot(gbt, x, acc, BF16, LOW)
    tl.store(PART + part * R * K + ranks[:, None] * K + cols[None, :], acc * scale,
             mask=(ranks < R)[:, None] & (cols < K)[None, :])


@triton.jit(do_not_specialize=['M'])
def masked_backward_kernel(DX, GB, A, X, PART, SEED, M, K, R, stride, scale, threshold, BM: tl.constexpr,
                           BK: tl.constexpr, BR: tl.constexpr, STEPS: tl.constexpr, BF16: tl.constexpr,
                           LOW: tl.constexpr):
    """`masked_update_kernel` and `rank_grad_kernel` in one pass, the decisions drawn once: DX [M, K] += scale * keep
    * (GB [M, R] @ A [R, K]) in place, and PART [P, R, K] (float32) the partial sums over rows of scale * GB^T @
    (keep * X) (X's rows `stride` apart), program (j, s) taking columns j * BK.. and the STEPS row blocks from
    s * STEPS * BM on (rank_grad_kernel's tiling: the same sums in the same order)."""
    col_start, part, cols, ranks = _column_part(BK, BR)
    seed = tl.load(SEED)
    groups = (K + 7) // 8
    a = _load(A + ranks[:, None] * K + cols[None, :], (ranks < R)[:, None] & (cols < K)[None, :], BF16)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for step in range(STEPS):
        rows = (part.to(tl.int64) * STEPS + step) * BM + tl.arange(0, BM)
        inside = (rows < M)[:, None] & (cols < K)[None, :]
        gb = _load(GB + rows[:, None] * R + ranks[None, :], (rows < M)[:, None] & (ranks < R)[None, :], BF16)
        keep = keep_tile(seed, rows, col_start, groups, threshold, BK)
        update = _dot(gb, a, tl.zeros((BM, BK), dtype=tl.float32), BF16, LOW) * scale
        pointers = DX + rows[:, None] * K + cols[None, :]
        store(pointers, _load(pointers, inside, BF16) + tl.where(keep, update, 0.), inside, BF16)
        x = tl.where(keep, _load(X + rows[:, None] * stride + cols[None, :], inside, BF16), 0.)
        acc = _dot(tl.trans(gb), x, acc, BF16, LOW)
    tl.store(PART + part * R * K + ranks[:, None] * K + cols[None, :], acc * scale,
             mask=(ranks < R)[:, None] & (cols < K)[None, :])
