"""Comparison report: `report.json` (every number) and `report.html` (players, figures, tables) in one folder.

`write_report(out_dir, report)` takes the dict below, computes flags, per-model aggregates and differences to the
base model, draws the figures under `out_dir/figures/`, and writes both files atomically. All links in the HTML are
relative (keep the wavs under `out_dir` and the folder can be moved or zipped as is); `referenced_files` lists them.

Input schema (`report`; unknown top-level keys raise, to catch typos):
    models (list of str): required; column order, e.g. ['base', 'adapter:trap_r32']. Unique.
    base_model (str): optional, the reference model; defaults to models[0].
    settings (dict): required, json-serialisable; the sampling settings used for every model, e.g.
        {'duration_s': 15.0, 'cfg_coef': 3.0, 'top_k': 250, 'top_p': 0.0, 'temperature': 1.0,
         'seeds': [0, 1], 'sample_rate': 32000}.
    samples (list of dict): required, non-empty; one per (prompt, seed, model), each
        {'prompt': str, 'seed': int, 'model': str (one of models),
         'wav': str or Path (relative to out_dir, or absolute; must exist),
         'diagnostics': AudioDiagnostics or its to_dict()}.
    title (str): optional.
    cross_entropy (dict): optional, model -> {'per_codebook': [K] floats (mean CE in nats per codebook),
        'split': 'valid' (optional), 'num_tokens': int (optional)}.
    history (dict): optional, model -> flashy/dora history (list of per-epoch dicts, see `plots.plot_loss_curves`).
    exported_epoch (dict): optional, model -> 1-based epoch its adapter was exported from (adapter_config.json's
        `epoch`), marked on its history figure; without it the mark is the epoch with the lowest valid CE (the
        last one on ties: AudioCraft's best_state, what `export_state: best` exports).
    reference_metrics (dict): optional, metrics from reference models (CLAP, FAD), name ->
        {'description': str, 'higher_is_better': bool, 'values': {model: float or None}}.
    skipped (list): optional, metrics not computed; each {'name': 'CLAP', 'reason': 'no local model given'} or a
        string 'CLAP: no local model given'.
    extra (dict): optional, free-form json-serialisable, copied to report.json.

Output `report.json` (schema_version 1): the input with paths made relative to out_dir, plus
    thresholds: flag thresholds, plus silence_threshold_dbfs / clip_threshold / window_s (shared by all samples,
        else UserError) and db_floor;
    samples[i].flags: list of flag names, the sample's own (`diagnostics.FLAG_NAMES`) then, for a non-base model,
        those against the base's sample for the same prompt and seed (`diagnostics.PAIR_FLAG_NAMES`);
    samples[i].spectrogram: relative PNG path or null;
    groups: [{'prompt', 'seed', 'label', 'loudness_figure'}] in display order; label is the wav files' common stem
        without `_seed<N>` (e.g. '00_trap_beat', as `generate` names them), else 'prompt NN' (0-based);
    aggregates: model -> `diagnostics.aggregate`; a non-base model's flag_rates also hold the PAIR_FLAG_NAMES
        (fraction of its samples with a base sample that raise the flag) when it has such samples;
    comparisons: model -> `diagnostics.compare_to_base` (non-base) plus 'pairs' (samples with a base sample) and
        'pair_flag_rates' {flag: fraction};
    cross_entropy[model] gains 'mean', 'perplexity_per_codebook', 'perplexity', 'diff_to_base_per_codebook',
        'diff_to_base_mean';
    exported_epoch: model -> {'epoch', 'source'} for the models with a history;
    figures: {'cross_entropy': path or null, 'history': {model: path}}.
Non-finite floats are written as null (strict JSON).
"""
import dataclasses
import json
import math
import os
import typing as tp
from pathlib import Path

import numpy as np
import soundfile

from . import diagnostics as diag_lib
from . import plots
from .errors import UserError
from .report_html import referenced_files, render_html  # noqa: F401 (public API of this module)

SCHEMA_VERSION = 1
REQUIRED_KEYS = ('models', 'settings', 'samples')
OPTIONAL_KEYS = ('base_model', 'title', 'cross_entropy', 'history', 'exported_epoch', 'reference_metrics', 'skipped',
                 'extra')
