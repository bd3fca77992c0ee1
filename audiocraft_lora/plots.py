"""PNG figures for the comparison report: loudness curves, spectrograms, per-codebook bars, loss curves.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas (`matplotlib.figure.Figure`), never
through `pyplot`: no global backend switch, no figure left open, safe in a training process or a headless box.
Each function writes its PNG atomically (temporary file in the same folder, fsync, replace) and returns the path.
Legends sit outside the axes (right), so they never hide a curve.
"""
import io
import math
import os
import typing as tp
from pathlib import Path

import librosa
import librosa.display
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint_io import write_bytes_atomic  # noqa: F401 (also used by report.py)
from .diagnostics import DB_FLOOR, FADE_FLAG_DB, AnyWav, as_channels_first
from .errors import UserError

DPI = 100
# Fixed colour range of spectrograms (dB re full scale) so that base and adapter figures are comparable:
# a quieter model looks darker instead of being re-normalised to its own maximum.
SPECTROGRAM_DB_RANGE = (-100.0, 0.0)
SPECTROGRAM_N_MELS = 128
SPECTROGRAM_N_FFT = 2048
SPECTROGRAM_HOP = 512

# sample_fade.png: the y range always holds 0 dB and the fade warning, with this margin (dB), and grows with the data.
FADE_PLOT_MARGIN_DB = 5.0
# Series of sample_fade.png: metric in the history's generate stage -> legend label.
FADE_SERIES = {'gen_fade_ratio_db': 'unprompted samples', 'gen_cont_fade_ratio_db': 'continuations'}

PathLike = tp.Union[str, os.PathLike]


def _new_figure(width: float = 8.0, height: float = 3.5) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _legend_outside(axes) -> None:
    """Legend to the right of the axes (tight_layout makes room for it), so it never covers a curve."""
    axes.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize='small')


def _save(figure: Figure, path: PathLike) -> Path:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format='png', dpi=DPI)
    return write_bytes_atomic(path, buffer.getvalue())


def plot_loudness_curves(curves: tp.Mapping[str, tp.Tuple[tp.Sequence[float], tp.Sequence[float]]], title: str,
                         path: PathLike, ylabel: str = 'short-term loudness (LUFS)',
                         threshold: tp.Optional[float] = None) -> Path:
    """Loudness over time of several models for one prompt (e.g. base vs adapters).

    Args:
        curves (dict): label -> (times [W] seconds, values [W] dB), e.g. from `AudioDiagnostics.window_times_s`
            and `.loudness_curve`.
        title (str): figure title.
        path (str or Path): PNG to write.
        ylabel (str): y axis label (say LUFS or dBFS, see `AudioDiagnostics.loudness_unit`).
        threshold (float, optional): a dashed horizontal line, e.g. the silence threshold.
    """
    if not curves:
        raise UserError(f'plot_loudness_curves({str(path)!r}): no curves given.')
    return _save(loudness_figure(curves, title, ylabel, threshold), path)


def loudness_figure(curves: tp.Mapping[str, tp.Tuple[tp.Sequence[float], tp.Sequence[float]]], title: str,
                    ylabel: str = 'short-term loudness (LUFS)', threshold: tp.Optional[float] = None) -> Figure:
    """The figure of `plot_loudness_curves` (not saved)."""
    figure = _new_figure()
    axes = figure.subplots()
    lowest = 0.0
    for label, (times, values) in curves.items():
        if len(times) != len(values):
            raise UserError(f'loudness curve {label!r}: {len(times)} times but {len(values)} values.')
        axes.plot(times, values, marker='.', label=label)
        if len(values):
            lowest = min(lowest, float(np.min(values)))
    if threshold is not None:
        axes.axhline(threshold, color='grey', linestyle='--', linewidth=1, label=f'{threshold:g} threshold')
    axes.set_ylim(max(lowest, DB_FLOOR) - 3, 3)
    axes.set_xlabel('time (s)')
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    _legend_outside(axes)
    return figure


