"""CLAP similarity and the Fréchet distance, on a tiny random transformers CLAP saved to disk."""
import numpy as np
import pytest
import torch

from audiocraft_lora.clap_metrics import ClapScorer, frechet_distance, read_reference_audio
from audiocraft_lora.errors import UserError
from helpers import ROOT, write_tiny_clap


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # scaling the spread by s: Tr(S) (1 + s^2 - 2 s) = Tr(S) (1 - s)^2
    cov_trace = np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 3 * (a - a.mean(0)) + a.mean(0)) == pytest.approx(4 * cov_trace, rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], a)


def test_clap_similarity_matches_the_model_forward_and_resamples(tmp_path):
    scorer = ClapScorer(write_tiny_clap(tmp_path / 'clap'))
    rng = np.random.default_rng(1)
    wavs = [(0.1 * rng.standard_normal(48000 * 2).astype(np.float32), 48000) for _ in range(2)]
    texts = ['trap beat 808', 'lofi piano']
    scores = scorer.similarity(texts, wavs)
    inputs = scorer.processor(text=texts, audio=[w for w, _ in wavs], sampling_rate=48000, return_tensors='pt',
                              padding=True)
    np.random.seed(0)  # rand_trunc does not crop 2 s clips; the seed only keeps this independent of it
    with torch.no_grad():
        out = scorer.model(**inputs)
    expected = torch.diagonal(out.logits_per_audio) / scorer.model.logit_scale_a.exp()
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    assert scores == scorer.similarity(texts, wavs)  # reproducible
    # 32 kHz stereo is mixed down and resampled to the processor's 48 kHz
    import julius
    stereo = torch.from_numpy(0.1 * rng.standard_normal((2, 32000)).astype(np.float32))
    direct = julius.resample_frac(stereo.mean(0), 32000, 48000).numpy()
    assert scorer.similarity(['x'], [(stereo.numpy(), 32000)]) == pytest.approx(
        scorer.similarity(['x'], [(direct, 48000)]), abs=1e-6)


def test_bad_clap_folder_and_reference(tmp_path):
    with pytest.raises(UserError, match='no config.json'):
        ClapScorer(tmp_path)
    with pytest.raises(UserError, match='no such folder or manifest'):
        read_reference_audio(tmp_path / 'nope')
    (tmp_path / 'one').mkdir()
    with pytest.raises(UserError, match='at least 2 reference clips'):
        read_reference_audio(tmp_path / 'one')
    clips = read_reference_audio(ROOT / 'egs' / 'example' / 'valid', max_seconds=1.0)
    assert len(clips) >= 2 and all(wav.shape[-1] == sr for wav, sr in clips)
