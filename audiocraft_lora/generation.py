"""Reproducible sampling from a stock `MusicGen`: one file per (prompt, seed), with its tokens' hash and diagnostics.

Every sample is generated on its own, right after `torch.manual_seed(seed)`: the audio for (prompt, seed) does not
depend on which other prompts were in the run, so base and adapters compared with the same prompts and seeds are
sampled from the same random stream, and rerunning reproduces the same tokens (on CPU exactly; CUDA kernels may
differ slightly between GPUs and library versions).
"""
from dataclasses import asdict, dataclass
import hashlib
import io
from pathlib import Path
import typing as tp

import numpy as np
import soundfile
import torch

from . import diagnostics as diag_lib
from .checkpoint_io import write_bytes_atomic
from .errors import UserError
from .prompts import Prompt


@dataclass(frozen=True)
class SamplingSettings:
    """MusicGen.set_generation_params arguments (AudioCraft's defaults), except the duration (per prompt)."""
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0
    two_step_cfg: bool = False
    extend_stride: float = 18.0

    def check(self) -> 'SamplingSettings':
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}.")
        if not 0.0 <= self.top_p <= 1.0:
            raise UserError(f"--top-p must be in [0, 1], got {self.top_p}.")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}.")
        if not self.cfg_coef >= 0:
            raise UserError(f"--guidance must be >= 0, got {self.cfg_coef}.")
        return self

    def to_dict(self) -> tp.Dict[str, tp.Any]:
        return asdict(self)


class Sample(tp.NamedTuple):
    wav: torch.Tensor     # [C, T] float32, cpu
    tokens: torch.Tensor  # [K, S] int64, cpu


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()


def generate_sample(model, prompt: Prompt, seed: int, sampling: SamplingSettings) -> Sample:
    """Sample one prompt with one seed (see the module docstring for the reproducibility contract)."""
    if prompt.duration > model.max_duration and sampling.extend_stride >= model.max_duration:
        raise UserError(f"extend_stride {sampling.extend_stride} must be < the model's max duration "
                        f"{model.max_duration} s to generate {prompt.duration} s.")
    top_k = min(sampling.top_k, model.lm.card)  # (all tokens either way: AudioCraft's torch.topk refuses k > card)
    model.set_generation_params(use_sampling=True, top_k=top_k, top_p=sampling.top_p,
                                temperature=sampling.temperature, duration=prompt.duration,
                                cfg_coef=sampling.cfg_coef, two_step_cfg=sampling.two_step_cfg,
                                extend_stride=sampling.extend_stride)
    torch.manual_seed(seed)  # seeds CPU and every CUDA device
    with torch.no_grad():
        wav, tokens = model.generate([prompt.text], progress=False, return_tokens=True)
    return Sample(wav[0].detach().float().cpu(), tokens[0].detach().cpu())


def write_wav(path: Path, wav: torch.Tensor, sample_rate: int) -> Path:
    """16-bit PCM wav, written atomically; the float audio is clipped to [-1, 1] (clipping shows in diagnostics)."""
    data = np.clip(wav.numpy().T, -1.0, 1.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, data, sample_rate, format='WAV', subtype='PCM_16')
    return write_bytes_atomic(path, buffer.getvalue())


def sample_file_name(prompt: Prompt, seed: int) -> str:
    return f'{prompt.name}_seed{seed}.wav'


def generate_to_folder(model, prompts: tp.Sequence[Prompt], seeds: tp.Sequence[int], sampling: SamplingSettings,
                       out_dir: tp.Union[str, Path], progress: bool = True,
                       label: tp.Optional[str] = None) -> tp.List[tp.Dict[str, tp.Any]]:
    """Generate every (prompt, seed) into `out_dir` and return one record per file.

    Record: {'prompt', 'name', 'seed', 'duration_s', 'file' (name in out_dir), 'tokens_sha256', 'num_frames',
             'diagnostics' (AudioDiagnostics.to_dict()), 'flags'}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(prompt, int(seed)) for prompt in prompts for seed in seeds]
    records = []
    iterator = jobs
    if progress:
        from tqdm import tqdm
        iterator = tqdm(jobs, desc=f'generating ({label or model.name})', unit='sample')
    for prompt, seed in iterator:
        sample = generate_sample(model, prompt, seed, sampling)
        path = write_wav(out_dir / sample_file_name(prompt, seed), sample.wav, model.sample_rate)
        diag = diag_lib.audio_diagnostics(sample.wav, model.sample_rate)
        records.append({
            'prompt': prompt.text, 'name': prompt.name, 'seed': seed, 'duration_s': prompt.duration,
            'file': path.name, 'tokens_sha256': tokens_sha256(sample.tokens),
            'num_frames': int(sample.tokens.shape[-1]),
            'diagnostics': diag.to_dict(), 'flags': diag_lib.flags(diag),
        })
    return records
