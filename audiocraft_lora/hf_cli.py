"""`audiocraft-lora import-hf HF_DIR --out OUT`: convert a local HF transformers MusicGen to an AudioCraft folder.

`audiocraft-lora import-hf CONVERTED_DIR` (no --out) only re-registers the folder's T5 text encoder in the Hugging Face
cache, e.g. after copying a converted folder to another machine (see `audiocraft_lora.hf.t5_local`).
"""
import argparse
from pathlib import Path

from .errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('hf_dir', help='Folder saved by MusicgenForConditionalGeneration.save_pretrained (with its '
                                       'tokenizer files), or a folder converted earlier (re-registers its T5).')
    parser.add_argument('--out', default=None, help='AudioCraft folder to write (new, or an earlier import).')
    parser.add_argument('--no-register-t5', action='store_true',
                        help="Don't register the T5 text encoder in the Hugging Face cache (stock AudioCraft then "
                             "can't load the folder offline until `import-hf OUT` is run).")
    parser.add_argument('--hub-cache', default=None,
                        help='Hugging Face hub cache to register T5 in (default: HF_HUB_CACHE / ~/.cache/huggingface).')


def run(args: argparse.Namespace) -> int:
    from . import hf_convert
    hf_dir = Path(args.hf_dir).expanduser()
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a folder. Give the Hugging Face MusicGen folder (e.g. local/musicgen-small).")
    if args.out is None:
        if not hf_convert.is_converted_folder(hf_dir):
            raise UserError("--out is required (the AudioCraft folder to write), e.g. "
                            f"`audiocraft-lora import-hf {hf_dir} --out {hf_dir}-audiocraft`.")
        snapshot = hf_convert.register_t5(hf_dir, args.hub_cache)
        print(f"Registered {hf_dir}/t5 in the Hugging Face cache: {snapshot}")
        return 0
    out = hf_convert.import_hf(hf_dir, Path(args.out).expanduser(), register=not args.no_register_t5,
                               hub_cache=args.hub_cache)
    print(f"Wrote {out} (state_dict.bin, compression_state_dict.bin, t5/).\n"
          f"Load it with HF_HUB_OFFLINE=1: MusicGen.get_pretrained('{out}'), or train with base_model={out}.")
    return 0
