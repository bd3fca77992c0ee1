"""One training step: LoRA (our injection) vs full fine-tuning, on AudioCraft's MusicGen LM. Run by hand.

Both cases run the step of AudioCraft's MusicGenSolver: `lm.compute_predictions` (delay pattern, cross-attention
on the text condition), `MusicGenSolver._compute_cross_entropy` over the pattern mask, backward, grad clipping
and AdamW, under autocast on CUDA. Weights are random (shapes are what matter for speed).

    python benchmarks/step_time.py                               # CPU, tiny shape
    python benchmarks/step_time.py --scale small --batch 16 --frames 1500 --device cuda --dtype bfloat16
    python benchmarks/step_time.py --scale small --batch 4 --frames 1500 --device cuda --json out.json

Prints step time, frames/s, peak memory (CUDA) and the LoRA / full ratios.
"""
import argparse
import copy
import gc
import json
import time
import typing as tp

import torch

SCALES = {  # dim, heads, layers (MusicGen's model_scale presets)
    'tiny': (64, 4, 2),
    'xsmall': (256, 8, 4),
    'small': (1024, 16, 24),
    'medium': (1536, 24, 48),
    'large': (2048, 32, 48),
}


def build_lm(scale: str, card: int, device: str):
    from omegaconf import OmegaConf
    from audiocraft.models import builders
    from audiocraft_lora.debug_base import LM_CFG
    dim, heads, layers = SCALES[scale]
    cfg = copy.deepcopy(LM_CFG)
    cfg['transformer_lm'].update(dim=dim, num_heads=heads, num_layers=layers, card=card)
    cfg['conditioners']['description']['lut'].update(dim=dim, n_bins=512)
    cfg['device'] = device
    return builders.get_lm_model(OmegaConf.create(cfg)).to(device)


def make_inputs(lm, batch: int, frames: int, card: int, device: str):
    from audiocraft.modules.conditioners import ConditioningAttributes
    codes = torch.randint(0, card, (batch, 4, frames), device=device)
    attrs = [ConditioningAttributes(text={'description': f'trap beat {i}'}) for i in range(batch)]
    tokenized = lm.condition_provider.tokenize(attrs)
    return codes, tokenized


def step_fn(lm, optimizer, codes, tokenized, autocast_dtype):
    from audiocraft.solvers.musicgen import MusicGenSolver
    device_type = codes.device.type
    with torch.autocast(device_type=device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        condition_tensors = lm.condition_provider(tokenized)
        out = lm.compute_predictions(codes, [], condition_tensors)
        ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)  # type: ignore
    ce.backward()
    torch.nn.utils.clip_grad_norm_([p for p in lm.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ce


def measure(case: str, args) -> dict:
    from audiocraft_lora.lora import LoRASettings, inject_lora
    torch.manual_seed(0)
    lm = build_lm(args.scale, args.card, args.device)
    if case == 'lora':
        inject_lora(lm, LoRASettings(rank=args.rank, alpha=2 * args.rank, dropout=0.0))
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01,
                                  fused=args.device == 'cuda')
    codes, tokenized = make_inputs(lm, args.batch, args.frames, args.card, args.device)
    dtype = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.dtype]
    sync = torch.cuda.synchronize if args.device == 'cuda' else (lambda: None)
    for _ in range(args.warmup):
        step_fn(lm, optimizer, codes, tokenized, dtype)
    sync()
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        sync()
        start = time.perf_counter()
        step_fn(lm, optimizer, codes, tokenized, dtype)
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    step = times[len(times) // 2]
    result = {'case': case, 'step_s': step, 'frames_per_s': args.batch * args.frames / step,
              'trainable_M': sum(p.numel() for p in params) / 1e6,
              'peak_GiB': torch.cuda.max_memory_allocated() / 2 ** 30 if args.device == 'cuda' else None}
    del lm, optimizer, params
    gc.collect()
    if args.device == 'cuda':
        torch.cuda.empty_cache()
    return result


def main(argv: tp.Optional[tp.List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scale', default='tiny', choices=sorted(SCALES))
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--frames', type=int, default=250, help='token frames per item (50/s at 32 kHz)')
    parser.add_argument('--card', type=int, default=2048)
    parser.add_argument('--rank', type=int, default=16)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--json', default=None, help='also write the results here')
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = 'bfloat16' if args.device == 'cuda' else 'float32'
    from audiocraft.modules.transformer import set_efficient_attention_backend
    set_efficient_attention_backend('torch')
    results = {case: measure(case, args) for case in ('full', 'lora')}
    full, lora = results['full'], results['lora']
    print(f"scale={args.scale} batch={args.batch} frames={args.frames} device={args.device} dtype={args.dtype} "
          f"rank={args.rank}" + (f" gpu={torch.cuda.get_device_name()}" if args.device == 'cuda' else ''))
    print(f"{'case':<6} {'step (s)':>9} {'frames/s':>10} {'peak GiB':>9} {'trainable M':>12}")
    for r in (full, lora):
        peak = f"{r['peak_GiB']:.2f}" if r['peak_GiB'] is not None else '-'
        print(f"{r['case']:<6} {r['step_s']:>9.4f} {r['frames_per_s']:>10.0f} {peak:>9} {r['trainable_M']:>12.3f}")
    ratios = {'lora_over_full_step_time': lora['step_s'] / full['step_s']}
    if full['peak_GiB']:
        ratios['lora_over_full_peak_memory'] = lora['peak_GiB'] / full['peak_GiB']
    print('ratios: ' + ', '.join(f'{k}={v:.3f}' for k, v in ratios.items()))
    out = {'args': vars(args), 'results': results, 'ratios': ratios}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == '__main__':
    main()
