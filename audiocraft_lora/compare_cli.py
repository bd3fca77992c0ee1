"""`audiocraft-lora compare`: base vs adapter(s) on the same prompts, seeds and sampling; report.html + report.json.

    audiocraft-lora compare --adapter trap=outputs/xps/<sig>/adapter --prompts-file evaluation_prompts.json \
        --duration 15 --seed 0 1 --valid dset=audio/trap --out compare/

For every (prompt, seed) each model samples from the same random stream (see `generation.py`). The report has, per
sample and model, loudness over time, fade ratio, silence fraction, spectral flatness and clipping (flags when a
sample fades, is mostly silent, noise-like or clipped), aggregates with the difference to the base, and, with
`--valid`, the teacher-forced cross-entropy per codebook on the valid split, computed by the training code itself
(`valid_ce.py`). Audio players, loudness curves, spectrograms and CE bars are in the html; every number in the json.
CLAP and FAD need reference models that are never downloaded: without a local one they are listed as skipped.
"""
import argparse
import json
from pathlib import Path
import typing as tp

from .errors import UserError
from .generate_cli import (add_model_arguments, add_sampling_arguments, environment, prompts_from_args,
                           sampling_from_args, seeds_from_args)

BASE_LABEL = 'base'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--base', default=None, help="Base model (default: the base recorded in the adapters).")
    parser.add_argument('--adapter', action='append', default=[], metavar='[NAME=]FOLDER', required=True,
                        help='Adapter folder; repeat to compare several. NAME labels it in the report.')
    parser.add_argument('--out', required=True, help='Report folder (report.html, report.json, audio/, figures/).')
    parser.add_argument('--valid', nargs='+', default=None, metavar='OVERRIDE',
                        help='Data for the cross-entropy: `auto` (the first adapter\'s training XP: same recipe, '
                             'data and valid segments), Hydra overrides as for dora run (solver=musicgen/lora_small '
                             'dset=audio/trap dataset.batch_size=4), or a manifest folder (egs/trap/valid).')
    parser.add_argument('--clap-model', default=None,
                        help='Local HF CLAP folder (e.g. a saved laion/larger_clap_music) for text-audio similarity '
                             'and FAD on CLAP embeddings. Never downloaded; without it both are skipped.')
    parser.add_argument('--fad-reference', default=None,
                        help='Reference clips for FAD: audio folder or manifest folder (default: --valid when it is '
                             'a manifest folder).')
    parser.add_argument('--title', default=None, help='Report title.')
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def parse_adapters(values: tp.Sequence[str]) -> tp.Dict[str, Path]:
    """`[NAME=]FOLDER` -> {'adapter:NAME': folder}; default NAME is the XP signature or the folder name."""
    from .adapters import resolve_adapter_folder
    labelled: tp.Dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition('=')
        if not sep:
            name, folder = '', value
        path = resolve_adapter_folder(Path(folder).expanduser(), strict=False)  # (an XP signature works too)
        if not name:
            name = path.parent.name if path.name == 'adapter' and path.parent.name else path.name
        label = f'adapter:{name}'
        if label in labelled or name == BASE_LABEL:
            raise UserError(f"Two adapters are labelled {name!r}: name them, e.g. --adapter r32={folder}.")
        labelled[label] = path
    return labelled


# keys of a training XP's argv that say how/where it ran, or that each adapter's own config gives (base, LoRA
# shape): not what data and segments it validated on
_NOT_DATA_KEYS = ('device', 'autocast', 'autocast_dtype', 'dataset.num_workers', 'stop_at_epoch', 'continue_from',
                  'execute_only', 'execute_inplace', 'label', 'base_model', 'lora.', 'logging.', 'wandb.',
                  'tensorboard.')


def valid_overrides(values: tp.Sequence[str], adapter_dir: tp.Optional[Path] = None) -> tp.List[str]:
    """Hydra overrides for `valid_ce`: as given, a manifest folder, or `auto` (the adapter's training XP argv)."""
    if list(values) == ['auto']:
        argv_file = adapter_dir.parent / '.argv.json' if adapter_dir is not None else None
        if argv_file is None or not argv_file.exists():
            raise UserError(f"--valid auto: {adapter_dir} is not the adapter folder of a training XP (no "
                            f"{argv_file}); give the training overrides, e.g. --valid solver=musicgen/lora_small "
                            "dset=audio/trap.")
        argv = json.loads(argv_file.read_text())
        return [a for a in argv if not a.lstrip('+~').split('=')[0].startswith(_NOT_DATA_KEYS)]
    if len(values) == 1 and '=' not in values[0]:
        folder = Path(values[0]).expanduser()
        if not folder.exists():
            raise UserError(f"--valid {values[0]}: no such manifest folder; give a folder with data.jsonl(.gz) "
                            "or Hydra overrides such as dset=audio/<name>.")
        path = str(folder.resolve())
        return [f'datasource.{split}={path}' for split in ('train', 'valid', 'evaluate', 'generate')]
    bad = [v for v in values if '=' not in v]
    if bad:
        raise UserError(f"--valid: {bad} are not Hydra overrides (key=value), e.g. dset=audio/trap.")
    return list(values)


