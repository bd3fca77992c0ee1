"""The matrix products of one LoRA projection, timed alone at MusicGen's shapes: are the rank-r products (tall-skinny
and small-output, K = batch x frames) cheap next to the base GEMM that LoRA saves (the frozen weight's gradient)?

    python benchmarks/lora_gemms.py --dim 1024 --tokens 6000,24000      (GPU; on a CPU use small --tokens)

Per projection (in_proj d->3d, out_proj d->d, linear1 d->4d, linear2 4d->d) it prints microseconds per product:
base forward, base input gradient, the weight gradient full fine-tuning pays and LoRA skips, and LoRA's products
(`x A^T`, `g B`, `dA = gb^T x`, `dB = g^T u`; with dropout `y + u B^T` and `g W + gb A`; without, the merged weight
`W + s B A` built twice), then LoRA's extra time as a share of the skipped weight gradient. `--variants` times other
formulations of the same products (rank padding, split-K, `x [W; A]^T`, and for the dropout path the update
added in a second pass vs one GEMM over `[x, u]` and `[W, s B]`).
"""
import argparse
import typing as tp

import torch
from torch.nn import functional as F


def timed(fn: tp.Callable[[], tp.Any], iters: int, cuda: bool) -> float:
    """Median microseconds of fn()."""
    import time
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return times[len(times) // 2]


def operands(n: int, fan_in: int, fan_out: int, rank: int, dtype: torch.dtype,
             device: str) -> tp.Tuple[torch.Tensor, ...]:
    """Input x [n, in], output gradient g [n, out], frozen W [out, in], LoRA A [r, in] and B [out, r]."""
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = ((n, fan_in, 1.0), (n, fan_out, 1.0), (fan_out, fan_in, fan_in ** -0.5), (rank, fan_in, fan_in ** -0.5),
              (fan_out, rank, rank ** -0.5))
    return tuple(torch.randn(rows, cols, device=device, dtype=dtype, generator=gen) * scale
                 for rows, cols, scale in shapes)


def products(n: int, fan_in: int, fan_out: int, rank: int, dtype: torch.dtype, device: str, iters: int) -> dict:
    cuda = device == 'cuda'
    x, g, w, a, b = operands(n, fan_in, fan_out, rank, dtype, device)
    y = F.linear(x, w)
    u = F.linear(x, a)
    gb = torch.mm(g, b)
    gw = torch.mm(g, w)
    return {
        'base fwd x W^T': timed(lambda: F.linear(x, w), iters, cuda),
        'base dx g W': timed(lambda: torch.mm(g, w), iters, cuda),
        'SKIPPED dW g^T x': timed(lambda: torch.mm(g.t(), x), iters, cuda),
        'lora u = x A^T': timed(lambda: F.linear(x, a), iters, cuda),
        'lora y + u B^T': timed(lambda: torch.addmm(y, u, b.t(), alpha=2.0), iters, cuda),
        'lora gb = g B': timed(lambda: torch.mm(g, b), iters, cuda),
        'lora dx += gb A': timed(lambda: torch.addmm(gw, gb, a), iters, cuda),
        'lora dA gb^T x': timed(lambda: torch.mm(gb.t(), x), iters, cuda),
        'lora dA (x^T gb)^T': timed(lambda: torch.mm(x.t(), gb).t(), iters, cuda),
        'lora dA fp32 out': timed(lambda: torch.mm(gb.t().float(), x.float()), iters, cuda),
        'lora dB g^T u': timed(lambda: torch.mm(g.t(), u), iters, cuda),
        'lora dB (u^T g)^T': timed(lambda: torch.mm(u.t(), g).t(), iters, cuda),
        'merge W + s B A': timed(lambda: torch.addmm(w, b, a, alpha=2.0), iters, cuda),
    }


def variants(n: int, fan_in: int, fan_out: int, rank: int, dtype: torch.dtype, device: str, iters: int) -> dict:
    """Other ways to compute the rank-r products (the same values): which kernels does the GPU run best?"""
    cuda = device == 'cuda'
    x, g, w, a, b = operands(n, fan_in, fan_out, rank, dtype, device)
    a64 = torch.cat([a, torch.zeros(64 - rank, fan_in, device=device, dtype=dtype)]) if rank < 64 else a
    b64 = torch.cat([b, torch.zeros(fan_out, 64 - rank, device=device, dtype=dtype)], 1) if rank < 64 else b
    u = F.linear(x, a)
    gb = torch.mm(g, b)
    wa = torch.cat([w, a])
    wb = torch.cat([w, 2.0 * b], 1)  # [W, s B]: with dropout, y = [x, u] [W, s B]^T is one GEMM over K = in + r
    chunks = 8 if n % 8 == 0 else 1

    def split_k(left_t: torch.Tensor, right: torch.Tensor) -> torch.Tensor:  # sum over chunks of the long dim
        k = left_t.shape[0] // chunks
        return torch.bmm(left_t.view(chunks, k, -1).transpose(1, 2), right.view(chunks, k, -1)).sum(0)
    return {
        'u: x A^T': timed(lambda: F.linear(x, a), iters, cuda),
        'u: (A x^T)^T': timed(lambda: torch.mm(a, x.t()).t(), iters, cuda),
        'u: rank padded to 64': timed(lambda: F.linear(x, a64), iters, cuda),
        'y,u: x [W; A]^T': timed(lambda: F.linear(x, wa), iters, cuda),
        'dropout y: xW^T + uB^T': timed(lambda: torch.addmm(F.linear(x, w), u, b.t(), alpha=2.0), iters, cuda),
        'dropout y: [x,u][W,sB]^T': timed(lambda: F.linear(torch.cat([x, u], 1), wb), iters, cuda),
        'y: x W^T (same, alone)': timed(lambda: F.linear(x, w), iters, cuda),
        'gb: g B': timed(lambda: torch.mm(g, b), iters, cuda),
        'gb: rank padded to 64': timed(lambda: torch.mm(g, b64), iters, cuda),
        'dA: gb^T x': timed(lambda: torch.mm(gb.t(), x), iters, cuda),
        'dA: 8-way split-K bmm': timed(lambda: split_k(gb, x), iters, cuda),
        'dB: g^T u': timed(lambda: torch.mm(g.t(), u), iters, cuda),
        'dB: 8-way split-K bmm': timed(lambda: split_k(g, u), iters, cuda),
        'merge: W + s B A': timed(lambda: torch.addmm(w, b, a, alpha=2.0), iters, cuda),
    }


def main(argv: tp.Optional[tp.List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dim', type=int, default=1024)
    parser.add_argument('--tokens', default='6000,24000', help='batch x frames, comma separated')
    parser.add_argument('--rank', type=int, default=16)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--variants', action='store_true',
                        help='also time other formulations of the rank-r products (rank padding, split-K, [W; A])')
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == 'cuda' else torch.float32
    d = args.dim
    shapes = {'in_proj': (d, 3 * d), 'out_proj': (d, d), 'linear1': (d, 4 * d), 'linear2': (4 * d, d)}
    out = {}
    for n in (int(t) for t in args.tokens.split(',')):
        print(f"dim {d}, tokens {n}, rank {args.rank}, {dtype}, {args.device}: microseconds per product")
        rows = {name: products(n, fi, fo, args.rank, dtype, args.device, args.iters)
                for name, (fi, fo) in shapes.items()}
        keys = list(next(iter(rows.values())))
        print(f"{'product':<20}" + ''.join(f"{name:>10}" for name in rows))
        for key in keys:
            print(f"{key:<20}" + ''.join(f"{rows[name][key]:>10.1f}" for name in rows))
        for name, r in rows.items():
            shared = r['lora u = x A^T'] + r['lora gb = g B'] + r['lora dA gb^T x'] + r['lora dB g^T u']
            merged = shared + 2 * r['merge W + s B A']
            added = shared + r['lora y + u B^T'] + r['lora dx += gb A']
            print(f"  {name}: LoRA's extra {merged:.1f} us without dropout (merged W + sBA), {added:.1f} us with "
                  f"(update added to the activations), against {r['SKIPPED dW g^T x']:.1f} us of skipped dW: "
                  f"{merged / r['SKIPPED dW g^T x']:.2f} / {added / r['SKIPPED dW g^T x']:.2f}")
        out[n] = rows
        if args.variants:
            alt = {name: variants(n, fi, fo, args.rank, dtype, args.device, args.iters)
                   for name, (fi, fo) in shapes.items()}
            print(f"{'variant':<24}" + ''.join(f"{name:>10}" for name in alt))
            for key in next(iter(alt.values())):
                print(f"{key:<24}" + ''.join(f"{alt[name][key]:>10.1f}" for name in alt))
            out[f'{n}_variants'] = alt
    return out


if __name__ == '__main__':
    main()
