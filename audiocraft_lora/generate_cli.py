"""`audiocraft-lora generate`: audio from a base model and an optional adapter, reproducibly.

    audiocraft-lora generate --adapter outputs/xps/<sig>/adapter --prompts-file evaluation_prompts.json \
        --duration 15 --guidance 3 --top-k 250 --seed 0 1 --out samples/

writes `samples/<name>_seed<k>.wav` (one per prompt and seed) and `samples/generation.json` with every setting
needed to reproduce them (model, adapter and base fingerprints, sampling, seeds, durations, versions), each file's
tokens hash and its diagnostics (fade, silence, noise-likeness, clipping). Prompts file format: `prompts.py`.
"""
import argparse
import json
import platform
import sys
import typing as tp

from .errors import UserError

SETTINGS_NAME = 'generation.json'


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available).')
    parser.add_argument('--force-base-mismatch', action='store_true',
                        help='Apply adapters even to a base other than the one they were trained on.')


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--prompts', nargs='+', default=None, metavar='TEXT', help='One or more text prompts.')
    parser.add_argument('--prompts-file', default=None,
                        help='json: a list of strings, or of {"description", "name"?, "duration"?} objects.')
    parser.add_argument('--duration', type=float, default=15.0,
                        help='Seconds per sample, unless a prompt sets its own (default 15; match your clips).')
    parser.add_argument('--guidance', type=float, default=3.0, help='Classifier-free guidance coefficient (3).')
    parser.add_argument('--top-k', type=int, default=250, help='Top-k sampling (250; 0 = off).')
    parser.add_argument('--top-p', type=float, default=0.0, help='Top-p sampling (0 = off, top-k is used).')
    parser.add_argument('--temperature', type=float, default=1.0, help='Softmax temperature (1.0).')
    parser.add_argument('--seed', type=int, nargs='+', default=[0], help='One or more seeds; one file per seed.')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--base', default=None,
                        help="Base model: hub id, AudioCraft folder, HF folder or debug (default: the adapter's).")
    parser.add_argument('--adapter', default=None, help='Adapter folder (outputs/xps/<sig>/adapter).')
    parser.add_argument('--out', required=True, help='Folder for the audio files and generation.json.')
    parser.add_argument('--no-merge', action='store_true',
                        help='Keep LoRA modules instead of merging the adapter into the base (slower).')
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def prompts_from_args(args: argparse.Namespace):
    from .prompts import load_prompts
    return load_prompts(args.prompts, args.prompts_file, args.duration)


def sampling_from_args(args: argparse.Namespace):
    from .generation import SamplingSettings
    return SamplingSettings(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                            cfg_coef=args.guidance).check()


def seeds_from_args(args: argparse.Namespace) -> tp.List[int]:
    seeds = list(dict.fromkeys(int(s) for s in args.seed))
    if any(s < 0 for s in seeds):
        raise UserError(f"--seed values must be >= 0, got {args.seed}.")
    return seeds


def environment() -> tp.Dict[str, str]:
    import audiocraft
    import torch
    from . import __version__
    return {'audiocraft_lora': __version__, 'audiocraft': audiocraft.__version__, 'torch': torch.__version__,
            'python': platform.python_version()}


def run(args: argparse.Namespace) -> int:
    from pathlib import Path
    from .api import load_musicgen
    from .checkpoint_io import write_text_atomic
    from .generation import generate_to_folder
    prompts = prompts_from_args(args)  # bad input fails before any model is loaded
    sampling = sampling_from_args(args)
    seeds = seeds_from_args(args)
    model = load_musicgen(args.base, args.adapter, device=args.device, merge=not args.no_merge,
                          force_base_mismatch=args.force_base_mismatch)
    out = Path(args.out)
    records = generate_to_folder(model, prompts, seeds, sampling, out)
    settings = {
        'command': ['audiocraft-lora', 'generate'] + sys.argv[2:] if sys.argv[1:2] == ['generate'] else None,
        'model': model.audiocraft_lora, 'device': str(model.device), 'sample_rate': int(model.sample_rate),
        'sampling': sampling.to_dict(), 'seeds': seeds,
        'prompts': [{'text': p.text, 'name': p.name, 'duration': p.duration} for p in prompts],
        'environment': environment(), 'samples': records,
    }
    write_text_atomic(out / SETTINGS_NAME, json.dumps(settings, indent=2, ensure_ascii=False) + '\n')
    for record in records:
        flags = f"  [{', '.join(record['flags'])}]" if record['flags'] else ''
        diag = record['diagnostics']
        print(f"{record['file']}: fade {diag['fade_ratio_db']:+.1f} dB, silence {100 * diag['silence_fraction']:.0f}%, "
              f"flatness {diag['spectral_flatness']:.2f}{flags}")
    print(f"Wrote {len(records)} files and {out / SETTINGS_NAME}")
    return 0
