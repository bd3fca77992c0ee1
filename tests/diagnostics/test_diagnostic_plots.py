"""Figures are real PNGs with content, written atomically, and bad input is refused with a clear message."""
import numpy as np
import pytest
import torch

from audiocraft_lora import plots
from audiocraft_lora.diagnostics import audio_diagnostics
from audiocraft_lora.errors import UserError

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
MIN_PNG_BYTES = 10_000  # an empty 800x350 figure is ~5 KB; drawn content makes it larger


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > MIN_PNG_BYTES, (path, len(data))
    assert not [p for p in path.parent.iterdir() if p.name.endswith('.tmp')], 'temporary file left behind'


def test_loudness_curves(tmp_path, signals, sample_rate):
    curves = {}
    for name in ('steady', 'fading'):
        d = audio_diagnostics(signals[name], sample_rate)
        curves[name] = (d.window_times_s, d.loudness_curve)
    path = plots.plot_loudness_curves(curves, 'base vs adapter', tmp_path / 'sub' / 'loudness.png', threshold=-60)
    assert path == tmp_path / 'sub' / 'loudness.png'
    assert_png(path)
    with pytest.raises(UserError, match='2 times but 3 values'):
        plots.plot_loudness_curves({'x': ([0, 1], [0, 1, 2])}, 't', tmp_path / 'bad.png')
    assert not (tmp_path / 'bad.png').exists()


def test_spectrogram_numpy_and_torch(tmp_path, signals, sample_rate):
    assert_png(plots.plot_spectrogram(signals['white_noise'], sample_rate, tmp_path / 'noise.png', 'noise'))
    stereo = torch.from_numpy(np.stack([signals['fading']] * 2)).float()
    assert_png(plots.plot_spectrogram(stereo, sample_rate, tmp_path / 'fade.png', 'fade'))
    # Fixed colour scale: silence and noise must not render the same picture.
    silence = plots.plot_spectrogram(signals['silence'], sample_rate, tmp_path / 'silence.png', 'noise')
    assert silence.read_bytes() != (tmp_path / 'noise.png').read_bytes()


def test_bars_per_codebook(tmp_path):
    path = plots.plot_bars({'base': [3.1, 3.5, 3.9, 4.2], 'adapter:trap': [2.9, 3.4, 3.9, 4.3]}, 'valid CE',
                           'CE (nats)', tmp_path / 'ce.png')
    assert_png(path)
    assert_png(plots.plot_bars({'base': 3.1, 'adapter': 2.8}, 'mean CE', 'CE', tmp_path / 'mean.png'))
    with pytest.raises(UserError, match='same number of values'):
        plots.plot_bars({'base': [1, 2, 3, 4], 'adapter': [1, 2]}, 't', 'y', tmp_path / 'bad.png')


def test_loss_curves_skip_epochs_without_the_stage(tmp_path):
    history = [{'train': {'ce': 9.6}, 'valid': {'ce': 2.99}}, {'train': {'ce': 5.76}},
               {'train': {'ce': 4.53}, 'valid': {'ce': 3.80}, 'generate': {'gen_fade_ratio_db': -3.0}}]
    assert plots.loss_series(history, 'valid', 'ce') == ([1, 3], [2.99, 3.80])
    assert plots.loss_series(history, 'train', 'ce') == ([1, 2, 3], [9.6, 5.76, 4.53])
    assert_png(plots.plot_loss_curves(history, tmp_path / 'loss.png'))
    with pytest.raises(UserError, match=r"no 'perplexity'.*train\.ce"):
        plots.plot_loss_curves(history, tmp_path / 'ppl.png', metric='perplexity')
