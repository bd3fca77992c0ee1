"""`audiocraft-lora validate dset=audio/<name>` (or `--manifest PATH`): the command line of `validate.py`.

Prints the summary table; any error makes it fail with every offending file listed (exit code 2 in cli.main).
AudioCraft is imported only in `run`, so that `audiocraft-lora --help` stays fast.
"""
import argparse
from pathlib import Path
import typing as tp

from ..checkout import CONFIG_DIR

DEFAULT_RECIPE = 'solver=musicgen/lora_small'  # the recipe `prepare` prints and the README uses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `audiocraft-lora validate`."""
    parser.add_argument('dset', nargs='?', metavar='dset=audio/NAME',
                        help="the dataset config to check: <config-root>/dset/audio/NAME.yaml, all of its splits")
    parser.add_argument('--manifest', action='append', metavar='PATH',
                        help="check one data.jsonl(.gz) (or its folder) instead; repeat for several")
    parser.add_argument('--config-root', default=str(CONFIG_DIR),
                        help="folder holding dset/ (default: the checkout's config/, the tree `dora run` reads)")
    parser.add_argument('--sample-rate', type=int, default=32000, help="the model's sample rate (default: 32000)")
    parser.add_argument('--channels', type=int, default=1, help="the model's channels (default: 1)")
    parser.add_argument('--segment-duration', type=float, default=None,
                        help="dataset.segment_duration of the run (default: the recipe's, see --recipe); shorter "
                             "clips are reported as padded")
    parser.add_argument('--recipe', default=DEFAULT_RECIPE, metavar='solver=musicgen/NAME',
                        help=f"the training recipe whose dataset.segment_duration is checked against when "
                             f"--segment-duration is not given (default: {DEFAULT_RECIPE})")
    parser.add_argument('--min-segment-ratio', type=float, default=0.5, help="dataset.min_segment_ratio (0.5)")
    parser.add_argument('--fast', action='store_true',
                        help="read headers only (skips the silence/NaN/clipping/truncation checks that decode audio)")
    parser.add_argument('--allow-missing-descriptions', action='store_true',
                        help="accept clips without a description (unconditional training on purpose)")
    parser.add_argument('--workers', type=int, default=None, help="threads checking files (default: up to 4)")
    parser.add_argument('--allow-silence', action='store_true',
                        help="check as a run with allow_silence=true does: silent clips and long silent edges are "
                             "warnings (intended silence)")


def run(args: argparse.Namespace) -> int:
    """Validate, print the table, raise DataError on any error."""
    from ..errors import UserError
    from .manifests import load_datasource
    from .validate import validate_datasource

    if args.manifest and args.dset:
        raise UserError("give either dset=audio/NAME or --manifest, not both.")
    if args.manifest:
        datasource = {f'manifest{index}' if index else 'manifest': path for index, path in enumerate(args.manifest)}
    elif args.dset:
        datasource = load_datasource(args.config_root, args.dset)
    else:
        raise UserError("nothing to check. Usage: audiocraft-lora validate dset=audio/NAME "
                        "(or --manifest egs/NAME/train/data.jsonl).")
    segment, origin = _segment_duration(args)
    print(f"segment_duration={segment:g} s ({origin})")
    report = validate_datasource(
        datasource, sample_rate=args.sample_rate, channels=args.channels, segment_duration=segment,
        min_segment_ratio=args.min_segment_ratio, fast=args.fast,
        allow_missing_description=args.allow_missing_descriptions, workers=args.workers,
        allow_silence=args.allow_silence)
    print(report.summary_table())
    report.raise_if_errors()
    print("OK: no errors; training can start.")
    return 0


def _segment_duration(args: argparse.Namespace) -> tp.Tuple[float, str]:
    """The segment to check against and where it comes from: --segment-duration, else the recipe's."""
    if args.segment_duration is not None:
        return args.segment_duration, "from --segment-duration"
    recipe = args.recipe.split('=', 1)[-1]
    recipe = recipe if '/' in recipe else f'musicgen/{recipe}'
    return recipe_segment_duration(recipe), (f"dataset.segment_duration of solver={recipe}; pass --segment-duration "
                                             f"N if you train with dataset.segment_duration=N")


def recipe_segment_duration(recipe: str, config_dir: Path = CONFIG_DIR) -> float:
    """`dataset.segment_duration` of `solver=<recipe>` in our Hydra tree, following its defaults list.

    Raises:
        UserError: The recipe doesn't exist or none of its configs sets the key.
    """
    from omegaconf import OmegaConf
    from ..errors import UserError

    path = config_dir / 'solver' / f'{recipe}.yaml'
    seen = []
    while path.is_file() and path not in seen:
        seen.append(path)
        cfg = OmegaConf.load(path)
        value = OmegaConf.select(cfg, 'dataset.segment_duration')
        if value is not None:
            return float(value)
        parents = [entry for entry in cfg.get('defaults', []) if isinstance(entry, str) and entry != '_self_']
        if not parents:
            break
        parent = parents[0].lstrip('/')
        path = config_dir / (f'{parent}.yaml' if parent.startswith('solver/') else f'solver/{parent}.yaml')
    recipes = sorted(p.stem for p in (config_dir / 'solver' / 'musicgen').glob('lora_*.yaml'))
    raise UserError(f"no dataset.segment_duration found for --recipe solver={recipe} ({config_dir / 'solver'}). "
                    f"Fix: pass --segment-duration, or --recipe one of {', '.join(recipes)}.")