def plot_spectrogram(wav: AnyWav, sample_rate: int, path: PathLike, title: str) -> Path:
    """Log-mel spectrogram (librosa) of one waveform, channels averaged, on a fixed dB scale.

    Args:
        wav (np.ndarray or torch.Tensor): [T] or [C, T], float, full scale 1.0.
        sample_rate (int): Hz.
        path (str or Path): PNG to write.
        title (str): figure title.
    """
    mono = as_channels_first(wav).mean(axis=0)
    n_fft = min(SPECTROGRAM_N_FFT, 2 ** int(math.floor(math.log2(mono.shape[0]))))
    hop = min(SPECTROGRAM_HOP, n_fft // 4)
    mel_power = librosa.feature.melspectrogram(y=mono, sr=sample_rate, n_fft=n_fft, hop_length=hop,
                                               n_mels=SPECTROGRAM_N_MELS, norm=None)
    # A full-scale sine peaks at |STFT| = n_fft / 4 (Hann); with unnormalised mel filters it then reads ~0 dB.
    mel_db = librosa.power_to_db(mel_power / (n_fft / 4) ** 2, ref=1.0, amin=10 ** (SPECTROGRAM_DB_RANGE[0] / 10),
                                 top_db=None)
    figure = _new_figure()
    axes = figure.subplots()
    image = librosa.display.specshow(mel_db, sr=sample_rate, hop_length=hop, x_axis='time', y_axis='mel', ax=axes,
                                     vmin=SPECTROGRAM_DB_RANGE[0], vmax=SPECTROGRAM_DB_RANGE[1], cmap='magma')
    figure.colorbar(image, ax=axes, format='%+.0f dB')
    axes.set_title(title)
    return _save(figure, path)


def plot_bars(values: tp.Mapping[str, tp.Union[float, tp.Sequence[float]]], title: str, ylabel: str,
              path: PathLike, group_label: str = 'codebook') -> Path:
    """Grouped bars, e.g. cross-entropy per codebook for each model.

    Args:
        values (dict): label -> one float, or a list [K] of floats (one bar per group, e.g. per codebook).
            Every list must have the same length.
        title (str): figure title.
        ylabel (str): y axis label.
        path (str or Path): PNG to write.
        group_label (str): name of the x groups ('codebook').
    """
    if not values:
        raise UserError(f'plot_bars({str(path)!r}): no values given.')
    rows = {label: np.atleast_1d(np.asarray(v, dtype=np.float64)) for label, v in values.items()}
    lengths = {label: row.shape[0] for label, row in rows.items()}
    if len(set(lengths.values())) != 1 or any(row.ndim != 1 for row in rows.values()):
        raise UserError(f'plot_bars({str(path)!r}): every label needs the same number of values, got {lengths}.')
    groups = next(iter(lengths.values()))
    figure = _new_figure(max(6.0, 1.2 * groups + 3), 3.5)
    axes = figure.subplots()
    width = 0.8 / len(rows)
    positions = np.arange(groups)
    for index, (label, row) in enumerate(rows.items()):
        bars = axes.bar(positions + (index - (len(rows) - 1) / 2) * width, row, width, label=label)
        axes.bar_label(bars, fmt='%.2f', fontsize='x-small')
    axes.set_xticks(positions)
    axes.set_xticklabels([str(i) for i in range(groups)] if groups > 1 else [''])
    if groups > 1:
        axes.set_xlabel(group_label)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize='small')
    axes.grid(axis='y', alpha=0.3)
    return _save(figure, path)


def loss_series(history: tp.Sequence[tp.Mapping[str, tp.Any]], stage: str,
                metric: str) -> tp.Tuple[tp.List[int], tp.List[float]]:
    """(epochs, values) of `history[i][stage][metric]`; epochs are 1-based, epochs lacking the stage are skipped."""
    epochs, values = [], []
    for index, entry in enumerate(history):
        stage_metrics = entry.get(stage) if isinstance(entry, tp.Mapping) else None
        if isinstance(stage_metrics, tp.Mapping) and metric in stage_metrics:
            epochs.append(index + 1)
            values.append(float(stage_metrics[metric]))
    return epochs, values


def plot_loss_curves(history: tp.Sequence[tp.Mapping[str, tp.Any]], path: PathLike, metric: str = 'ce',
                     stages: tp.Sequence[str] = ('train', 'valid'), title: tp.Optional[str] = None,
                     mark_epoch: tp.Optional[int] = None, mark_label: tp.Optional[str] = None) -> Path:
    """Train / valid curves per epoch from a flashy / dora history.

    A fade-ratio metric (name ending in 'fade_ratio_db', as the training loop asks for `sample_fade.png`) is drawn
    by `plot_sample_fade` instead: fixed dB range, 0 dB and warning lines, and a figure even before any sample.

    Args:
        history (list of dict): one dict per epoch, e.g. `{'train': {'ce': 3.1}, 'valid': {'ce': 3.3}}`
            (dora's `history.json` / `solver.history`). Epochs where a stage didn't run are skipped.
        path (str or Path): PNG to write.
        metric (str): metric key inside each stage.
        stages (list of str): stages to draw.
        title (str, optional): defaults to f'{metric} per epoch'.
        mark_epoch (int, optional): 1-based epoch marked with a vertical line (e.g. the exported adapter's).
        mark_label (str, optional): legend text of that line.
    Raises:
        UserError: no stage of the history holds `metric` (names the keys that exist).
    """
    if metric.endswith('fade_ratio_db') and len(stages) == 1:
        metrics = tuple(FADE_SERIES) if metric == 'gen_fade_ratio_db' else (metric,)
        return plot_sample_fade(history, path, metrics=metrics, stage=stages[0], title=title)
    return _save(loss_curves_figure(history, metric, stages, title, mark_epoch, mark_label), path)


