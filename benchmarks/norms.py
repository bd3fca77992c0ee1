"""One transformer layer norm alone, as a LoRA step runs it: AudioCraft's (float32 norm, then its reader's cast to
bf16; backward: the bf16 gradient widened, then the norm's backward) against `lora.fused_norms` (audiocraft_lora/
fused_norms.py: one kernel each way). Forward and forward + backward, median of the repeats, at MusicGen's widths and
the rows of a batch x 30 s step; prints the times, the bytes each moves, the ratios, and how far the values are
apart. Run by hand on a GPU (on a CPU both are ATen's kernels)::

    python benchmarks/norms.py                       # small/medium/large widths, batch 16 x 1500 frames
    python benchmarks/norms.py --rows 6000 --widths 1024
"""
import argparse
import statistics
import time

import torch
from torch import nn


def timed(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rows', type=int, default=16 * 1500, help='batch x frames')
    parser.add_argument('--widths', default='1024,1536,2048', help='musicgen small, medium, large')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args(argv)
    from audiocraft_lora import fused_norms
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if device.type == 'cuda':
        print(f"Triton kernels usable on {device}: {fused_norms.triton_ok(device)}")
    results = {}
    print(f"{'width':>6} {'path':<10} {'fwd ms':>8} {'fwd+bwd ms':>11} {'GB moved':>9}")
    for width in [int(w) for w in args.widths.split(',')]:
        gen = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(args.rows, width, device=device, generator=gen) * 2).requires_grad_(True)
        grad = torch.randn(args.rows, width, device=device, generator=gen).to(torch.bfloat16)
        norm = nn.LayerNorm(width, device=device).requires_grad_(False)
        norm.weight.data.normal_(1.0, 0.1, generator=gen)
        norm.bias.data.normal_(0.0, 0.1, generator=gen)
        fused = nn.LayerNorm(width, device=device).requires_grad_(False)
        fused.load_state_dict(norm.state_dict())
        fused.__class__ = fused_norms.FusedLayerNorm  # (what fused_norms.install does to the LM's norms)
        outs = {}
        # bytes: forward reads x (f32) and writes the bf16 output (+ the f32 output and its cast's read: AudioCraft's);
        # backward reads the bf16 gradient and x, writes dx (+ the widened gradient written and read: AudioCraft's)
        n = args.rows * width
        moved = {'aten': (4 + 4 + 4 + 2 + 2 + 4 + 4 + 4 + 4) * n, 'fused': (4 + 2 + 2 + 4 + 4) * n}
        for name, module in (('aten', lambda t: norm(t).to(torch.bfloat16)), ('fused', fused)):
            def forward():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return module(x)

            def both():
                torch.autograd.grad(forward(), x, grad)
            for _ in range(3):  # (Triton compiles at the first call)
                both()
            out = forward()
            (dx,) = torch.autograd.grad(out, x, grad)
            outs[name] = (out.detach(), dx)
            with torch.no_grad():
                fwd = timed(forward, args.repeats, sync)
            total = timed(both, args.repeats, sync)
            results[(width, name)] = {'forward_s': fwd, 'total_s': total, 'gbytes': moved[name] / 1e9}
            print(f"{width:>6} {name:<10} {fwd * 1e3:>8.3f} {total * 1e3:>11.3f} {moved[name] / 1e9:>9.2f}")
        (out_a, dx_a), (out_f, dx_f) = outs['aten'], outs['fused']
        differ = float((out_a != out_f).float().mean())
        worst = float((dx_a - dx_f).abs().max() / dx_a.abs().max())
        a, f = results[(width, 'aten')], results[(width, 'fused')]
        print(f"{width:>6} fused/aten: forward {f['forward_s'] / a['forward_s']:.3f}, forward+backward "
              f"{f['total_s'] / a['total_s']:.3f}; bf16 outputs that differ {differ:.2e} (1 ulp where float32 sums "
              f"round apart), worst relative dx difference {worst:.2e}")
    layers = {1024: 24, 1536: 48, 2048: 48}
    for width in [int(w) for w in args.widths.split(',')]:
        a, f = results[(width, 'aten')], results[(width, 'fused')]
        count = 3 * layers.get(width, 24)
        print(f"width {width}: {count} norms a step save {(a['total_s'] - f['total_s']) * count * 1e3:.1f} ms")
    return results


if __name__ == '__main__':
    main()
