"""The `audiocraft-lora` console script: everything outside training.

Training itself is `dora run solver=musicgen/lora_small ...` (see README). Each subcommand lives in its own
module, which exposes `add_arguments(parser)` and `run(args) -> int`; modules are imported lazily so that
`audiocraft-lora --help` stays fast.
"""
import argparse
import importlib
import sys
import typing as tp

from .errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS: tp.Dict[str, tp.Tuple[str, str]] = {
    'prepare': ('audiocraft_lora.data.prepare_cli', 'Build an AudioCraft dataset (egs/ manifests + dset yaml).'),
    'validate': ('audiocraft_lora.data.validate_cli', 'Check every entry of a dataset before any training step.'),
    'import-hf': ('audiocraft_lora.hf_cli', 'Convert a local HF-transformers MusicGen folder to AudioCraft.'),
    'export': ('audiocraft_lora.export_cli', 'Export an adapter (HF PEFT folder, merged AudioCraft/HF folder).'),
    'merge': ('audiocraft_lora.merge_cli', 'Merge an adapter into its base and write an AudioCraft folder.'),
    'generate': ('audiocraft_lora.generate_cli', 'Generate audio from a base model and optional adapter.'),
    'compare': ('audiocraft_lora.compare_cli', 'Compare base vs adapter(s): report.html + report.json.'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='audiocraft-lora',
        description='LoRA fine-tuning of MusicGen in AudioCraft. Training: `dora run solver=musicgen/lora_small`.')
    from . import __version__
    parser.add_argument('--version', action='version', version=f'audiocraft-lora {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        module = _try_import(module_name)
        if module is not None:
            module.add_arguments(p)
        else:
            p.set_defaults(_unavailable=True)
    return parser


def _try_import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def _check_out(out: tp.Optional[str]) -> None:
    """Every command's --out is a folder it creates or fills: an existing file there is refused up front."""
    from pathlib import Path
    if out is not None and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise UserError(f"--out {out} is a file; give a folder (it is created if missing).")


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    from .quiet import quiet_dependency_notices
    quiet_dependency_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'command', None):
        parser.print_help()
        return 0
    if getattr(args, '_unavailable', False):
        print(f"audiocraft-lora {args.command}: not available in this version.", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    try:
        _check_out(getattr(args, 'out', None))
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"audiocraft-lora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
