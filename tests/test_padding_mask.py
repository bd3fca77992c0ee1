"""Padding of clips shorter than the segment never enters the loss (the cause of "fades into silence")."""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import DEBUG_ARGS, build_solver

CLIP_SECONDS = 2.2
SEGMENT = 4


@pytest.fixture
def short_clip_dset(tmp_path):
    """A dataset whose clips fill ~half the segment: they get zero-padded by AudioCraft's dataset."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        path = tmp_path / f'short_{i}.wav'
        t = np.arange(int(CLIP_SECONDS * 32000)) / 32000
        sf.write(path, (0.3 * np.sin(2 * np.pi * 110 * (i + 1) * t) + 0.01 * rng.standard_normal(t.shape)), 32000)
        info = {k: None for k in ('title', 'artist', 'key', 'bpm', 'genre', 'name', 'instrument')}
        info.update(moods=[], keywords=[], description=f'short clip {i}')
        path.with_suffix('.json').write_text(json.dumps(info))
        lines.append(json.dumps({'path': str(path), 'duration': CLIP_SECONDS, 'sample_rate': 32000,
                                 'amplitude': None, 'weight': None, 'info_path': None}))
    (tmp_path / 'data.jsonl').write_text('\n'.join(lines) + '\n')
    return tmp_path


def _loss_token_count(solver):
    batch = next(iter(solver.dataloaders['valid']))
    audio, infos = batch
    assert audio.shape[-1] == SEGMENT * 32000 and all(i.n_frames < audio.shape[-1] for i in infos)
    solver.model.eval()
    with torch.no_grad():
        condition_tensors, tokens, padding_mask = solver._prepare_tokens_and_attributes(batch)
        out = solver.model.compute_predictions(tokens, [], condition_tensors)
    mask = padding_mask & out.mask
    return int(mask.sum()), out.mask, infos




@pytest.mark.parametrize('masked', [True, False])
def test_tokens_in_the_loss_are_exactly_the_real_audio_frames(dora_dir, short_clip_dset, masked):
    args = DEBUG_ARGS + [f'datasource.{s}={short_clip_dset}' for s in ('train', 'valid', 'evaluate', 'generate')]
    args += [f'dataset.segment_duration={SEGMENT}', 'dataset.valid.num_samples=2', 'dataset.batch_size=2',
             f'tokens.padding_with_special_token={str(masked).lower()}', 'validate_data=false']
    solver, _ = build_solver(args)
    count, pattern_mask, infos = _loss_token_count(solver)
    frame_rate = solver.compression_model.frame_rate
    real_frames = [math.floor(info.n_frames / info.sample_rate * frame_rate) for info in infos]
    # AudioCraft crops a random start inside the clip: between half the segment and the whole clip is real audio
    assert all(SEGMENT * 0.5 * frame_rate <= n <= CLIP_SECONDS * frame_rate for n in real_frames)
    # the delay pattern's own invalid positions are never in the loss, padding or not
    expected_masked = sum(int(pattern_mask[b, :, :n].sum()) for b, n in enumerate(real_frames))
    expected_full = int(pattern_mask.sum())
    assert expected_masked < expected_full
    assert count == (expected_masked if masked else expected_full)
