"""What one data-loader worker spends on a training clip, as AudioCraft's dataset reads it (seek, read a segment,
resample and down-mix to the model's 32 kHz mono), by source format; and how many workers a batch every STEP
seconds needs. Synthetic files (noise), or yours with --files.

    python benchmarks/data_loading.py                      # 15 s clips, batch 16, a 0.15 s step
    python benchmarks/data_loading.py --files a.mp3 b.wav --seconds 30 --batch 8 --step 0.3

The training log's `data_wait` (audiocraft_lora/data_wait.py) says when the loader holds a run back."""
import argparse
import math
from pathlib import Path
import tempfile
import time
import typing as tp

import torch

from audiocraft.data.audio import audio_read, audio_write
from audiocraft.data.audio_utils import convert_audio

SAMPLE_RATE, CHANNELS = 32000, 1  # MusicGen's


def synthetic_files(folder: Path, seconds: float) -> tp.List[Path]:
    """Noise clips of 1.5 x `seconds`: at the model's format (WAV, FLAC) and at 44.1 kHz stereo (WAV, MP3)."""
    gen = torch.Generator().manual_seed(0)
    files = []
    for name, rate, channels, fmt in (('32k_mono', SAMPLE_RATE, CHANNELS, 'wav'),
                                      ('32k_mono', SAMPLE_RATE, CHANNELS, 'flac'),
                                      ('44k_stereo', 44100, 2, 'wav'), ('44k_stereo', 44100, 2, 'mp3')):
        wav = 0.1 * torch.randn(channels, int(1.5 * seconds * rate), generator=gen)
        files.append(audio_write(folder / f'{name}_{fmt}', wav, rate, format=fmt, strategy='clip'))
    return files


def ms_per_clip(path: Path, seconds: float, reads: int = 10) -> float:
    """A worker's time for one segment of `path` (the median of `reads`, each at another seek)."""
    times = []
    for index in range(reads):
        start = time.perf_counter()
        wav, rate = audio_read(path, seek_time=0.03 * index, duration=seconds, pad=True)
        convert_audio(wav, rate, SAMPLE_RATE, CHANNELS)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main(argv: tp.Optional[tp.List[str]] = None) -> tp.Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--files', nargs='*', help='your audio files (default: synthetic ones in each format)')
    parser.add_argument('--seconds', type=float, default=15.0, help='segment length (dataset.segment_duration)')
    parser.add_argument('--batch', type=int, default=16, help='clips per step (per GPU)')
    parser.add_argument('--step', type=float, default=0.15, help="the training step's seconds on the GPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # (a worker's share: one core)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(f) for f in args.files] if args.files else synthetic_files(Path(tmp), args.seconds)
        print(f"{'file':<28} {'ms/clip':>8} {'x realtime':>10} {'workers for the step':>21}")
        for path in files:
            ms = ms_per_clip(path, args.seconds)
            results[path.name] = ms
            workers = math.ceil(args.batch * ms / 1000 / args.step)
            print(f"{path.name:<28} {ms:>8.1f} {1000 * args.seconds / ms:>10.0f} {workers:>21}")
    print(f"(one core each; a batch of {args.batch} x {args.seconds:g} s every {args.step:g} s)")
    return results


if __name__ == '__main__':
    main()