def _history(adapter_dir: Path) -> tp.Optional[list]:
    """The training history of the XP that exported this adapter, when it is still next to it."""
    path = adapter_dir.parent / 'history.json'
    if adapter_dir.name == 'adapter' and path.exists():
        try:
            history = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return history if isinstance(history, list) and history else None
    return None


def run(args: argparse.Namespace) -> int:
    import gc
    from . import adapters as adapter_io
    from .api import build_musicgen, default_device, load_base, with_adapter
    from .generation import generate_to_folder
    from .prompts import slugify
    from .report import write_report

    # Everything a user can get wrong is checked before any model samples.
    prompts = prompts_from_args(args)
    sampling = sampling_from_args(args)
    seeds = seeds_from_args(args)
    labelled = parse_adapters(args.adapter)
    loaded = {label: adapter_io.load_adapter(folder) for label, folder in labelled.items()}
    dataset = valid_overrides(args.valid, next(iter(labelled.values()))) if args.valid else None
    if args.clap_model is not None and not Path(args.clap_model).is_dir():
        raise UserError(f"--clap-model {args.clap_model} is not a folder.")
    if args.fad_reference is not None and args.clap_model is None:
        raise UserError("--fad-reference needs --clap-model (FAD is computed on CLAP audio embeddings).")
    base_name = args.base or next(iter(loaded.values())).config.get('base_model')
    if not base_name:
        raise UserError("The adapter records no base model: pass --base.")
    base_pair = load_base(base_name)  # read once, shared by every model below
    pairs = {BASE_LABEL: base_pair}
    for label, adapter in loaded.items():  # a mismatched base is refused here, before anything is sampled
        pairs[label] = with_adapter(base_pair, labelled[label], adapter, args.force_base_mismatch)
    base = base_pair.base
    device = args.device or default_device()
    out = Path(args.out)
    clap = _ReferenceModels(args, device) if args.clap_model is not None else None  # loads before sampling

    # The dataset is checked entry by entry when the solver is built: CE first, so bad data fails fast.
    skipped = []
    cross_entropy = None
    if dataset is None:
        skipped.append({'name': 'valid cross-entropy', 'reason': 'no --valid given (e.g. --valid dset=audio/<name>)'})
    else:
        from .valid_ce import valid_cross_entropy
        cross_entropy = valid_cross_entropy(base_name, loaded, dataset, device=device, base_label=BASE_LABEL)

    samples, model_info = [], {}
    for label, pair in pairs.items():
        model = build_musicgen(pair, device=device)
        model_info[label] = model.audiocraft_lora
        audio_dir = Path('audio') / slugify(label.replace(':', '_'), max_len=60)
        for record in generate_to_folder(model, prompts, seeds, sampling, out / audio_dir, label=label):
            samples.append({'prompt': record['prompt'], 'seed': record['seed'], 'model': label,
                            'wav': str(audio_dir / record['file']), 'diagnostics': record['diagnostics'],
                            'name': record['name'], 'tokens_sha256': record['tokens_sha256']})
        del model
        gc.collect()

    reference_metrics: tp.Dict[str, tp.Any] = {}
    if clap is None:
        skipped.append({'name': 'CLAP', 'reason': 'no local CLAP model given (--clap-model FOLDER)'})
        skipped.append({'name': 'FAD', 'reason': 'needs a local CLAP model (--clap-model FOLDER); none given'})
    else:
        skipped.extend(clap.measure(samples, list(pairs), out, reference_metrics))

    histories = {label: h for label, folder in labelled.items() if (h := _history(folder))}
    report = {
        'title': args.title or f'{base.name}: base vs {", ".join(labelled)}',
        'models': list(pairs), 'base_model': BASE_LABEL,
        'settings': {**sampling.to_dict(), 'seeds': seeds, 'sample_rate': None,
                     'durations_s': sorted({p.duration for p in prompts}), 'device': device},
        'samples': [{k: s[k] for k in ('prompt', 'seed', 'model', 'wav', 'diagnostics')} for s in samples],
        'skipped': skipped, 'reference_metrics': reference_metrics,
        'history': histories,
        # (the epoch each adapter was exported from, as its config says: best valid, or the last with export_state)
        'exported_epoch': {label: loaded[label].config['epoch'] for label in histories
                           if 'epoch' in loaded[label].config},
        'extra': {'models': model_info, 'environment': environment(),
                  'tokens_sha256': {f"{s['model']}|{s['name']}|seed{s['seed']}": s['tokens_sha256'] for s in samples},
                  'clap_per_sample': {f"{s['model']}|{s['name']}|seed{s['seed']}": s['clap']
                                      for s in samples if 'clap' in s},
                  'dataset_overrides': dataset},
    }
    if cross_entropy is not None:
        report['cross_entropy'] = cross_entropy
    report['settings']['sample_rate'] = samples[0]['diagnostics']['sample_rate']
    files = write_report(out, report)
    _print_summary(files.json_path)
    print(f"Wrote {files.html_path} and {files.json_path}")
    return 0


