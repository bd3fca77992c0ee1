"""HTML rendering of a comparison report (see `audiocraft_lora.report` for the document schema).

`render_html` turns the JSON-ready report document into one page with relative links; `referenced_files` lists the
files a written page links to (tests use it to check every link resolves).
"""
import html
import html.parser
import json
import os
import typing as tp
import urllib.parse
from pathlib import Path

from . import diagnostics as diag_lib

# metric -> (column header, format); the flag that highlights it.
METRIC_DISPLAY = {
    'integrated_lufs': ('integrated LUFS', '{:.1f}'),
    'fade_ratio_db': ('fade (dB, last - first third)', '{:+.1f}'),
    'silence_fraction': ('silent windows', '{:.0%}'),
    'spectral_flatness': ('spectral flatness', '{:.3f}'),
    'detrended_flatness': ('detrended flatness', '{:.3f}'),
    'clipping_fraction': ('clipped samples', '{:.2%}'),
    'tail_silence_s': ('tail silence (s)', '{:.2f}'),
    'peak_dbfs': ('peak dBFS', '{:.1f}'),
    'duration_s': ('duration (s)', '{:.2f}'),
}
# metric -> the flags that highlight it
FLAGS_OF_METRIC = {'fade_ratio_db': ('fades',), 'silence_fraction': ('mostly_silent',),
                   'spectral_flatness': ('noise_like',), 'detrended_flatness': ('noise_like', 'noisier_than_base'),
                   'clipping_fraction': ('clipping',), 'tail_silence_s': ('silent_tail',),
                   'integrated_lufs': ('quieter_than_base',)}
ALL_FLAG_NAMES = diag_lib.FLAG_NAMES + diag_lib.PAIR_FLAG_NAMES

CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1600px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}th{background:#f3f3f3}
td.text,th.text{text-align:left}.flag{background:#f8d0d0;font-weight:bold}.badge{background:#c0392b;color:#fff;
border-radius:3px;padding:1px 5px;margin-right:3px;font-size:90%}.ok{color:#2e7d32}img{max-width:100%}
.cell{min-width:380px}.prompt{font-family:monospace;background:#f6f6f6;padding:2px 4px}"""


def _e(text: tp.Any) -> str:
    return html.escape(str(text), quote=True)


def _url(relative: str) -> str:
    return _e(urllib.parse.quote(relative))


def _fmt(metric: str, value: tp.Optional[float]) -> str:
    return '&mdash;' if value is None else _e(METRIC_DISPLAY[metric][1].format(value))


def _fmt_diff(metric: str, value: tp.Optional[float]) -> str:
    text = _fmt(metric, value)
    return '+' + text if value is not None and value >= 0 and not text.startswith('+') else text


def _table(header: tp.Sequence[str], rows: tp.Sequence[tp.Sequence[str]]) -> str:
    """Cells are HTML already escaped by the caller; a cell starting with '<td' is used as is."""
    head = ''.join(f'<th>{h}</th>' for h in header)
    body = ''.join('<tr>' + ''.join(c if c.startswith('<td') else f'<td>{c}</td>' for c in row) + '</tr>'
                   for row in rows)
    return f'<table><tr>{head}</tr>{body}</table>'


def _badges(names: tp.Sequence[str]) -> str:
    return ''.join(f'<span class="badge">{_e(n)}</span>' for n in names) or '<span class="ok">no flags</span>'


def render_html(document: tp.Mapping[str, tp.Any]) -> str:
    """The report page for a `report.json` document (all user text escaped, all links relative)."""
    models, base = document['models'], document['base_model']
    parts = [f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_e(document["title"])}</title>'
             f'<style>{CSS}</style></head><body><h1>{_e(document["title"])}</h1>']
    parts.append('<h2>Settings</h2>' + _table(['setting', 'value'], [
        [f'<td class="text">{_e(k)}</td>', f'<td class="text">{_e(json.dumps(v))}</td>']
        for k, v in document['settings'].items()]))
    limits = document['thresholds']
    parts.append(f'<p>Flags: <b>fades</b> fade &lt; {limits["fade_db"]:g} dB; <b>mostly_silent</b> more than '
                 f'{limits["mostly_silent_fraction"]:.0%} of windows below {limits["silence_threshold_dbfs"]:g} dBFS; '
                 f'<b>noise_like</b> spectral flatness &gt; {limits["noise_flatness"]:g} or detrended flatness &gt; '
                 f'{limits["noise_detrended_flatness"]:g}; <b>clipping</b> more than '
                 f'{limits["clipping_fraction"]:.0%} of samples at |x| &ge; {limits["clip_threshold"]:g}; '
                 f'<b>silent_tail</b> trailing silence &ge; {limits["tail_silence_s"]:g} s or &ge; '
                 f'{limits["tail_silence_fraction"]:.0%} of the duration. Against the base model\'s sample for the '
                 f'same prompt and seed: <b>quieter_than_base</b> integrated loudness at least '
                 f'{limits["quieter_than_base_lu"]:g} LU lower (intended when the training clips are quieter than '
                 f'the base\'s music, e.g. lofi or ambient: compare with their loudness); <b>noisier_than_base</b> '
                 f'detrended flatness at least {limits["noisier_than_base_flatness"]:g} higher.</p>')
    parts.append(_summary_html(document, models, base))
    parts.append(_cross_entropy_html(document, models, base))
    parts.append(_reference_metrics_html(document, models))
    if document['figures']['history']:
        exported = document.get('exported_epoch') or {}
        parts.append('<h2>Training curves</h2>' + ''.join(
            f'<h3>{_e(m)}</h3>' + (f'<p>Exported adapter: epoch {exported[m]["epoch"]} ({_e(exported[m]["source"])}'
                                    '), the dotted line.</p>' if m in exported else '')
            + f'<img src="{_url(p)}" alt="training curve">' for m, p in document['figures']['history'].items()))
    parts.append('<h2>Samples</h2>')
    by_key = {(s['prompt'], s['seed'], s['model']): s for s in document['samples']}
    for index, group in enumerate(document['groups']):
        label = group.get('label') or f'prompt {index:02d}'
        parts.append(f'<h3>{_e(label)}, seed {group["seed"]}: <span class="prompt">{_e(group["prompt"])}'
                     f'</span></h3><img src="{_url(group["loudness_figure"])}" alt="loudness curves">')
        cells = [_sample_cell(by_key.get((group['prompt'], group['seed'], m))) for m in models]
        parts.append(_table([_e(m) for m in models], [cells]))
    parts.append('<h2>Skipped</h2>' + ('<ul>' + ''.join(
        f'<li>{_e(s["name"])}: skipped, {_e(s["reason"])}</li>' for s in document['skipped']) + '</ul>'
        if document['skipped'] else '<p>Nothing was skipped.</p>'))
    parts.append('</body></html>\n')
    return '\n'.join(parts)


def _summary_html(document: tp.Mapping[str, tp.Any], models: tp.Sequence[str], base: str) -> str:
    header = ['model', 'samples'] + [_e(METRIC_DISPLAY[m][0]) for m in diag_lib.SCALAR_METRICS] + [
        f'flag rate: {_e(f)}' for f in ALL_FLAG_NAMES]
    rows = []
    for model in models:
        agg, comparison = document['aggregates'][model], document['comparisons'].get(model)
        row = [f'<td class="text">{_e(model)}{" (reference)" if model == base else ""}</td>', str(agg['count'])]
        for metric in diag_lib.SCALAR_METRICS:
            text = _fmt(metric, agg['metrics'][metric]['mean'])
            if comparison is not None:
                text += f' <small>({_fmt_diff(metric, comparison["metrics"][metric]["diff"])})</small>'
            flagged = any((agg['flag_rates'].get(flag) or 0) > 0 for flag in FLAGS_OF_METRIC.get(metric, ()))
            row.append(f'<td class="flag">{text}</td>' if flagged else text)
        for flag in ALL_FLAG_NAMES:
            rate = agg['flag_rates'].get(flag)
            if rate is None:  # a flag against the base, for the base itself (or no base sample to pair with)
                row.append('&mdash;')
            else:
                row.append(f'<td class="flag">{rate:.0%}</td>' if rate > 0 else f'{rate:.0%}')
        rows.append(row)
    return ('<h2>Summary per model</h2><p>Means over samples; in brackets the difference to the base model '
            f'({_e(base)}). Highlighted: at least one sample raises the flag.</p>' + _table(header, rows))


def _cross_entropy_html(document: tp.Mapping[str, tp.Any], models: tp.Sequence[str], base: str) -> str:
    section = document['cross_entropy']
    if not section:
        return ''
    num_codebooks = max(len(e['per_codebook']) for e in section.values())
    header = ['model', 'mean CE', 'perplexity'] + [f'CE cb{k}' for k in range(num_codebooks)] + [
        f'ppl cb{k}' for k in range(num_codebooks)]
    rows = []
    for model in (m for m in models if m in section):
        entry = section[model]
        diffs = entry.get('diff_to_base_per_codebook') if model != base else None
        ce_cells = [f'{v:.3f}' + (f' <small>({d:+.3f})</small>' if diffs else '')
                    for v, d in zip(entry['per_codebook'], diffs or entry['per_codebook'])]
        mean_diff = entry.get('diff_to_base_mean') if model != base else None
        mean = f'{entry["mean"]:.3f}' + (f' <small>({mean_diff:+.3f})</small>' if mean_diff is not None else '')
        rows.append([f'<td class="text">{_e(model)}</td>', mean, f'{entry["perplexity"]:.1f}']
                    + ce_cells + [f'{v:.1f}' for v in entry['perplexity_per_codebook']])
    figure = document['figures']['cross_entropy']
    image = f'<img src="{_url(figure)}" alt="cross-entropy per codebook">' if figure else ''
    return ('<h2>Cross-entropy per codebook</h2><p>Teacher-forced CE (nats) on held-out data; in brackets the '
            f'difference to {_e(base)}. Perplexity = exp(CE).</p>{image}' + _table(header, rows))


def _reference_metrics_html(document: tp.Mapping[str, tp.Any], models: tp.Sequence[str]) -> str:
    section = document.get('reference_metrics') or {}
    if not section:
        return ''
    rows = []
    for name, entry in section.items():
        cells = [f'{v:.4f}' if v is not None else '-' for v in (entry['values'].get(m) for m in models)]
        better = 'higher is better' if entry['higher_is_better'] else 'lower is better'
        rows.append([f'<td class="text">{_e(name)} <small>({better})</small></td>'] + cells +
                    [f'<td class="text">{_e(entry["description"])}</td>'])
    return '<h2>Reference-model metrics</h2>' + _table(['metric'] + [_e(m) for m in models] + ['how'], rows)


def _sample_cell(sample: tp.Optional[tp.Mapping[str, tp.Any]]) -> str:
    if sample is None:
        return '<td class="text">no sample</td>'
    values = sample['diagnostics']
    rows = []
    for metric in diag_lib.SCALAR_METRICS:
        flagged = any(flag in sample['flags'] for flag in FLAGS_OF_METRIC.get(metric, ()))
        value = _fmt(metric, values[metric])
        rows.append([f'<td class="text">{_e(METRIC_DISPLAY[metric][0])}</td>',
                     f'<td class="flag">{value}</td>' if flagged else value])
    spectrogram = (f'<img src="{_url(sample["spectrogram"])}" alt="spectrogram">' if sample['spectrogram'] else '')
    return (f'<td class="text cell"><audio controls preload="none" src="{_url(sample["wav"])}"></audio><br>'
            f'{_badges(sample["flags"])}<br>{spectrogram}{_table(["metric", "value"], rows)}</td>')


class _LinkCollector(html.parser.HTMLParser):
    LINK_ATTRIBUTES = {'src', 'href'}

    def __init__(self) -> None:
        super().__init__()
        self.links: tp.List[str] = []

    def handle_starttag(self, tag: str, attrs: tp.List[tp.Tuple[str, tp.Optional[str]]]) -> None:
        for name, value in attrs:
            if name in self.LINK_ATTRIBUTES and value:
                self.links.append(value)


def referenced_files(html_path: tp.Union[str, os.PathLike]) -> tp.List[Path]:
    """Local files an HTML page links to (src / href), resolved against its folder, in order, without duplicates.

    External links (with a scheme such as http: or data:) and in-page anchors are left out.
    """
    html_path = Path(html_path)
    collector = _LinkCollector()
    collector.feed(html_path.read_text(encoding='utf-8'))
    files: tp.List[Path] = []
    for link in collector.links:
        parsed = urllib.parse.urlsplit(link)
        if parsed.scheme or parsed.netloc or not parsed.path:
            continue
        path = html_path.parent / urllib.parse.unquote(parsed.path)
        if path not in files:
            files.append(path)
    return files
