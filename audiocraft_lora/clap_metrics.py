"""CLAP text-audio similarity and a Fréchet distance on CLAP audio embeddings, from a *local* CLAP model.

The model is a Hugging Face transformers CLAP folder (`ClapModel` + `ClapProcessor`, e.g. a saved copy of
`laion/larger_clap_music`); it is never downloaded. Audio is mixed to mono and resampled (julius) to the processor's
rate; the processor's own truncation applies (10 s windows for released CLAPs; numpy is seeded per call so its random
crops are reproducible).

- `similarity`: cosine between the prompt's text embedding and the sample's audio embedding, in [-1, 1].
- `frechet_distance`: FAD's formula, ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), between the CLAP audio
  embeddings of a model's samples and of reference clips. With fewer samples than embedding dimensions the
  covariances are rank-deficient and the value is biased upwards: compare models with each other on the same
  prompts and reference, not with published FAD numbers (which use VGGish on thousands of clips).
"""
from pathlib import Path
import typing as tp
import warnings

import numpy as np
import torch

from .errors import UserError

AUDIO_EXTENSIONS = ('.wav', '.flac', '.mp3', '.ogg', '.m4a', '.aiff', '.aif')


def _pooled(output: tp.Any) -> torch.Tensor:
    """transformers >= 5 returns a ModelOutput whose pooler_output is the projection; older versions a tensor."""
    tensor = output.pooler_output if hasattr(output, 'pooler_output') else output
    return torch.nn.functional.normalize(tensor.float(), dim=-1)


class ClapScorer:
    """A local CLAP model that embeds texts and waveforms."""

    def __init__(self, folder: tp.Union[str, Path], device: str = 'cpu'):
        from transformers import ClapModel, ClapProcessor
        folder = Path(folder)
        if not (folder / 'config.json').exists():
            raise UserError(f"--clap-model {folder}: no config.json; give a folder saved with transformers' "
                            "ClapModel.save_pretrained + ClapProcessor.save_pretrained (e.g. laion/larger_clap_music).")
        try:
            self.model = ClapModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
            self.processor = ClapProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"--clap-model {folder}: can't load a CLAP model and processor from it ({exc}).") from exc
        self.device = device
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self.name = str(folder)

    @torch.no_grad()
    def embed_texts(self, texts: tp.Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(texts), return_tensors='pt', padding=True)
        return _pooled(self.model.get_text_features(**{k: v.to(self.device) for k, v in inputs.items()})).cpu()

    @torch.no_grad()
    def embed_audio(self, wavs: tp.Sequence[tp.Tuple[np.ndarray, int]]) -> torch.Tensor:
        """[N, D] unit-norm embeddings of waveforms given as ([C, T] or [T] float array, sample rate)."""
        import julius
        mono = []
        for wav, sample_rate in wavs:
            audio = torch.as_tensor(np.asarray(wav, dtype=np.float32))
            audio = audio.mean(dim=0) if audio.dim() == 2 else audio
            if sample_rate != self.sample_rate:
                audio = julius.resample_frac(audio, int(sample_rate), self.sample_rate)
            mono.append(audio.numpy())
        embeddings = []
        for index, audio in enumerate(mono):
            np.random.seed(index)  # the processor's random crops ('rand_trunc' / 'fusion') use numpy's global RNG
            inputs = self.processor(audio=[audio], sampling_rate=self.sample_rate, return_tensors='pt')
            out = self.model.get_audio_features(**{k: v.to(self.device) for k, v in inputs.items()})
            embeddings.append(_pooled(out).cpu())
        return torch.cat(embeddings)

    def similarity(self, texts: tp.Sequence[str], wavs: tp.Sequence[tp.Tuple[np.ndarray, int]]) -> tp.List[float]:
        """Cosine similarity of each (text, waveform) pair."""
        if len(texts) != len(wavs):
            raise ValueError(f"{len(texts)} texts for {len(wavs)} waveforms")
        return (self.embed_texts(texts) * self.embed_audio(wavs)).sum(-1).tolist()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of `a` [N, D] and `b` [M, D] (N, M >= 2)."""
    from scipy import linalg
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError('frechet_distance needs at least 2 embeddings on each side')
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # rank-deficient with few samples: expected, see the module docstring
        warnings.simplefilter('ignore', linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
        if not np.isfinite(covmean).all():
            offset = np.eye(cov_a.shape[0]) * 1e-6
            covmean, _ = linalg.sqrtm((cov_a + offset) @ (cov_b + offset), disp=False)
    covmean = np.real(covmean)
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def read_reference_audio(source: tp.Union[str, Path], max_seconds: float = 10.0,
                         max_files: int = 500) -> tp.List[tp.Tuple[np.ndarray, int]]:
    """Reference clips for FAD: a folder of audio files, or a manifest folder/file (data.jsonl[.gz]).

    Each clip is read from its start, at most `max_seconds` (CLAP's window).
    """
    from audiocraft.data.audio import audio_read
    source = Path(source).expanduser()
    paths: tp.List[Path] = []
    manifests = [source] if source.is_file() else [source / n for n in ('data.jsonl', 'data.jsonl.gz')]
    manifests = [m for m in manifests if m.exists()]
    if manifests:
        from audiocraft.data.audio_dataset import load_audio_meta
        paths = [Path(meta.path) for meta in load_audio_meta(str(manifests[0]))]
    elif source.is_dir():
        paths = sorted(p for p in source.rglob('*') if p.suffix.lower() in AUDIO_EXTENSIONS)
    else:
        raise UserError(f"--fad-reference {source}: no such folder or manifest.")
    if len(paths) < 2:
        raise UserError(f"--fad-reference {source}: FAD needs at least 2 reference clips, found {len(paths)}.")
    clips = []
    for path in paths[:max_files]:
        try:
            wav, sample_rate = audio_read(str(path), seek_time=0.0, duration=max_seconds)
        except Exception as exc:  # decoders raise many types
            raise UserError(f"--fad-reference: can't read {path} ({type(exc).__name__}: {exc}).") from exc
        clips.append((wav.numpy(), int(sample_rate)))
    return clips
