"""`audiocraft-lora prepare SOURCE [--name NAME] ...`: the command line of `prepare.prepare_dataset`.

AudioCraft is imported only in `run`, so that `audiocraft-lora --help` stays fast.
"""
import argparse

from ..checkout import CONFIG_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `audiocraft-lora prepare`."""
    parser.add_argument('source', help="a folder of audio files (wav/mp3/flac/ogg, nested folders ok; captions from a "
                                       "sibling <stem>.txt or <stem>.json), or a metadata.json (a list of records, "
                                       "or {\"train\": [...], \"valid\": [...]})")
    parser.add_argument('--name', help="dataset name, used as dset=audio/<name> (default: the source folder's name)")
    parser.add_argument('--description', help="caption for every clip that has none of its own")
    parser.add_argument('--valid-ratio', type=float, default=0.2,
                        help="fraction held out for validation when the source gives no split (default: 0.2)")
    parser.add_argument('--seed', type=int, default=0, help="seed of the train/valid split (default: 0)")
    parser.add_argument('--num-generate', type=int, default=4,
                        help="at most this many valid clips form the generate split (default: 4)")
    parser.add_argument('--egs-root', default='egs', help="where <name>/<split>/data.jsonl go (default: egs)")
    parser.add_argument('--config-root', default=str(CONFIG_DIR),
                        help="where dset/audio/<name>.yaml goes (default: the checkout's config/, which `dora run` "
                             "reads from any folder)")
    parser.add_argument('--relative-to', metavar='DIR',
                        help="write manifest paths and the dset yaml's split folders relative to DIR, the folder you "
                             "will launch `dora run` from (default: absolute paths)")
    parser.add_argument('--segment-seconds', type=float, metavar='S',
                        help="cut longer files into S-second FLAC chunks (default: keep files whole; AudioCraft "
                             "random-crops them at train time)")
    parser.add_argument('--sample-rate', type=int, default=32000,
                        help="sample rate of converted/cut audio (default: 32000, MusicGen's)")
    parser.add_argument('--channels', type=int, default=1, help="channels of converted/cut audio (default: 1)")
    parser.add_argument('--convert', action='store_true',
                        help="write files not already at --sample-rate/--channels as converted FLAC copies "
                             "(default: reference every file in place; the dataset converts on the fly)")
    parser.add_argument('--audio-dir', metavar='DIR',
                        help="folder for converted, cut or mirrored audio (default: <egs-root>/<name>/audio)")
    parser.add_argument('--sidecar-dir', metavar='DIR',
                        help="leave the source folder untouched: mirror every clip there as a symlink with its "
                             "sidecar json next to it")
    parser.add_argument('--skip-bad', action='store_true',
                        help="leave out unreadable/missing inputs with a warning instead of failing")
    silence = parser.add_mutually_exclusive_group()
    silence.add_argument('--trim-silence', action='store_true',
                         help="write copies of clips without their leading/trailing silence (e.g. clips padded to "
                              "30 s on disk; your files are never modified) and leave out clips that are mostly "
                              "silence; without it, such clips are errors that stop training")
    silence.add_argument('--keep-silence', action='store_true',
                         help="the silence in these clips is intended: mark each clip \"allow_silence\": true in "
                              "this dataset's own sidecar (never in yours), so validate and training only warn about "
                              "it")
    parser.add_argument('--overwrite-sidecars', action='store_true',
                        help="replace existing <stem>.json next to the sources even when they hold other captions or "
                             "can't be read (each is copied to <stem>.json.bak first); by default those files are left "
                             "alone and the clips are mirrored into the audio folder with this dataset's sidecar")
    parser.add_argument('--base-model', metavar='ID_OR_DIR',
                        help="put base_model=... in the printed training command (e.g. your local musicgen-small "
                             "folder)")


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset and print its summary; errors are raised as DataError (exit code 2 in cli.main).

    A dataset that `validate` (and so training) would refuse is an error too: nothing is worth launching on it.
    """
    from ..errors import DataError
    from .prepare import prepare_dataset

    result = prepare_dataset(
        args.source, args.name, egs_root=args.egs_root, config_root=args.config_root,
        description=args.description, valid_ratio=args.valid_ratio, seed=args.seed, num_generate=args.num_generate,
        relative_to=args.relative_to, segment_seconds=args.segment_seconds, sample_rate=args.sample_rate,
        channels=args.channels, convert=args.convert, audio_dir=args.audio_dir, sidecar_dir=args.sidecar_dir,
        skip_bad=args.skip_bad, trim_silence=args.trim_silence, keep_silence=args.keep_silence,
        overwrite_sidecars=args.overwrite_sidecars, base_model=args.base_model)
    print(result.summary())
    if not result.ok:
        codes = result.report.codes()
        kinds = ', '.join(f"{code} x{codes.count(code)}" for code in dict.fromkeys(codes))
        raise DataError(f"the prepared dataset '{result.name}' has {len(result.report.errors)} error(s) that stop "
                        f"training ({kinds}; each kind with its fix is listed above). Fix them and run "
                        f"`audiocraft-lora prepare` again.")
    return 0

