"""EnCodec's encoder on a training batch, by `lora.encode_chunk` (items encoded at once) and cudnn.benchmark: time and
peak memory of each, and how far the chunked embeddings are from the whole batch's.

The solver encodes every training batch (unless the tokens come from the token cache), float32 outside autocast,
`lora.encode_chunk` items at a time (default 4: a quarter of the encoder's float32 peak, ~13 GiB for 16 x 30 s).
The encoder's 2-layer LSTM runs its 1500 frames (30 s at 50 Hz) one after the other whatever the batch, so each
chunk pays that sequence again: this measures what the chunks cost against the memory they save.

    python benchmarks/encode_chunks.py                                  # on a GPU: MusicGen's shapes
    python benchmarks/encode_chunks.py --device cpu --shapes 2x1 --chunks 1,2 --iters 1   # a smoke run
    python benchmarks/encode_chunks.py --wheel .whl2/audiocraft-1.3.0-py3-none-any.whl   # torch + that wheel only

Needs only torch and AudioCraft's SEANet encoder (MusicGen's EnCodec 32 kHz: 64 filters, ratios 8-5-4-4, 2 LSTM
layers; random weights; the 4-codebook quantizer, ~1% of its FLOPs, left out). With `--wheel`, the three files it
needs (seanet.py, conv.py, lstm.py) are read from AudioCraft's wheel into a temporary package, so a machine without
AudioCraft's other dependencies can run it.
"""
import argparse
import importlib
import sys
import tempfile
import time
import typing as tp
import warnings
import zipfile
from pathlib import Path

import torch


def seanet_encoder_class(wheel: tp.Optional[str]):
    if not wheel:
        from audiocraft.modules.seanet import SEANetEncoder
        return SEANetEncoder
    folder = Path(tempfile.mkdtemp()) / 'seanet_only'
    folder.mkdir()
    (folder / '__init__.py').write_text('')
    with zipfile.ZipFile(wheel) as archive:
        for name in ('seanet', 'conv', 'lstm'):
            (folder / f'{name}.py').write_bytes(archive.read(f'audiocraft/modules/{name}.py'))
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module('seanet_only.seanet').SEANetEncoder


def build(cls, device: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # weight_norm's deprecation
        encoder = cls(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4], lstm=2,
                      norm='weight_norm', causal=False, pad_mode='constant', true_skip=True, compress=2)
    return encoder.to(device).eval().requires_grad_(False)


def encode(encoder, audio: torch.Tensor, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        if chunk <= 0 or chunk >= audio.shape[0]:
            return encoder(audio)
        return torch.cat([encoder(part) for part in audio.split(chunk)])


def timed(fn, device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--shapes', default='16x30,8x15,16x15', help='batch x seconds, comma-separated')
    parser.add_argument('--chunks', default='1,4,8,0', help='items at a time (0: the whole batch)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--wheel', help="AudioCraft's wheel: read the encoder from it (no other dependency)")
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = build(seanet_encoder_class(args.wheel), args.device)
    cuda = args.device == 'cuda'
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'cpu'}; float32, TF32 for "
          f"convolutions {torch.backends.cudnn.allow_tf32}")
    print(f"{'shape':>8} {'chunk':>5} {'bench':>5} {'s/batch':>8} {'x whole':>8} {'peak GiB':>8} {'max |diff|':>10}")
    for shape in args.shapes.split(','):
        batch, seconds = (int(v) for v in shape.split('x'))
        audio = torch.randn(batch, 1, seconds * 32000, device=args.device) * 0.1
        whole = {}
        for benchmark in ((False, True) if cuda else (False,)):
            torch.backends.cudnn.benchmark = benchmark
            reference = encode(encoder, audio, 0)
            rows = []
            for chunk in (int(c) for c in args.chunks.split(',')):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                seconds_per = timed(lambda: encode(encoder, audio, chunk), args.device, args.warmup, args.iters)
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if cuda else float('nan')
                diff = float((encode(encoder, audio, chunk) - reference).abs().max())
                rows.append((chunk, seconds_per, peak, diff))
                if chunk <= 0 or chunk >= batch:
                    whole[benchmark] = seconds_per
            for chunk, seconds_per, peak, diff in rows:
                ratio = seconds_per / whole[benchmark] if benchmark in whole else float('nan')
                print(f"{shape:>8} {chunk or batch:>5} {str(benchmark):>5} {seconds_per:8.4f} {ratio:8.2f} "
                      f"{peak:8.2f} {diff:10.2e}")
        torch.backends.cudnn.benchmark = False


if __name__ == '__main__':
    main()
