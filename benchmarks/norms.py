"""One transformer layer norm alone, as a LoRA step runs it: AudioCraft's against `lora.fused_norms`
(audiocraft_lora/fused_norms.py, one kernel each way). Two kinds, as in the layer:

  norm      norm1: float32 norm, then its reader's cast to bf16 (backward: the bf16 gradient widened, the norm's
            backward, the stream's two gradients summed)
  add+norm  norm_cross / norm2: the residual add `x + branch` (branch in bf16) first (backward: also the sum's cast to
            bf16 for the branch)

Forward and forward + backward (median of the repeats) at MusicGen's widths and the rows of a batch x 30 s step;
prints the times, the bytes each moves, the ratios, what a step's norms save, and how far the values are apart. Run
by hand on a GPU (on a CPU both are ATen's kernels)::

    python benchmarks/norms.py                       # small/medium/large widths, batch 16 x 1500 frames
    python benchmarks/norms.py --rows 6000 --widths 1024
"""
import argparse
import statistics
import time

import torch
from torch import nn

LAYERS = {1024: 24, 1536: 48, 2048: 48}  # musicgen small, medium, large
# bytes an element: forward reads x (f32) [and the bf16 branch, writes the f32 sum], writes the bf16 output (AudioCraft:
# the f32 output, read again by the cast; the sum read again by the norm); backward reads the bf16 gradient, the
# stream and its own gradient, writes dx [and the branch's bf16 gradient] (AudioCraft: the widened gradient written and
# read, the norm's dx written and read again by the sum, the sum read again by the cast)
MOVED = {('norm', 'aten'): 4 + 4 + 4 + 2 + 2 + 4 + 4 + 4 + 4 + 4 + 4 + 4,
         ('norm', 'fused'): 4 + 2 + 2 + 4 + 4 + 4 + 4 + 4,
         ('add+norm', 'aten'): 4 + 2 + 4 + 4 + 4 + 4 + 2 + 2 + 4 + 4 + 4 + 4 + 4 + 4 + 4 + 4 + 2,
         ('add+norm', 'fused'): 4 + 2 + 4 + 2 + 2 + 4 + 4 + 4 + 2}


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
    from audiocraft_lora import fused_norms, norm_kernels
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if device.type == 'cuda':
        print(f"Triton kernels usable on {device}: {norm_kernels.triton_ok(device)}")
    results = {}
    print(f"{'width':>6} {'kind':<9} {'path':<6} {'fwd ms':>8} {'fwd+bwd ms':>11} {'GB moved':>9}")
    for width in [int(w) for w in args.widths.split(',')]:
        gen = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(args.rows, width, device=device, generator=gen) * 2).requires_grad_(True)
        branch = torch.randn(args.rows, width, device=device, generator=gen).to(torch.bfloat16).requires_grad_(True)
        grad = torch.randn(args.rows, width, device=device, generator=gen).to(torch.bfloat16)
        grad_stream = torch.randn(args.rows, width, device=device, generator=gen)
        norm = nn.LayerNorm(width, device=device).requires_grad_(False)
        norm.weight.data.normal_(1.0, 0.1, generator=gen)
        norm.bias.data.normal_(0.0, 0.1, generator=gen)
        fused = nn.LayerNorm(width, device=device).requires_grad_(False)
        fused.load_state_dict(norm.state_dict())
        fused.__class__ = fused_norms.FusedLayerNorm  # (what fused_norms.install does to the layers' norms)
        paths = {
            # the stream x also flows on (the residual): its gradient arrives from there too
            ('norm', 'aten'): lambda: ((x, norm(x).to(torch.bfloat16)), (x,)),
            ('norm', 'fused'): lambda: ((x, fused(x)), (x,)),
            ('add+norm', 'aten'): lambda: (_add_then(norm, x, branch), (x, branch)),
            ('add+norm', 'fused'): lambda: (fused.add_and_norm(x, branch), (x, branch)),
        }
        for kind in ('norm', 'add+norm'):
            values = {}
            for name in ('aten', 'fused'):
                run = paths[(kind, name)]

                def forward():
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        return run()

                def both():
                    (stream, out), inputs = forward()
                    return torch.autograd.grad((stream, out), inputs, (grad_stream, grad))
                for _ in range(3):  # (Triton compiles at the first call)
                    both()
                values[name] = ([t.detach() for t in forward()[0]], both())
                fwd = timed(forward, args.repeats, sync)  # (with grad: training's path; no grad keeps AudioCraft's)
                total = timed(both, args.repeats, sync)
                moved = MOVED[(kind, name)] * args.rows * width / 1e9
                results[(width, kind, name)] = {'forward_s': fwd, 'total_s': total, 'gbytes': moved}
                print(f"{width:>6} {kind:<9} {name:<6} {fwd * 1e3:>8.3f} {total * 1e3:>11.3f} {moved:>9.2f}")
            (outs_a, grads_a), (outs_f, grads_f) = values['aten'], values['fused']
            differ = float((outs_a[1] != outs_f[1]).float().mean())
            worst = max(float((a.float() - f.float()).abs().max() / a.float().abs().max())
                        for a, f in zip(grads_a, grads_f))
            a, f = results[(width, kind, 'aten')], results[(width, kind, 'fused')]
            print(f"{width:>6} {kind:<9} fused/aten: forward {f['forward_s'] / a['forward_s']:.3f}, forward+backward "
                  f"{f['total_s'] / a['total_s']:.3f}; bf16 outputs that differ {differ:.2e}, worst relative "
                  f"gradient difference {worst:.2e}")
    for width in [int(w) for w in args.widths.split(',')]:
        layers = LAYERS.get(width, 24)
        saved = sum(count * (results[(width, kind, 'aten')]['total_s'] - results[(width, kind, 'fused')]['total_s'])
                    for kind, count in (('norm', layers), ('add+norm', 2 * layers)))
        print(f"width {width} ({layers} layers, {args.rows} rows): the fused norms save {saved * 1e3:.1f} ms a step")
    return results


def _add_then(norm: nn.Module, x: torch.Tensor, branch: torch.Tensor):
    h = x + branch
    return h, norm(h).to(torch.bfloat16)


if __name__ == '__main__':
    main()
