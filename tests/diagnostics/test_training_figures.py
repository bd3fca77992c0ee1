"""sample_fade.png is readable at every epoch; legends never cover curves; the exported epoch is marked."""
import matplotlib.transforms
import numpy as np
import pytest

from audiocraft_lora import plots
from audiocraft_lora.diagnostics import FADE_FLAG_DB

# What the reviewer saw: one generate epoch (generate.every=2) with a tiny fade.
ONE_SAMPLE_EPOCH = [{'train': {'ce': 5.0}}, {'train': {'ce': 4.0}, 'generate': {'gen_fade_ratio_db': -0.0015}}]


def _labels(axes):
    return axes.get_legend_handles_labels()[1]


def _horizontal_lines(axes):
    return {line.get_label(): line.get_ydata()[0] for line in axes.get_lines()
            if len(set(line.get_ydata())) == 1 and line.get_xdata()[0] == 0 and line.get_xdata()[-1] == 1}


def test_sample_fade_has_a_fixed_range_with_zero_and_the_warning_line():
    axes = plots.sample_fade_figure(ONE_SAMPLE_EPOCH).axes[0]
    low, high = axes.get_ylim()
    assert low <= FADE_FLAG_DB - 5 and high >= 5 and high - low <= 25  # not -0.00154..-0.00140
    lines = _horizontal_lines(axes)
    assert lines == {'0 dB: no fade': 0.0, f'{FADE_FLAG_DB:g} dB: fade warning': FADE_FLAG_DB}
    assert set(lines) <= set(_labels(axes))
    assert axes.get_xlim() == (0.5, 2.5)  # every epoch of the history, not 1.9..2.1
    ticks = [t for t in axes.get_xticks() if 0.5 <= t <= 2.5]
    assert ticks == [1.0, 2.0]  # integer epochs only


def test_sample_fade_range_grows_with_the_data_and_the_warning():
    history = [{'generate': {'gen_fade_ratio_db': -42.0, 'gen_cont_fade_ratio_db': 8.0}}] * 3
    axes = plots.sample_fade_figure(history, warning_db=-20.0).axes[0]
    low, high = axes.get_ylim()
    assert low <= -42.0 and high >= 8.0
    assert _horizontal_lines(axes)['-20 dB: fade warning'] == -20.0
    assert {'unprompted samples', 'continuations'} <= set(_labels(axes))
    assert axes.get_xlim() == (0.5, 3.5)
    # equal values of the two series at the same epoch stay two points: side by side, each its own marker
    equal = [{'generate': {'gen_fade_ratio_db': -3.0, 'gen_cont_fade_ratio_db': -3.0}}] * 2
    series = {line.get_label(): line for line in plots.sample_fade_figure(equal).axes[0].get_lines()
              if line.get_label() in ('unprompted samples', 'continuations')}
    unprompted, continuations = series['unprompted samples'], series['continuations']
    assert list(unprompted.get_xdata()) == [0.96, 1.96] and list(continuations.get_xdata()) == [1.04, 2.04]
    assert unprompted.get_marker() != continuations.get_marker()


def test_sample_fade_is_written_before_any_sample(tmp_path):
    history = [{'train': {'ce': 5.0}, 'valid': {'ce': 4.8}}]  # epoch 1, generate.every=2
    figure = plots.sample_fade_figure(history)
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert any('no samples yet' in t for t in texts)
    assert figure.axes[0].get_ylim()[0] <= FADE_FLAG_DB
    # the call the training loop makes after every epoch (solver.write_curves) writes it instead of skipping it
    path = plots.plot_loss_curves(history, tmp_path / 'sample_fade.png', metric='gen_fade_ratio_db',
                                  stages=('generate',), title='fade')
    assert path.read_bytes()[:4] == b'\x89PNG'


def _overlaps(figure, legend_owner):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend = legend_owner.get_legend().get_window_extent(renderer)
    inside = legend_owner.get_window_extent(renderer)
    return matplotlib.transforms.Bbox.intersection(legend, inside) is not None, legend, figure.bbox


@pytest.mark.parametrize('make', [
    lambda: plots.loudness_figure({'base': ([0.25, 0.75], [-14.0, -15.0]), 'adapter:trap': ([0.25, 0.75],
                                   [-40.0, -90.0])}, '00_trap_beat, seed 0', threshold=-60),
    lambda: plots.loss_curves_figure([{'train': {'ce': 4.0}, 'valid': {'ce': 3.9}}] * 3, mark_epoch=2),
    lambda: plots.sample_fade_figure(ONE_SAMPLE_EPOCH)])
def test_legends_sit_outside_the_axes_and_inside_the_figure(make):
    figure = make()
    figure.tight_layout()
    overlaps, legend, page = _overlaps(figure, figure.axes[0])
    assert not overlaps
    assert page.x0 <= legend.x0 and legend.x1 <= page.x1 + 1


def test_loss_curves_mark_the_exported_epoch():
    history = [{'train': {'ce': 9.6}, 'valid': {'ce': 2.99}}, {'train': {'ce': 5.8}, 'valid': {'ce': 4.7}},
               {'train': {'ce': 4.5}, 'valid': {'ce': 3.8}}]
    axes = plots.loss_curves_figure(history, mark_epoch=1, mark_label='exported adapter: epoch 1').axes[0]
    (line,) = [line for line in axes.get_lines() if line.get_label() == 'exported adapter: epoch 1']
    assert np.all(np.asarray(line.get_xdata()) == 1)
    assert axes.get_xlim() == (0.5, 3.5)
