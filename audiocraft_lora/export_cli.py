"""`audiocraft-lora export --adapter A [--base B] --out DIR [--format ...]`: share an adapter outside this project.

Formats: `peft` (a Hugging Face PEFT adapter folder for transformers' MusicgenForConditionalGeneration),
`merged-audiocraft` (a full AudioCraft folder, adapter merged), `merged-hf` (a full HF transformers folder, needs an
HF base), `all` (each into DIR/<format>; merged-hf is skipped with a note when the base isn't an HF folder).
"""
import argparse
from pathlib import Path
import sys

FORMATS = ('peft', 'merged-audiocraft', 'merged-hf')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--adapter', required=True, help='Adapter folder (adapter_config.json + safetensors).')
    parser.add_argument('--base', default=None,
                        help="Base model (hub id, AudioCraft folder or HF folder); default: the adapter's own base.")
    parser.add_argument('--out', required=True, help='New folder to write.')
    parser.add_argument('--format', choices=FORMATS + ('all',), default='peft', help='What to write (default peft).')
    parser.add_argument('--force-base-mismatch', action='store_true',
                        help='Export even if the base is not the one the adapter was trained on.')


def run(args: argparse.Namespace) -> int:
    from .hf import export
    writers = {'peft': export.export_peft, 'merged-audiocraft': export.merge_to_audiocraft,
               'merged-hf': export.merge_to_hf}
    formats = FORMATS if args.format == 'all' else (args.format,)
    out = Path(args.out)
    if args.format == 'all':
        pair = export.load_adapter_and_base(args.adapter, args.base, args.force_base_mismatch)
        if export.hf_source_folder(pair.base) is None:
            print(f"merged-hf skipped: the base {pair.base.describe()} is not a Hugging Face folder.", file=sys.stderr)
            formats = tuple(f for f in formats if f != 'merged-hf')
    if args.format == 'all':  # the merges first: they apply the adapter to the base (shapes checked), so an
        formats = tuple(sorted(formats, key=lambda f: f == 'peft'))  # adapter that doesn't fit writes nothing
    for fmt in formats:
        target = out / fmt if args.format == 'all' else out
        writers[fmt](args.adapter, target, base=args.base, force=args.force_base_mismatch)
        print(f"{fmt}: wrote {target}")
    from .adapters import describe_adapter
    print(describe_adapter(args.adapter))
    return 0
