"""One training step of a MusicGen-shaped LM, several ways, in one process: LoRA fast path vs plain vs the peers.

Cases (`--cases`, comma separated):

  full        AudioCraft's LM, every weight trainable (how AudioCraft fine-tunes), AdamW
  lora_plain  our LoRA through peft's own forward + peft `target_parameters` on the fused q/k/v (fast_path=false)
  lora_fast   our LoRA, fast path (fast_lora), frozen base in the autocast dtype, fused AdamW (the solver's defaults)
  lora_ckpt   lora_fast + activation checkpointing (lora.activation_checkpointing=torch)
  lora_ckpt_half  the same, half of the layers recomputed (lora.checkpoint_fraction=0.5)
  lora_compile    lora_fast + torch.compile of each transformer layer (lora.compile: inductor on CUDA, aot_eager on
                  CPU); compilation happens in the untimed warmup steps
  hf_lora     HF transformers MusicgenForCausalLM (same dims, random weights) + peft LoRA on q,k,v,o,fc1,fc2
  hf_full     the same HF decoder, full fine-tune

The AudioCraft cases run MusicGenSolver's step: `lm.compute_predictions` (delay pattern, cross-attention on the text
condition), `MusicGenSolver._compute_cross_entropy`, backward, grad clipping, AdamW, under autocast when `--dtype` is
not float32. LoRA is rank 16 on every target (AudioCraft: out_proj, linear1, linear2 + fused in_proj of self- and
cross-attention; HF: q,k,v,o,fc1,fc2), dropout 0. Weights are random: shapes are what matter.

Memory: `saved_MiB` is the bytes of tensors autograd saves for backward in one step (deduplicated by storage,
parameters excluded), a deterministic proxy for activation memory that works on CPU; `state_MiB` is parameters +
gradients + optimizer state; on CUDA `peak_GiB` is `torch.cuda.max_memory_allocated`.

    python benchmarks/step_time.py --device cpu                                # tiny CPU smoke run
    python benchmarks/step_time.py --device cpu --scale xsmall --batch 4 --frames 250 --iters 3
    python benchmarks/step_time.py --scale small --batch 16 --frames 1500 --device cuda --json out.json
    python benchmarks/step_time.py --scale medium --batch 16 --frames 1500 --cases lora_ckpt,lora_fast
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
CASES = ('full', 'lora_plain', 'lora_fast', 'lora_ckpt', 'lora_ckpt_half', 'lora_compile', 'hf_lora', 'hf_full')
RANK = 16
TEXT_TOKENS = 16  # text conditioning length of the HF cases (a short description through T5)


def build_ac_lm(scale: str, card: int, device: str):
    from omegaconf import OmegaConf
    from audiocraft.models import builders
    from audiocraft_lora.debug_base import LM_CFG
    dim, heads, layers = SCALES[scale]
    cfg = copy.deepcopy(LM_CFG)
    cfg['transformer_lm'].update(dim=dim, num_heads=heads, num_layers=layers, card=card)
    cfg['conditioners']['description']['lut'].update(dim=dim, n_bins=512)
    cfg['device'] = device
    lm = builders.get_lm_model(OmegaConf.create(cfg)).to(device)
    # MusicGen's T5 text encoder is frozen; so is the lookup table standing in for it
    lm.condition_provider.conditioners['description'].embed.weight.requires_grad_(False)
    return lm


def build_hf_lm(scale: str, card: int, device: str):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
    dim, heads, layers = SCALES[scale]
    conf = MusicgenDecoderConfig(vocab_size=card, max_position_embeddings=4096, num_hidden_layers=layers,
                                 ffn_dim=4 * dim, num_attention_heads=heads, hidden_size=dim, num_codebooks=4,
                                 activation_function='gelu', dropout=0.0, attention_dropout=0.0,
                                 activation_dropout=0.0, pad_token_id=card - 1, bos_token_id=card - 1)
    with torch.device(device):  # random init on the device: fast for medium/large
        try:
            return MusicgenForCausalLM._from_config(conf, attn_implementation='sdpa')
        except Exception:  # older transformers
            return MusicgenForCausalLM(conf)


class SavedTensorBytes:
    """Bytes of the tensors autograd saves for backward, deduplicated by storage, parameters excluded."""

    def __init__(self, model: torch.nn.Module):
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: tp.Dict[int, int] = {}

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def mib(self) -> float:
        return sum(self.seen.values()) / 2 ** 20


def make_case(case: str, args) -> tp.Tuple[torch.nn.Module, tp.Callable[[], torch.Tensor]]:
    """The model of a case and a closure computing its loss (forward only)."""
    from audiocraft_lora.lora import LoRASettings, inject_lora
    from audiocraft_lora.speed import SpeedSettings, apply_to_model
    device, dtype = args.device, args.autocast_dtype
    torch.manual_seed(0)
    codes = torch.randint(0, args.card, (args.batch, 4, args.frames), device=device)
    if case.startswith('hf_'):
        model = build_hf_lm(args.scale, args.card, device)
        if case == 'hf_lora':
            import peft
            config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                     target_modules=['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'])
            model = peft.get_peft_model(model, config)
        input_ids = codes.reshape(args.batch * 4, args.frames)
        labels = codes.transpose(1, 2)
        text = torch.randn(args.batch, TEXT_TOKENS, SCALES[args.scale][0], device=device)

        def hf_loss():
            with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
                return model(input_ids=input_ids, encoder_hidden_states=text, labels=labels).loss
        return model, hf_loss

    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft.solvers.musicgen import MusicGenSolver
    lm = build_ac_lm(args.scale, args.card, device)
    if case != 'full':
        fast = case != 'lora_plain'
        inject_lora(lm, LoRASettings(rank=RANK, alpha=2 * RANK, dropout=0.0), fast_path=fast)
        speed = SpeedSettings(fast_path=fast, base_dtype='auto' if fast else 'float32',
                              activation_checkpointing='torch' if case.startswith('lora_ckpt') else 'none',
                              checkpoint_fraction=0.5 if case == 'lora_ckpt_half' else 1.0,
                              compile=('inductor' if device == 'cuda' else 'aot_eager') if case == 'lora_compile'
                              else 'none')
        apply_to_model(lm, speed, autocast=dtype is not None, autocast_dtype=dtype or torch.float32)
    attributes = [ConditioningAttributes(text={'description': f'trap beat {i}'}) for i in range(args.batch)]
    tokenized = lm.condition_provider.tokenize(attributes)

    def ac_loss():
        with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
            condition_tensors = lm.condition_provider(tokenized)
            out = lm.compute_predictions(codes, [], condition_tensors)
            ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)  # type: ignore
        return ce
    return lm, ac_loss


def measure(case: str, args) -> dict:
    model, loss_fn = make_case(case, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the solver's choice (speed.optimizer_kwargs): fused on CUDA; every case gets the same kernel for fairness
    fused = {'fused': True} if args.device == 'cuda' else {'foreach': True}
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, **fused)
    sync = torch.cuda.synchronize if args.device == 'cuda' else (lambda: None)
    saved = SavedTensorBytes(model)

    def step(count_saved: bool = False):
        if count_saved:
            with saved.hooks():
                loss = loss_fn()
        else:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step(count_saved=True)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as flop_counter:  # matmul/attention FLOPs of forward + backward
        step()
    for _ in range(args.warmup - 2):
        step()
    sync()
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    # median on CUDA; on a (possibly shared) CPU the minimum is the least noisy estimate
    step_s = times[len(times) // 2] if args.device == 'cuda' else times[0]
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes += sum(p.numel() * p.element_size() for p in params)  # gradients
    state_bytes += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                       if isinstance(t, torch.Tensor))
    result = {'case': case, 'step_s': step_s, 'frames_per_s': args.batch * args.frames / step_s,
              'saved_MiB': saved.mib, 'state_MiB': state_bytes / 2 ** 20,
              'gflop': flop_counter.get_total_flops() / 1e9,
              'trainable_M': sum(p.numel() for p in params) / 1e6, 'loss': float(loss.detach()),
              'peak_GiB': torch.cuda.max_memory_allocated() / 2 ** 30 if args.device == 'cuda' else None}
    del model, optimizer, params, loss_fn, saved
    gc.collect()
    if args.device == 'cuda':
        torch.cuda.empty_cache()
    return result


def ratios(results: tp.Dict[str, dict]) -> tp.Dict[str, float]:
    out = {}
    for case in ('lora_fast', 'lora_ckpt', 'lora_ckpt_half', 'lora_compile'):
        for ref in ('full', 'lora_plain', 'hf_lora', 'hf_full'):
            if case in results and ref in results:
                a, b = results[case], results[ref]
                out[f'{case}/{ref} step'] = a['step_s'] / b['step_s']
                out[f'{case}/{ref} flop'] = a['gflop'] / b['gflop']
                key = 'peak_GiB' if a['peak_GiB'] is not None else 'saved_MiB'
                if b[key]:
                    out[f'{case}/{ref} {"peak" if key == "peak_GiB" else "saved"}'] = a[key] / b[key]
    return out


def main(argv: tp.Optional[tp.List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scale', default='tiny', choices=sorted(SCALES))
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--frames', type=int, default=250, help='token frames per item (50/s at 32 kHz)')
    parser.add_argument('--card', type=int, default=2048)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                        help='autocast dtype (default: bfloat16 on CUDA, float32 = no autocast on CPU)')
    parser.add_argument('--cases', default=','.join(CASES))
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps (the first two count memory, FLOPs)')
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--json', default=None, help='also write the results here')
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = 'bfloat16' if args.device == 'cuda' else 'float32'
    args.autocast_dtype = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.dtype]
    from audiocraft.modules.transformer import set_efficient_attention_backend
    set_efficient_attention_backend('torch')
    print(f"scale={args.scale} {SCALES[args.scale]} batch={args.batch} frames={args.frames} device={args.device} "
          f"dtype={args.dtype} rank={RANK} torch={torch.__version__}"
          + (f" gpu={torch.cuda.get_device_name()}" if args.device == 'cuda' else ''), flush=True)
    print(f"{'case':<14} {'step (s)':>9} {'frames/s':>10} {'GFLOP':>9} {'peak GiB':>9} {'saved MiB':>10} "
          f"{'state MiB':>10} {'trainable M':>12}", flush=True)
    results: tp.Dict[str, dict] = {}
    for case in args.cases.split(','):
        try:
            r = measure(case, args)
        except Exception as exc:  # report and keep going (e.g. OOM of one case)
            print(f"{case:<14} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            gc.collect()
            if args.device == 'cuda':
                torch.cuda.empty_cache()
            continue
        results[case] = r
        peak = f"{r['peak_GiB']:.2f}" if r['peak_GiB'] is not None else '-'
        print(f"{case:<14} {r['step_s']:>9.4f} {r['frames_per_s']:>10.0f} {r['gflop']:>9.1f} {peak:>9} "
              f"{r['saved_MiB']:>10.1f} {r['state_MiB']:>10.1f} {r['trainable_M']:>12.3f}", flush=True)
    rat = ratios(results)
    print('ratios:\n  ' + '\n  '.join(f'{k:<28} {v:.3f}' for k, v in rat.items()), flush=True)
    out = {'args': {k: v for k, v in vars(args).items() if k != 'autocast_dtype'}, 'results': results,
           'ratios': rat}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == '__main__':
    main()
