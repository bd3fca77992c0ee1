"""Melody bases: AudioCraft's chroma conditioner needs demucs and its htdemucs weights.

With both (a tiny random htdemucs in an isolated torch hub cache), a melody HF folder trains like any base; without
either, training and generation stop at once with what to install or download.
"""
import copy
import importlib.util
import urllib.error

import pytest
import torch

from audiocraft_lora.errors import BaseModelError
from helpers import DEBUG_ARGS, build_solver, write_tiny_htdemucs

MELODY_ARGS = DEBUG_ARGS + ['dataset.batch_size=2', 'dataset.segment_duration=2', 'optim.updates_per_epoch=2',
                            'schedule.cosine.warmup=1']


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    return tmp_path / 'torch'


def test_lora_trains_on_a_melody_base_with_the_chroma_condition(dora_dir, hf_melody_dir, torch_home):
    write_tiny_htdemucs(torch_home)
    # a budget: the start-up memory estimate runs too, through the chroma conditioner (a null melody, as CFG drops it)
    solver, _ = build_solver(MELODY_ARGS + [f'base_model={hf_melody_dir}', 'lora.memory_budget_gib=8'])
    assert solver.memory_estimate['plan'] == 'none' and solver.memory_estimate['peak_gib'] > 0
    assert solver.cfg.conditioners.self_wav.model == 'chroma_stem'
    assert not any('cross_attention' in t for t in solver.lora_targets)  # melody has none: skipped
    solver.model.cfg_dropout.p = 0.0
    solver.model.att_dropout.p = {}
    before = copy.deepcopy(solver.model.state_dict())
    loader = iter(solver.dataloaders['train'])
    batch = next(loader)
    condition_tensors, _, _ = solver._prepare_tokens_and_attributes(batch)
    assert 'self_wav' in condition_tensors  # demucs stems -> chroma -> a prepended condition
    solver._current_stage = 'train'
    solver.model.train()
    for idx in range(2):
        metrics = solver.run_step(idx, batch if idx == 0 else next(loader), {})
        assert torch.isfinite(metrics['ce'])
    solver._current_stage = None
    changed = {k for k, v in solver.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all('lora_' in k for k in changed)


def test_melody_base_without_demucs_says_what_to_install(dora_dir, hf_melody_dir, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'demucs' else find_spec(name, *a))
    with pytest.raises(BaseModelError, match='melody base.*demucs.*not installed'):
        build_solver(MELODY_ARGS + [f'base_model={hf_melody_dir}'])
    assert not list(dora_dir.rglob('checkpoint*.th'))
    from audiocraft_lora import load_musicgen
    with pytest.raises(BaseModelError, match='demucs'):
        load_musicgen(str(hf_melody_dir), device='cpu')


def test_melody_base_offline_without_htdemucs_weights_says_where_to_put_them(dora_dir, hf_melody_dir, torch_home,
                                                                            monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('offline')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(BaseModelError, match=r'htdemucs weights \(955717e8-8726e21a.th\).*torch hub cache'):
        build_solver(MELODY_ARGS + [f'base_model={hf_melody_dir}'])


def test_a_melody_base_generates_with_chroma_through_the_api(hf_melody_dir, torch_home):
    from audiocraft_lora import load_musicgen
    write_tiny_htdemucs(torch_home)
    model = load_musicgen(str(hf_melody_dir), device='cpu')
    model.set_generation_params(duration=1.0, top_k=10)  # the tiny model has a small codebook
    melody = torch.sin(torch.arange(32000) * 2 * torch.pi * 220 / 32000)[None, None]
    torch.manual_seed(0)
    with_melody = model.generate_with_chroma(['lofi'], melody, 32000)
    assert with_melody.shape == (1, model.audio_channels, int(model.sample_rate))
    # the chroma of the melody is the prepended condition (that the LM uses it: test_melody_lm_matches)
    attributes, _ = model._prepare_tokens_and_attributes(['lofi'], None, melody_wavs=[melody[0]])
    with torch.no_grad():
        embedding, mask = model.lm.condition_provider(model.lm.condition_provider.tokenize(attributes))['self_wav']
    assert embedding.shape[0] == 1 and embedding.shape[-1] == model.lm.dim and torch.isfinite(embedding).all()
    assert mask.bool().all()