FIGURES_DIR = 'figures'



class ReportFiles(tp.NamedTuple):
    json_path: Path
    html_path: Path


@dataclasses.dataclass
class _Sample:
    prompt: str
    seed: int
    model: str
    wav: Path  # absolute
    diagnostics: tp.Dict[str, tp.Any]
    flags: tp.List[str]
    spectrogram: tp.Optional[str] = None  # relative to out_dir


def write_report(out_dir: tp.Union[str, os.PathLike], report: tp.Mapping[str, tp.Any],
                 thresholds: tp.Optional[diag_lib.FlagThresholds] = None, spectrograms: bool = True) -> ReportFiles:
    """Write `report.json`, `report.html` and their figures into `out_dir` (schema in the module docstring).

    Args:
        out_dir (str or Path): output folder (created); wav paths may be relative to it.
        report (dict): see the module docstring.
        thresholds (FlagThresholds, optional): flag thresholds, defaults to the diagnostics module constants.
        spectrograms (bool): read every wav and draw its spectrogram (the slow part).
    Returns:
        ReportFiles: paths of report.json and report.html.
    Raises:
        UserError: invalid schema, unknown model, duplicate sample, missing or unreadable wav.
    """
    out_dir = Path(out_dir).resolve()
    thresholds = thresholds or diag_lib.FlagThresholds()
    models, base_model = _validate_models(report)
    samples = _validate_samples(report, out_dir, models, thresholds)
    skipped = _validate_skipped(report.get('skipped', []))
    groups = _group_keys(samples)
    by_key = {(s.prompt, s.seed, s.model): s for s in samples}
    pair_flags = _flag_against_base(samples, by_key, base_model, thresholds)

    aggregates = {}
    for model in models:
        rows = [s.diagnostics for s in samples if s.model == model]
        if not rows:
            raise UserError(f'report: model {model!r} has no samples; every model in "models" needs samples.')
        aggregates[model] = diag_lib.aggregate(rows, thresholds)
    comparisons = {}
    for model in (m for m in models if m != base_model):
        raised = [pair_flags[id(s)] for s in samples if s.model == model and id(s) in pair_flags]
        rates = {name: float(np.mean([name in r for r in raised])) if raised else None
                 for name in diag_lib.PAIR_FLAG_NAMES}
        if raised:  # (no base sample to pair with: the rates stay out of flag_rates, None in pair_flag_rates)
            aggregates[model]['flag_rates'].update(rates)
        comparisons[model] = diag_lib.compare_to_base(aggregates[base_model], aggregates[model]) | {
            'pairs': len(raised), 'pair_flag_rates': rates}

    figures_dir = out_dir / FIGURES_DIR
    group_rows = []
    for index, (prompt, seed) in enumerate(groups):
        present = [by_key[(prompt, seed, m)] for m in models if (prompt, seed, m) in by_key]
        label = _group_label(present, index, seed)
        units = {s.diagnostics['loudness_unit'] for s in present}
        curves = {s.model: (s.diagnostics['window_times_s'], s.diagnostics['loudness_curve']) for s in present}
        loudness_png = plots.plot_loudness_curves(
            curves, f'{label}, seed {seed}', figures_dir / f'p{index:03d}_seed{seed}_loudness.png',
            ylabel=f'loudness ({units.pop() if len(units) == 1 else "dB"})')
        group_rows.append({'prompt': prompt, 'seed': seed, 'label': label,
                           'loudness_figure': _rel(loudness_png, out_dir)})
        if spectrograms:
            for sample in present:
                wav, sample_rate = _read_wav(sample.wav)
                png = plots.plot_spectrogram(wav, sample_rate, figures_dir / (
                    f'p{index:03d}_seed{seed}_m{models.index(sample.model)}_spectrogram.png'), sample.model)
                sample.spectrogram = _rel(png, out_dir)

    cross_entropy, ce_figure = _cross_entropy_section(report.get('cross_entropy'), models, base_model, figures_dir,
                                                      out_dir)
    history_figures, exported = {}, {}
    given_epochs = report.get('exported_epoch') or {}
    unknown = [m for m in given_epochs if m not in models]
    if unknown:
        raise UserError(f'report["exported_epoch"] names models {unknown}, which are not in models {models}.')
    for model, history in (report.get('history') or {}).items():
        if model not in models:
            raise UserError(f'report["history"] names model {model!r}, which is not in models {models}.')
        exported[model] = _exported_epoch(history, given_epochs.get(model), model)
        mark = exported[model]
        png = plots.plot_loss_curves(
            history, figures_dir / f'history_m{models.index(model)}.png', title=f'{model}: cross-entropy per epoch',
            mark_epoch=mark and mark['epoch'],
            mark_label=mark and f'exported adapter (epoch {mark["epoch"]})')
        history_figures[model] = _rel(png, out_dir)

    document = {
        'schema_version': SCHEMA_VERSION,
        'title': str(report.get('title') or 'MusicGen base vs adapter comparison'),
        'models': models, 'base_model': base_model, 'settings': report['settings'],
        'thresholds': dataclasses.asdict(thresholds) | _measurement_settings(samples),
        'samples': [{'prompt': s.prompt, 'seed': s.seed, 'model': s.model, 'wav': _rel(s.wav, out_dir),
                     'flags': s.flags, 'spectrogram': s.spectrogram, 'diagnostics': s.diagnostics}
                    for s in samples],
        'groups': group_rows, 'aggregates': aggregates, 'comparisons': comparisons,
        'cross_entropy': cross_entropy, 'history': report.get('history') or {},
        'exported_epoch': {m: e for m, e in exported.items() if e is not None},
        'figures': {'cross_entropy': ce_figure, 'history': history_figures},
        'reference_metrics': _validate_reference_metrics(report.get('reference_metrics') or {}, models),
        'skipped': skipped, 'extra': report.get('extra') or {},
    }
    document = _jsonable(document, 'report')
    json_path = plots.write_bytes_atomic(
        out_dir / 'report.json', (json.dumps(document, indent=2, allow_nan=False) + '\n').encode('utf-8'))
    html_path = plots.write_bytes_atomic(out_dir / 'report.html', render_html(document).encode('utf-8'))
    return ReportFiles(json_path, html_path)