class _ReferenceModels:
    """CLAP similarity and FAD (on CLAP embeddings) for the compare report; see `clap_metrics`."""

    def __init__(self, args: argparse.Namespace, device: str):
        from .clap_metrics import ClapScorer, read_reference_audio
        self.scorer = ClapScorer(args.clap_model, device=device)
        source = args.fad_reference
        if source is None and args.valid and len(args.valid) == 1 and '=' not in args.valid[0]:
            source = args.valid[0]
        self.reference_source = source
        self.reference = read_reference_audio(source) if source is not None else None

    def measure(self, samples: list, models: tp.List[str], out: Path, section: tp.Dict[str, tp.Any]) -> list:
        """Fill `section` (report['reference_metrics']) and samples' 'clap'; return what was skipped."""
        import numpy as np
        import soundfile
        from .clap_metrics import frechet_distance
        wavs = []
        for sample in samples:
            audio, sample_rate = soundfile.read(out / sample['wav'], dtype='float32', always_2d=True)
            wavs.append((audio.T, sample_rate))
        scores = self.scorer.similarity([s['prompt'] for s in samples], wavs)
        for sample, score in zip(samples, scores):
            sample['clap'] = score
        section['CLAP'] = {
            'description': f'mean cosine similarity of prompt and audio embeddings ({self.scorer.name})',
            'higher_is_better': True,
            'values': {m: float(np.mean([s['clap'] for s in samples if s['model'] == m])) for m in models}}
        if self.reference is None:
            return [{'name': 'FAD', 'reason': 'no reference clips (--fad-reference FOLDER, or --valid FOLDER)'}]
        if min(sum(s['model'] == m for s in samples) for m in models) < 2:
            return [{'name': 'FAD', 'reason': 'needs at least 2 samples per model (more prompts or seeds)'}]
        reference = self.scorer.embed_audio(self.reference).numpy()
        values = {}
        for model in models:
            embeddings = self.scorer.embed_audio([w for s, w in zip(samples, wavs) if s['model'] == model])
            values[model] = frechet_distance(embeddings.numpy(), reference)
        section['FAD'] = {
            'description': (f'Frechet distance of CLAP audio embeddings to {len(self.reference)} reference clips '
                            f'({self.reference_source}); few samples bias it upwards: compare models, not papers'),
            'higher_is_better': False, 'values': values}
        return []


def _print_summary(json_path: Path) -> None:
    document = json.loads(json_path.read_text())
    print(f"{'model':<28} {'fade dB':>8} {'silence':>8} {'flatness':>9} {'valid CE':>9}  flags")
    for model in document['models']:
        metrics = document['aggregates'][model]['metrics']
        rates = document['aggregates'][model]['flag_rates']
        flagged = ', '.join(f'{name} {100 * rate:.0f}%' for name, rate in rates.items() if rate > 0) or '-'
        ce = (document.get('cross_entropy') or {}).get(model, {}).get('mean')
        silence = 100 * metrics['silence_fraction']['mean']
        print(f"{model:<28} {metrics['fade_ratio_db']['mean']:>+8.1f} {silence:>7.0f}% "
              f"{metrics['spectral_flatness']['mean']:>9.3f} {'-' if ce is None else f'{ce:.3f}':>9}  {flagged}")
    for name, entry in (document.get('reference_metrics') or {}).items():
        values = ', '.join(f'{m} {v:.4f}' for m, v in entry['values'].items() if v is not None)
        print(f"{name} ({'higher' if entry['higher_is_better'] else 'lower'} is better): {values}")
    for item in document['skipped']:
        print(f"skipped {item['name']}: {item['reason']}")
