"""What `lora.activation_checkpointing=auto` would choose at MusicGen's real sizes, on any machine (no GPU or weights).

Builds a MusicGen-shaped LM (random weights on fake tensors: no memory) with our LoRA (fast path, frozen base in
bf16) and MusicGen's EnCodec 32 kHz (SEANet encoder/decoder + 4-codebook RVQ), then runs the solver's own estimate
(audiocraft_lora.memory_estimate.estimate_step) for every plan auto tries, and says which plan auto takes on GPUs of
the given sizes (budget: the card's memory less `--context` GiB for the CUDA context, as `memory_budget_gib: auto`
reads it from a fresh GPU).

    python benchmarks/memory_plan.py --scale small --batch 16 --seconds 30
    python benchmarks/memory_plan.py --scale medium --batch 16 --seconds 30 --gpus 24,40,80
    python benchmarks/memory_plan.py --scale medium --batch 16 --seconds 30 --cached   # tokens from the token cache

The T5 text encoder of the released models is not built (a lookup table stands in, as in step_time.py): its
0.9 GiB of float32 weights (t5-base) would add to every line's resident memory.
"""
import argparse
import dataclasses
import sys
import typing as tp
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import step_time  # noqa: E402  (builders of MusicGen-shaped LMs)


def build_encodec(device: str) -> torch.nn.Module:
    """EnCodec 32 kHz as in MusicGen's compression_state_dict (random weights)."""
    import warnings
    from audiocraft.models.encodec import EncodecModel
    from audiocraft.modules import SEANetDecoder, SEANetEncoder
    from audiocraft.quantization import ResidualVectorQuantizer
    seanet = dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4], lstm=2,
                  norm='weight_norm', causal=False, pad_mode='constant', true_skip=True, compress=2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # weight_norm deprecation
        model = EncodecModel(SEANetEncoder(**seanet), SEANetDecoder(**seanet),
                             ResidualVectorQuantizer(dimension=128, n_q=4, bins=2048),
                             frame_rate=50, sample_rate=32000, channels=1, causal=False, renormalize=False)
    return model.to(device).eval().requires_grad_(False)


from audiocraft_lora.encoding import FALLBACK_CHUNK, choose_chunk, chunk_encoder  # noqa: E402
from audiocraft_lora.speed import SpeedSettings, apply_to_model  # noqa: E402


def main(argv: tp.Optional[tp.List[str]] = None) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from audiocraft.modules.transformer import set_efficient_attention_backend
    from audiocraft_lora import memory_estimate, memory_plan
    from audiocraft_lora.lora import LoRASettings, inject_lora
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scale', default='small', choices=sorted(step_time.SCALES))
    parser.add_argument('--batch', type=int, default=16, help='per GPU')
    parser.add_argument('--seconds', type=float, default=30.0, help='dataset.segment_duration')
    parser.add_argument('--rank', type=int, default=32)
    parser.add_argument('--dropout', type=float, default=0.05, help='lora.dropout (the recipes: 0.05)')
    parser.add_argument('--torch-dropout', action='store_true',
                        help="LoRA dropout by torch (lora.dropout_kernel=false: masks kept, or replayed) instead of "
                             "inside the rank-r products (dropout_kernels, the default on a GPU)")
    parser.add_argument('--cached', action='store_true', help='tokens from the token cache: no EnCodec encode')
    parser.add_argument('--encode-chunk', type=int, default=FALLBACK_CHUNK,
                        help='lora.encode_chunk (0: the whole batch at once, as AudioCraft; the plans are chosen '
                             'with 4, as the solver does before lora.encode_chunk=auto takes more)')
    parser.add_argument('--gpus', default='16,24,40,48,80', help="GPU sizes in GiB (nvidia-smi's MiB / 1024)")
    parser.add_argument('--context', type=float, default=0.6, help='GiB the CUDA context takes on the card')
    args = parser.parse_args(argv)
    set_efficient_attention_backend('torch')
    bf16 = torch.bfloat16
    with FakeTensorMode(allow_non_fake_inputs=True), step_time._cpu_moves_are_noops():
        lm = step_time.build_ac_lm(args.scale, 2048, 'cpu')
        inject_lora(lm, LoRASettings(rank=args.rank, alpha=2 * args.rank, dropout=args.dropout))
        apply_to_model(lm, SpeedSettings(activation_checkpointing='none',
                                         dropout_kernel='false' if args.torch_dropout else 'auto'),
                       autocast=True, autocast_dtype=bf16)
        encodec = build_encodec('cpu')
    chunk_encoder(encodec, args.encode_chunk)
    shape = memory_estimate.StepShape(batch=args.batch, frames=memory_plan.ceil_frames(args.seconds, 50),
                                  samples=None if args.cached else int(args.seconds * 32000))
    print(f"musicgen-{args.scale} LM {step_time.SCALES[args.scale]}, LoRA rank {args.rank} dropout {args.dropout:g}"
          f"{' (by torch)' if args.torch_dropout and args.dropout else ''}, batch {args.batch} x "
          f"{args.seconds:g} s, bf16 autocast, "
          + ('token cache' if args.cached else f'EnCodec encode in the step (encode_chunk={args.encode_chunk})'))
    estimates, lm_steps = {}, {}
    for plan in memory_plan.plans_for(lm):
        memory_plan.apply_plan(lm, plan)
        with step_time.kernels_as_on_gpu():  # (CPU fake tensors on the GPU's path; torch's with --torch-dropout)
            estimate = memory_estimate.estimate_step(lm, encodec, shape, bf16)
            if not args.cached:  # (the LM's step alone: the encode is planned on top of it, encoding.py)
                lm_steps[memory_plan.plan_name(plan)] = memory_estimate.estimate_step(
                    lm, encodec, dataclasses.replace(shape, samples=None), bf16)
        estimates[memory_plan.plan_name(plan)] = estimate
        print(f"  {memory_plan.plan_name(plan):<48} {estimate.peak_gib:6.2f} GiB, needs "
              f"{memory_plan.needed(estimate) / 2 ** 30:6.2f} GiB with the margin", flush=True)
    picks, chunks = {}, {}
    for size in (float(g) for g in args.gpus.split(',')):
        budget = int((size - args.context) * 2 ** 30)
        names = [name for name, e in estimates.items() if memory_plan.fits(e, budget)]
        picks[size] = names[0] if names else None
        fallback = f"none fits: {memory_plan.what_fits(list(estimates.values())[-1], shape, budget)}"
        encode = ''
        if names and not args.cached:  # lora.encode_chunk=auto on that plan: the most items at once beside its step
            chosen = lm_steps[names[0]]
            chunk, size_bytes, fit = choose_chunk(encodec, args.batch, 1, shape.samples, lambda extra: memory_plan.needed(
                memory_estimate.Estimate(chosen.resident, chosen.step + extra)) <= budget)
            chunks[size] = chunk
            encode = (f"; EnCodec {chunk or args.batch} items at a time ({size_bytes / 2 ** 30:.1f} GiB, "
                      + ("beside the step" if fit else "no more fits beside the step") + ", lora.encode_chunk=auto)")
        print(f"  {size:g} GiB GPU: auto -> {names[0] if names else fallback}{encode}")
    return {'estimates': {k: v.peak_gib for k, v in estimates.items()}, 'picks': picks, 'encode_chunks': chunks}


if __name__ == '__main__':
    main()
