"""The fused q/k/v LoRA alone: peft `target_parameters` (W + BA materialised, full weight gradient) vs `fast_lora`.

One AudioCraft self-attention layer, forward + backward of its output: FLOPs (torch's FlopCounterMode, exact) and
time (minimum over repeats). Run by hand::

    python benchmarks/in_proj.py                      # CPU: dim 512, 8 x 250 tokens
    python benchmarks/in_proj.py --device cuda --dim 1024 --batch 16 --frames 1500 --dtype bfloat16
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def build(dim: int, heads: int, fast: bool, device: str):
    from audiocraft.modules.transformer import StreamingMultiheadAttention
    from peft import LoraConfig, inject_adapter_in_model
    from audiocraft_lora.fused_in_proj import inject_fused_in_proj
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.attn = StreamingMultiheadAttention(dim, heads, causal=True, memory_efficient=True, device=device)
    if fast:
        inject_fused_in_proj(holder.attn, 16, 2.0)
    else:
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_parameters=['attn.in_proj_weight']), holder)
    for name, p in holder.named_parameters():
        p.requires_grad_('lora_' in name)
    return holder.attn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--dim', type=int, default=512)
    parser.add_argument('--heads', type=int, default=8)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--frames', type=int, default=250)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--repeats', type=int, default=10)
    args = parser.parse_args()
    from audiocraft.modules.transformer import set_efficient_attention_backend
    set_efficient_attention_backend('torch')
    x = torch.randn(args.batch, args.frames, args.dim, device=args.device, requires_grad=True)
    dtype = torch.bfloat16 if args.dtype == 'bfloat16' else None
    sync = torch.cuda.synchronize if args.device == 'cuda' else (lambda: None)
    for name, fast in (('peft target_parameters', False), ('fast_lora', True)):
        attn = build(args.dim, args.heads, fast, args.device)

        def step():
            with torch.autocast(args.device, dtype=dtype or torch.float32, enabled=dtype is not None):
                out, _ = attn(x, x, x)
            out.float().square().mean().backward()
        with FlopCounterMode(display=False) as counter:
            step()
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        print(f"{name:<24} {counter.get_total_flops() / 1e9:8.2f} GFLOP  {min(times) * 1e3:8.2f} ms (min)")


if __name__ == '__main__':
    main()
