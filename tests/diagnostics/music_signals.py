"""Synthetic music-like loops and broadband noises (numpy only) to validate the noise and loudness flags.

Loops are trap-like: kick (pitch-swept sine), snare (high-passed noise burst + 190 Hz body), hi-hats (noise above
7 kHz, 8th to 32nd notes), a distorted 808 sub bass and a plucked melody, at 32 kHz like MusicGen's output.
"""
import typing as tp

import numpy as np

SAMPLE_RATE = 32000
DURATION_S = 15.0


def _decay(length: int, tau_s: float) -> np.ndarray:
    return np.exp(-np.arange(length) / (tau_s * SAMPLE_RATE))


def _highpass(x: np.ndarray, cutoff_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(x)
    spectrum[np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE) < cutoff_hz] = 0
    return np.fft.irfft(spectrum, x.size)


def coloured_noise(exponent: float, seed: int = 0, duration_s: float = DURATION_S) -> np.ndarray:
    """Noise with power spectrum ~ 1/f^exponent (0 white, 1 pink, 2 brown), RMS 0.1."""
    length = int(duration_s * SAMPLE_RATE)
    spectrum = np.fft.rfft(np.random.default_rng(seed).normal(size=length))
    frequencies = np.fft.rfftfreq(length)
    frequencies[0] = frequencies[1]
    noise = np.fft.irfft(spectrum / frequencies ** (exponent / 2), length)
    return at_rms(noise, -20.0)


def at_rms(x: np.ndarray, rms_dbfs: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x ** 2)) * 10 ** (rms_dbfs / 20)


def rms_dbfs(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x ** 2)))


def with_noise(loop: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`loop` plus `noise` scaled to `snr_db` below the loop's RMS."""
    return loop + at_rms(noise, rms_dbfs(loop) - snr_db)


def trap_loop(bpm: float = 140, kick: bool = True, snare: bool = True, hats_per_bar: int = 16, bass: bool = True,
              melody: bool = True, seed: int = 0, duration_s: float = DURATION_S) -> np.ndarray:
    """A loop peaking at 0.8 (16 steps per bar; kick on steps 0, 7, 10, snare on 4 and 12)."""
    rng = np.random.default_rng(seed)
    length = int(duration_s * SAMPLE_RATE)
    out = np.zeros(length)

    def add(sound: np.ndarray, at_s: float) -> None:
        start = int(at_s * SAMPLE_RATE)
        if start < length:
            stop = min(length, start + sound.size)
            out[start:stop] += sound[:stop - start]

    kick_len, snare_len, hat_len = int(0.4 * SAMPLE_RATE), int(0.25 * SAMPLE_RATE), int(0.06 * SAMPLE_RATE)
    kick_times = np.arange(kick_len) / SAMPLE_RATE
    kick_sound = np.sin(2 * np.pi * np.cumsum(50 + 100 * np.exp(-kick_times / 0.03)) / SAMPLE_RATE)
    kick_sound *= _decay(kick_len, 0.12)
    snare_sound = (0.6 * _highpass(rng.normal(size=snare_len), 1500) * _decay(snare_len, 0.06)
                   + 0.4 * np.sin(2 * np.pi * 190 * np.arange(snare_len) / SAMPLE_RATE) * _decay(snare_len, 0.05))
    hat_sound = _highpass(rng.normal(size=hat_len), 7000) * _decay(hat_len, 0.012)
    step_s = 60 / bpm / 4
    bass_notes, melody_notes = [36, 36, 39, 34], [60, 63, 67, 70, 67, 63]
    for index in range(int(duration_s / step_s) + 1):
        at, step = index * step_s, index % 16
        if kick and step in (0, 7, 10):
            add(0.9 * kick_sound, at)
        if snare and step in (4, 12):
            add(0.7 * snare_sound, at)
        if hats_per_bar and step % max(1, 16 // hats_per_bar) == 0:
            add(0.25 * hat_sound, at)
            if hats_per_bar > 16:
                add(0.2 * hat_sound, at + step_s / 2)
        if bass and step == 0:
            bass_len = int(16 * step_s * SAMPLE_RATE)
            frequency = 440 * 2 ** ((bass_notes[(index // 16) % 4] - 69) / 12)
            tone = np.tanh(1.5 * np.sin(2 * np.pi * frequency * np.arange(bass_len) / SAMPLE_RATE))
            add(0.6 * tone * _decay(bass_len, 1.2), at)
        if melody and step % 4 == 2:
            note_len = int(0.5 * SAMPLE_RATE)
            frequency = 440 * 2 ** ((melody_notes[(index // 4) % 6] - 69) / 12)
            times = np.arange(note_len) / SAMPLE_RATE
            tone = sum(np.sin(2 * np.pi * frequency * h * times) / h ** 1.5 for h in range(1, 6))
            add(0.15 * tone * _decay(note_len, 0.25), at)
    return out / np.max(np.abs(out)) * 0.8


def music_like() -> tp.Dict[str, np.ndarray]:
    """Loops that must raise no flag."""
    full = trap_loop()
    return {
        'trap_full': full,
        'drums_only': trap_loop(bass=False, melody=False),
        'kick_snare_8th_hats': trap_loop(bass=False, melody=False, hats_per_bar=8),
        'drums_32nd_hat_rolls': trap_loop(bass=False, melody=False, hats_per_bar=32),
        '808_and_hat_rolls': trap_loop(hats_per_bar=32, melody=False),
        'hats_only': trap_loop(kick=False, snare=False, bass=False, melody=False),
        'slow_90bpm': trap_loop(bpm=90, seed=3),
        'lofi_crackle_-40dB': with_noise(full, coloured_noise(1.0, seed=5), 40.0),
    }


def noise_like() -> tp.Dict[str, np.ndarray]:
    """Broadband noises and noisy loops that must raise 'noise_like'."""
    full, drums = trap_loop(), trap_loop(bass=False, melody=False)
    return {
        'white_noise': coloured_noise(0.0, seed=1),
        'pink_noise': coloured_noise(1.0, seed=2),
        'brown_noise': coloured_noise(2.0, seed=3),
        'loop_plus_white_-6dB': with_noise(full, coloured_noise(0.0, seed=4), 6.0),
        'loop_plus_pink_-12dB': with_noise(full, coloured_noise(1.0, seed=6), 12.0),
        'drums_plus_pink_-12dB': with_noise(drums, coloured_noise(1.0, seed=7), 12.0),
    }
