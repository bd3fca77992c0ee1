"""`audiocraft-lora merge --adapter A [--base B] --out DIR`: an AudioCraft folder with the adapter merged in.

The folder loads with stock `audiocraft.models.MusicGen.get_pretrained(DIR)`; no audiocraft_lora import needed.
"""
import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--adapter', required=True, help='Adapter folder (adapter_config.json + safetensors).')
    parser.add_argument('--base', default=None,
                        help="Base model (hub id, AudioCraft folder or HF folder); default: the adapter's own base.")
    parser.add_argument('--out', required=True, help='New folder to write.')
    parser.add_argument('--force-base-mismatch', action='store_true',
                        help='Merge even if the base is not the one the adapter was trained on.')


def run(args: argparse.Namespace) -> int:
    from .hf.export import merge_to_audiocraft
    out = merge_to_audiocraft(args.adapter, args.out, base=args.base, force=args.force_base_mismatch)
    from .adapters import describe_adapter
    print(f"Wrote {out}: load it with audiocraft.models.MusicGen.get_pretrained('{out}').")
    print(describe_adapter(args.adapter))
    if (Path(out) / 'hf_import.json').exists():  # (its T5 came from an HF folder: AudioCraft would fetch t5-base)
        print(f"Its text encoder is the HF base's T5, kept in {out}/t5: on each machine run `audiocraft-lora "
              f"import-hf {out}` once (it registers that T5 in the Hugging Face cache), then get_pretrained with "
              "HF_HUB_OFFLINE=1.")
    return 0
