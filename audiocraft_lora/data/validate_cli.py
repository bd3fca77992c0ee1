"""`audiocraft-lora validate dset=audio/<name>` (or `--manifest PATH`): the command line of `validate.py`.

Prints the summary table; any error makes it fail with every offending file listed (exit code 2 in cli.main).
AudioCraft is imported only in `run`, so that `audiocraft-lora --help` stays fast.
"""
import argparse

from ..checkout import CONFIG_DIR


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
    parser.add_argument('--segment-duration', type=float, default=30.0,
                        help="dataset.segment_duration of the run (default: 30); shorter clips are reported as "
                             "padded")
    parser.add_argument('--min-segment-ratio', type=float, default=0.5, help="dataset.min_segment_ratio (0.5)")
    parser.add_argument('--fast', action='store_true',
                        help="read headers only (skips the silence/NaN/clipping/truncation checks that decode audio)")
    parser.add_argument('--allow-missing-descriptions', action='store_true',
                        help="accept clips without a description (unconditional training on purpose)")
    parser.add_argument('--workers', type=int, default=None, help="threads checking files (default: up to 4)")


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
    report = validate_datasource(
        datasource, sample_rate=args.sample_rate, channels=args.channels, segment_duration=args.segment_duration,
        min_segment_ratio=args.min_segment_ratio, fast=args.fast,
        allow_missing_description=args.allow_missing_descriptions, workers=args.workers)
    print(report.summary_table())
    report.raise_if_errors()
    print("OK: no errors; training can start.")
    return 0
