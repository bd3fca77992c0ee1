"""Synthetic signals with known diagnostics (16 kHz, 4 s, mono float64)."""
import typing as tp

import numpy as np
import pytest

SAMPLE_RATE = 16000
DURATION_S = 4.0


def make_signals(sample_rate: int = SAMPLE_RATE, duration_s: float = DURATION_S) -> tp.Dict[str, np.ndarray]:
    """name -> [T] signal. 'tone' is a 997 Hz sine at -6 dBFS peak (-9.03 dBFS RMS)."""
    times = np.arange(int(sample_rate * duration_s)) / sample_rate
    tone = 0.5 * np.sin(2 * np.pi * 997 * times)
    return {
        'steady': tone,
        'fading': tone * np.linspace(1.0, 0.0, times.shape[0]),  # linear fade to zero
        'stops_half_way': np.where(times < duration_s / 2, tone, 0.0),
        'white_noise': np.random.default_rng(0).normal(0.0, 0.1, times.shape[0]),
        'clipped_square': np.clip(1.5 * np.sign(np.sin(2 * np.pi * 110 * times)), -1.0, 1.0),
        'silence': np.zeros_like(times),
    }


@pytest.fixture(scope='session')
def signals() -> tp.Dict[str, np.ndarray]:
    return make_signals()


@pytest.fixture(scope='session')
def sample_rate() -> int:
    return SAMPLE_RATE
