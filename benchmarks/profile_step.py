"""Where a training step's time goes, per case of step_time.py (torch.profiler): wall time vs GPU busy time, CPU time
per step, and the ops and kernels that take the most device time.

    python benchmarks/profile_step.py --scale small --batch 4 --frames 1500 --cases full,lora_fast --out /tmp/prof

Prints one summary line per case (a GPU idle share near zero means the GPU is the limit; a large one means Python /
kernel launches are) and writes, per case, the top ops and kernels by device time (with `--shapes` also grouped by
input shapes, which tells the low-rank GEMMs from the base ones) to `<out>/<scale>_b<batch>_<case>_ops.txt`. On a
CPU it profiles CPU time only.
"""
import argparse
import os
import sys
import time
import typing as tp

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402


def profile_case(case: str, args) -> dict:
    model, loss_fn = step_time.make_case(case, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = args.device == 'cuda'
    optimizer = step_time._optimizer(params, **({'fused': True} if cuda else {'foreach': True}))
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        loss = loss_fn()
        if params:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    plain_s = (time.perf_counter() - start) / args.steps  # without the profiler's own overhead
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        profiled_s = (time.perf_counter() - start) / args.steps
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / args.steps
    sort = 'self_device_time_total' if cuda else 'self_cpu_time_total'
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=args.top, max_name_column_width=60, max_shapes_column_width=70) if args.shapes else ''
    kernel_table = prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=90)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f'{args.scale}_b{args.batch}_{case}_ops.txt'), 'w') as f:
            f.write(f"{case}: step {plain_s:.4f} s, profiled {profiled_s:.4f} s, GPU busy {busy_s:.4f} s/step, "
                    f"{len(kernels) / args.steps:.0f} kernels/step\n\n{kernel_table}\n"
                    + (f"\nby input shape:\n{table}\n" if table else ''))
    result = {'case': case, 'step_s': plain_s, 'profiled_s': profiled_s, 'gpu_busy_s': busy_s if cuda else None,
              'kernels_per_step': len(kernels) / args.steps, 'top': kernel_table}
    del model, optimizer, params
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: tp.Optional[tp.List[str]] = None) -> tp.List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scale', default='tiny', choices=sorted(step_time.SCALES))
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--frames', type=int, default=250)
    parser.add_argument('--card', type=int, default=2048)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--cases', default='full,lora_fast')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--steps', type=int, default=2)
    parser.add_argument('--top', type=int, default=25, help='rows of each table')
    parser.add_argument('--print-top', type=int, default=12, help='rows of the kernel table printed per case')
    parser.add_argument('--lora-dropout', type=float, default=0.0)
    parser.add_argument('--shapes', action='store_true',
                        help='also a table by input shapes (which tells the rank-r GEMMs from the base ones); '
                             'recording and grouping shapes took over 30 s per case at musicgen-small batch 4 on an '
                             'H100')
    parser.add_argument('--out', default=None, help='folder for the full tables')
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ('bfloat16' if args.device == 'cuda' else 'float32')
    args.autocast_dtype = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.dtype]
    args.count_only = False
    from audiocraft.modules.transformer import set_efficient_attention_backend
    set_efficient_attention_backend('torch')
    print(f"profile scale={args.scale} batch={args.batch} frames={args.frames} device={args.device} "
          f"dtype={args.dtype}", flush=True)
    results = []
    for case in args.cases.split(','):
        try:
            r = profile_case(case, args)
        except Exception as exc:
            print(f"{case:<14} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        results.append(r)
        busy = r['gpu_busy_s']
        idle = f"GPU busy {busy:.4f} s ({100 * (1 - busy / r['profiled_s']):.0f}% idle)" if busy is not None else ''
        print(f"{case:<14} step {r['step_s']:.4f} s  profiled {r['profiled_s']:.4f} s  {idle}  "
              f"{r['kernels_per_step']:.0f} kernels/step", flush=True)
        lines = r['top'].splitlines()
        print('\n'.join(lines[:3 + args.print_top]), flush=True)
    return results


if __name__ == '__main__':
    main()