def _validate_models(report: tp.Mapping[str, tp.Any]) -> tp.Tuple[tp.List[str], str]:
    if not isinstance(report, tp.Mapping):
        raise UserError(f'report must be a dict, got {type(report).__name__}.')
    unknown = sorted(set(report) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    missing = [key for key in REQUIRED_KEYS if key not in report]
    if unknown or missing:
        raise UserError(f'report: unknown keys {unknown}, missing keys {missing}; allowed: '
                        f'{list(REQUIRED_KEYS + OPTIONAL_KEYS)} (see audiocraft_lora/report.py).')
    models = report['models']
    if (not isinstance(models, (list, tuple)) or not models or not all(isinstance(m, str) and m for m in models)
            or len(set(models)) != len(models)):
        raise UserError(f'report["models"] must be a non-empty list of unique names, got {models!r}.')
    if not isinstance(report['settings'], tp.Mapping):
        raise UserError('report["settings"] must be a dict of the sampling settings used.')
    base_model = report.get('base_model') or models[0]
    if base_model not in models:
        raise UserError(f'report["base_model"] {base_model!r} is not in models {list(models)}.')
    return list(models), base_model


def _validate_samples(report: tp.Mapping[str, tp.Any], out_dir: Path, models: tp.List[str],
                      thresholds: diag_lib.FlagThresholds) -> tp.List[_Sample]:
    raw = report['samples']
    if not isinstance(raw, (list, tuple)) or not raw:
        raise UserError('report["samples"] must be a non-empty list of {prompt, seed, model, wav, diagnostics}.')
    samples, seen = [], set()
    for index, item in enumerate(raw):
        where = f'report["samples"][{index}]'
        missing = [key for key in ('prompt', 'seed', 'model', 'wav', 'diagnostics') if key not in item]
        if missing:
            raise UserError(f'{where} lacks {missing}.')
        if item['model'] not in models:
            raise UserError(f'{where}: model {item["model"]!r} is not in models {models}.')
        if isinstance(item['seed'], bool) or not isinstance(item['seed'], (int, np.integer)):
            raise UserError(f'{where}: seed must be an integer, got {item["seed"]!r}.')
        key = (str(item['prompt']), int(item['seed']), item['model'])
        if key in seen:
            raise UserError(f'{where}: duplicate sample for prompt {key[0]!r}, seed {key[1]}, model {key[2]!r}.')
        seen.add(key)
        wav = Path(item['wav'])
        wav = wav if wav.is_absolute() else out_dir / wav
        if not wav.is_file():
            raise UserError(f'{where}: wav file {str(wav)!r} does not exist.')
        diagnostics = item['diagnostics']
        diagnostics = diagnostics.to_dict() if isinstance(diagnostics, diag_lib.AudioDiagnostics) else dict(diagnostics)
        lacking = [f.name for f in dataclasses.fields(diag_lib.AudioDiagnostics) if f.name not in diagnostics]
        if lacking:
            raise UserError(f'{where}: diagnostics lack {lacking}; pass audio_diagnostics(...) or its to_dict().')
        samples.append(_Sample(*key, wav=wav.resolve(), diagnostics=diagnostics,
                               flags=diag_lib.flags(diagnostics, thresholds)))
    return samples


def _measurement_settings(samples: tp.Sequence[_Sample]) -> tp.Dict[str, float]:
    """Silence / clip thresholds and window of the diagnostics; every sample must share them to be comparable."""
    keys = ('silence_threshold_dbfs', 'clip_threshold', 'window_s')
    settings = {tuple(s.diagnostics[k] for k in keys) for s in samples}
    if len(settings) != 1:
        raise UserError(f'report: samples were measured with different diagnostics settings {keys}: '
                        f'{sorted(settings)}; measure every sample with the same audio_diagnostics arguments.')
    return dict(zip(keys, settings.pop())) | {'db_floor': diag_lib.DB_FLOOR}


def _validate_reference_metrics(raw: tp.Mapping[str, tp.Any], models: tp.List[str]) -> tp.Dict[str, tp.Any]:
    section = {}
    for name, entry in raw.items():
        values = entry.get('values') if isinstance(entry, tp.Mapping) else None
        if not isinstance(values, tp.Mapping):
            raise UserError(f'report["reference_metrics"][{name!r}] needs a "values" dict model -> number.')
        unknown = [m for m in values if m not in models]
        if unknown:
            raise UserError(f'report["reference_metrics"][{name!r}] names models {unknown} not in {models}.')
        section[str(name)] = {'description': str(entry.get('description', '')),
                              'higher_is_better': bool(entry.get('higher_is_better', True)),
                              'values': {m: (None if values.get(m) is None else float(values[m]))
                                         for m in models if m in values}}
    return section


def _validate_skipped(skipped: tp.Sequence[tp.Any]) -> tp.List[tp.Dict[str, str]]:
    entries = []
    for item in skipped:
        if isinstance(item, str):
            name, _, reason = item.partition(':')
            entries.append({'name': name.strip(), 'reason': reason.strip()})
        elif isinstance(item, tp.Mapping) and 'name' in item:
            entries.append({'name': str(item['name']), 'reason': str(item.get('reason', ''))})
        else:
            raise UserError(f'report["skipped"] entries are "NAME: reason" or {{"name", "reason"}}, got {item!r}.')
    return entries


def _group_keys(samples: tp.Sequence[_Sample]) -> tp.List[tp.Tuple[str, int]]:
    """(prompt, seed) pairs in first-seen prompt order, seeds ascending."""
    prompts = list(dict.fromkeys(s.prompt for s in samples))
    return [(p, seed) for p in prompts for seed in sorted({s.seed for s in samples if s.prompt == p})]


def _cross_entropy_section(raw: tp.Optional[tp.Mapping[str, tp.Any]], models: tp.List[str], base_model: str,
                           figures_dir: Path, out_dir: Path) -> tp.Tuple[tp.Dict[str, tp.Any], tp.Optional[str]]:
    if not raw:
        return {}, None
    section = {}
    for model, entry in raw.items():
        if model not in models:
            raise UserError(f'report["cross_entropy"] names model {model!r}, which is not in models {models}.')
        per_codebook = [float(v) for v in entry.get('per_codebook', [])]
        if not per_codebook:
            raise UserError(f'report["cross_entropy"][{model!r}] needs a non-empty "per_codebook" list.')
        section[model] = dict(entry) | {
            'per_codebook': per_codebook, 'mean': float(np.mean(per_codebook)),
            'perplexity_per_codebook': [math.exp(v) for v in per_codebook],
            'perplexity': math.exp(float(np.mean(per_codebook)))}
    if base_model in section:
        base = section[base_model]['per_codebook']
        for model, entry in section.items():
            if len(entry['per_codebook']) == len(base):  # (other codebooks: nothing to compare)
                entry['diff_to_base_per_codebook'] = [v - b for v, b in zip(entry['per_codebook'], base)]
                entry['diff_to_base_mean'] = entry['mean'] - section[base_model]['mean']
    ordered = {m: section[m]['per_codebook'] for m in models if m in section}
    split = next(iter(section.values())).get('split', 'valid')
    png = plots.plot_bars(ordered, f'{split} cross-entropy per codebook', 'CE (nats)',
                          figures_dir / 'cross_entropy.png')
    return {m: section[m] for m in models if m in section}, _rel(png, out_dir)


def _flag_against_base(samples: tp.Sequence[_Sample], by_key: tp.Mapping[tp.Tuple[str, int, str], _Sample],
                       base_model: str, thresholds: diag_lib.FlagThresholds) -> tp.Dict[int, tp.List[str]]:
    """Append `diagnostics.flags_vs_base` to every non-base sample that has a base sample for its prompt and seed;
    returns id(sample) -> those flags."""
    raised = {}
    for sample in samples:
        base = by_key.get((sample.prompt, sample.seed, base_model))
        if sample.model != base_model and base is not None:
            raised[id(sample)] = diag_lib.flags_vs_base(sample.diagnostics, base.diagnostics, thresholds)
            sample.flags = sample.flags + raised[id(sample)]
    return raised


def _group_label(present: tp.Sequence[_Sample], index: int, seed: int) -> str:
    """The wav files' common stem without `_seed<N>` ('00_trap_beat', as `generate` names them), else 'prompt NN'."""
    suffix = f'_seed{seed}'
    stems = {s.wav.stem[:-len(suffix)] if s.wav.stem.endswith(suffix) else None for s in present}
    stem = stems.pop() if len(stems) == 1 else None
    return stem or f'prompt {index:02d}'


def _exported_epoch(history: tp.Sequence[tp.Mapping[str, tp.Any]], given: tp.Any,
                    model: str) -> tp.Optional[tp.Dict[str, tp.Any]]:
    """{'epoch', 'source'} of the adapter's epoch: as given, else the lowest valid CE (latest on ties), else None."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 1:
            raise UserError(f'report["exported_epoch"][{model!r}] must be a 1-based epoch number, got {given!r}.')
        return {'epoch': int(given), 'source': 'adapter config'}
    epochs, values = plots.loss_series(history, 'valid', 'ce')
    finite = [(v, e) for e, v in zip(epochs, values) if math.isfinite(v)]
    if not finite:
        return None
    low = min(v for v, _ in finite)
    return {'epoch': max(e for v, e in finite if v == low), 'source': 'lowest valid CE'}


def _read_wav(path: Path) -> tp.Tuple[np.ndarray, int]:
    try:
        data, sample_rate = soundfile.read(str(path), dtype='float32', always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise UserError(f'cannot read audio file {str(path)!r}: {exc}') from exc
    return data.T, int(sample_rate)


def _rel(path: tp.Union[str, Path], out_dir: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), out_dir)).as_posix()


def _jsonable(value: tp.Any, where: str) -> tp.Any:
    """Plain json types; numpy scalars/arrays converted, non-finite floats -> None, Paths -> str."""
    if isinstance(value, diag_lib.AudioDiagnostics):
        value = value.to_dict()
    if isinstance(value, tp.Mapping):
        return {str(k): _jsonable(v, f'{where}[{k!r}]') for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v, f'{where}[{i}]') for i, v in enumerate(list(value))]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise UserError(f'{where} holds a {type(value).__name__}, which is not json-serialisable; pass numbers, '
                    'strings, lists or dicts.')


# ----------------------------------------------------------------------------------------------------------- HTML