def loss_curves_figure(history: tp.Sequence[tp.Mapping[str, tp.Any]], metric: str = 'ce',
                       stages: tp.Sequence[str] = ('train', 'valid'), title: tp.Optional[str] = None,
                       mark_epoch: tp.Optional[int] = None, mark_label: tp.Optional[str] = None) -> Figure:
    """The figure of `plot_loss_curves` (not saved; no fade-ratio special case)."""
    series = {stage: loss_series(history, stage, metric) for stage in stages}
    if not any(epochs for epochs, _ in series.values()):
        available = sorted({f'{stage}.{key}' for entry in history if isinstance(entry, tp.Mapping)
                            for stage, sub in entry.items() if isinstance(sub, tp.Mapping) for key in sub})
        raise UserError(f'history has no {metric!r} in stages {list(stages)} ({len(history)} epochs); '
                        f'available: {available[:20]}.')
    figure = _new_figure(7.0, 3.5)
    axes = figure.subplots()
    for stage, (epochs, values) in series.items():
        if epochs:
            axes.plot(epochs, values, marker='o', label=stage)
    if mark_epoch is not None:
        axes.axvline(mark_epoch, color='tab:green', linestyle=':', linewidth=1.5,
                     label=mark_label or f'epoch {mark_epoch}')
    axes.set_xlabel('epoch')
    axes.set_ylabel(metric)
    axes.set_title(title or f'{metric} per epoch')
    _epoch_axis(axes, len(history))
    axes.grid(alpha=0.3)
    _legend_outside(axes)
    return figure


def _epoch_axis(axes, num_epochs: int) -> None:
    """x from 0.5 to num_epochs + 0.5 (at least 1 epoch), integer ticks only."""
    axes.set_xlim(0.5, max(1, num_epochs) + 0.5)
    axes.xaxis.get_major_locator().set_params(integer=True)


def sample_fade_figure(history: tp.Sequence[tp.Mapping[str, tp.Any]], metrics: tp.Sequence[str] = tuple(FADE_SERIES),
                       stage: str = 'generate', warning_db: float = FADE_FLAG_DB,
                       title: tp.Optional[str] = None) -> Figure:
    """The figure of `plot_sample_fade` (not saved), for tests and notebooks."""
    figure = _new_figure(7.0, 3.5)
    axes = figure.subplots()
    drawn = []
    markers = ('o', 's', '^', 'D')
    for index, metric in enumerate(metrics):
        epochs, values = loss_series(history, stage, metric)
        if epochs:
            # (series side by side, 0.08 epoch apart, and their own markers: equal values stay visible as two)
            dodge = 0.08 * (index - (len(metrics) - 1) / 2)
            axes.plot([epoch + dodge for epoch in epochs], values, marker=markers[index % len(markers)],
                      label=FADE_SERIES.get(metric, metric))
            drawn.extend(values)
    finite = [v for v in drawn if math.isfinite(v)]
    low = min([0.0, warning_db] + finite) - FADE_PLOT_MARGIN_DB
    high = max([0.0, warning_db] + finite) + FADE_PLOT_MARGIN_DB
    axes.set_ylim(low, high)
    axes.axhline(0.0, color='grey', linewidth=1, label='0 dB: no fade')
    axes.axhline(warning_db, color='tab:red', linestyle='--', linewidth=1, label=f'{warning_db:g} dB: fade warning')
    if not drawn:
        axes.text(0.5, 0.5, f'no samples yet ({len(history)} epoch{"s" if len(history) != 1 else ""})',
                  transform=axes.transAxes, ha='center', va='center', color='grey')
    axes.set_xlabel('epoch')
    axes.set_ylabel('fade ratio (dB, last third vs first)')
    axes.set_title(title or 'generated samples: fade ratio per epoch')
    _epoch_axis(axes, len(history))
    axes.grid(alpha=0.3)
    _legend_outside(axes)
    return figure


def plot_sample_fade(history: tp.Sequence[tp.Mapping[str, tp.Any]], path: PathLike,
                     metrics: tp.Sequence[str] = tuple(FADE_SERIES), stage: str = 'generate',
                     warning_db: float = FADE_FLAG_DB, title: tp.Optional[str] = None) -> Path:
    """Fade ratio of the generated samples per epoch (`sample_fade.png`), readable at any stage of training.

    The y range always holds 0 dB (no fade) and `warning_db` (both drawn as labelled lines) with a 5 dB margin,
    and grows to hold every value; x covers every epoch of the history with integer ticks. Before the first
    generate stage (e.g. epoch 1 with generate.every=2) the figure says "no samples yet" instead of failing.

    Args:
        history (list of dict): flashy / dora history, one dict per epoch.
        path (str or Path): PNG to write.
        metrics (list of str): metrics of `stage` to draw (default: unprompted samples and continuations).
        stage (str): history stage holding them.
        warning_db (float): the fade warning threshold (`diagnostics.fade_warning_db` of the run).
        title (str, optional): figure title.
    """
    return _save(sample_fade_figure(history, metrics, stage, warning_db, title), path)
