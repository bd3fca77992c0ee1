"""The matrix products of one LoRA projection, timed alone at MusicGen's shapes: are the rank-r products (tall-skinny
and small-output, K = batch x frames) cheap next to the base GEMM that LoRA saves (the frozen weight's gradient)?

    python benchmarks/lora_gemms.py --dim 1024 --tokens 6000,24000      (GPU; on a CPU use small --tokens)

Per projection (in_proj d->3d, out_proj d->d, linear1 d->4d, linear2 4d->d) it prints microseconds per product:
base forward, base input gradient, the weight gradient full fine-tuning pays and LoRA skips, and LoRA's five
products (`x A^T`, `y + u B^T`, `g B`, `g W + gb A`, `dA = gb^T x`, `dB = g^T u`) with a transposed variant of each
weight gradient, then LoRA's extra time as a share of the skipped weight gradient.
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


def products(n: int, fan_in: int, fan_out: int, rank: int, dtype: torch.dtype, device: str, iters: int) -> dict:
    cuda = device == 'cuda'
    g_ = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, fan_in, device=device, dtype=dtype, generator=g_)
    g = torch.randn(n, fan_out, device=device, dtype=dtype, generator=g_)
    w = torch.randn(fan_out, fan_in, device=device, dtype=dtype, generator=g_) / fan_in ** 0.5
    a = torch.randn(rank, fan_in, device=device, dtype=dtype, generator=g_) / fan_in ** 0.5
    b = torch.randn(fan_out, rank, device=device, dtype=dtype, generator=g_) / rank ** 0.5
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
    }


def main(argv: tp.Optional[tp.List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dim', type=int, default=1024)
    parser.add_argument('--tokens', default='6000,24000', help='batch x frames, comma separated')
    parser.add_argument('--rank', type=int, default=16)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--iters', type=int, default=20)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == 'cuda' else torch.float32
    d = args.dim
    shapes = {'in_proj': (d, 3 * d), 'out_proj': (d, d), 'linear1': (d, 4 * d), 'linear2': (4 * d, d)}
    out = {}
    for n in (int(t) for t in args.tokens.split(',')):
        print(f"dim {d}, tokens {n}, rank {args.rank}, {dtype}, {args.device}: microseconds per product")
        rows = {name: products(n, fi, fo, args.rank, dtype, args.device, args.iters) for name, (fi, fo) in shapes.items()}
        keys = list(next(iter(rows.values())))
        print(f"{'product':<20}" + ''.join(f"{name:>10}" for name in rows))
        for key in keys:
            print(f"{key:<20}" + ''.join(f"{rows[name][key]:>10.1f}" for name in rows))
        for name, r in rows.items():
            extra = (r['lora u = x A^T'] + r['lora y + u B^T'] + r['lora gb = g B'] + r['lora dx += gb A']
                     + r['lora dA gb^T x'] + r['lora dB g^T u'])
            print(f"  {name}: LoRA's extra {extra:.1f} us = {extra / r['SKIPPED dW g^T x']:.2f} of the skipped dW "
                  f"({r['SKIPPED dW g^T x']:.1f} us)")
        out[n] = rows
    return out


if __name__ == '__main__':
    main()
