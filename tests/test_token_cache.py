"""AudioCraft's token cache with the LoRA solver: one XP writes the EnCodec tokens, another trains from them."""
import json

import pytest
import torch

from audiocraft_lora.token_cache import TokenCacheError
from helpers import DEBUG_ARGS, build_solver

UPDATES = 3
CACHE_ARGS = DEBUG_ARGS + ['optim.epochs=1', f'optim.updates_per_epoch={UPDATES}', 'dataset.valid.num_samples=2']


def _spy(monkeypatch, solver) -> dict:
    """Count the compression model's encode calls (real method) and record the tokens each training step uses."""
    seen: dict = {'encode': 0, 'tokens': []}
    real_encode = solver.compression_model.encode
    real_prepare = solver._prepare_tokens_and_attributes

    def encode(*args, **kwargs):
        seen['encode'] += 1
        return real_encode(*args, **kwargs)

    def prepare(*args, **kwargs):
        condition_tensors, tokens, padding_mask = real_prepare(*args, **kwargs)
        seen['tokens'].append(tokens.detach().clone())
        return condition_tensors, tokens, padding_mask

    monkeypatch.setattr(solver.compression_model, 'encode', encode)
    monkeypatch.setattr(solver, '_prepare_tokens_and_attributes', prepare)
    return seen


def _train_epoch(solver, xp) -> dict:
    with xp.enter():
        return solver.run_stage('train', solver.train)


@pytest.fixture(scope='module')
def written_cache(tmp_path_factory):
    """A cache written by one XP's training epoch: (cache folder, writer XP, what the writer's spy saw)."""
    from audiocraft_lora import train
    root = tmp_path_factory.mktemp('token_cache')
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv('AUDIOCRAFT_LORA_DORA_DIR', str(root / 'outputs'))
        monkeypatch.setattr(train.main.dora, 'dir', root / 'outputs')
        cache = root / 'cache'
        writer, wxp = build_solver(CACHE_ARGS + [f'cache.path={cache}', 'cache.write=true'])
        seen = _spy(monkeypatch, writer)
        _train_epoch(writer, wxp)
    return cache, wxp, seen


def test_second_xp_trains_from_the_cached_tokens_without_running_the_encoder(written_cache, dora_dir, monkeypatch):
    cache, wxp, written = written_cache
    assert written['encode'] == UPDATES  # the writer encodes every training batch...
    assert sorted(p.name for p in (cache / '00001').iterdir()) == [f'{i:06d}.zip' for i in range(UPDATES)]
    record = json.loads((cache / 'lora_cache.json').read_text())  # ...and records what the cache was made from
    assert record['base_model'] == 'debug' and record['segment_duration'] == 4 and record['batch_size'] == 4

    # another XP (other LoRA settings) on the same data and base reads them
    reader, rxp = build_solver(CACHE_ARGS + [f'cache.path={cache}', 'lora.rank=4', 'lora.alpha=8'])
    assert rxp.sig != wxp.sig
    read = _spy(monkeypatch, reader)
    metrics = _train_epoch(reader, rxp)
    assert read['encode'] == 0, "the compression model's encoder ran although the tokens were cached"
    assert len(read['tokens']) == UPDATES
    for step, (got, expected) in enumerate(zip(read['tokens'], written['tokens'])):
        assert torch.equal(got, expected), f"step {step}: the reader did not train on the tokens the writer saved"
    assert torch.isfinite(torch.tensor(metrics['ce']))

    # valid still reads audio (and so encodes it)
    with rxp.enter():
        reader.run_stage('valid', reader.valid)
    assert read['encode'] > 0


def test_writer_keeps_choosing_its_best_adapter_on_valid_ce(dora_dir, tmp_path):
    # AudioCraft turns best-state selection off whenever cache.write is set (`if write_num_shards:` is true for 1)
    writer, _ = build_solver(CACHE_ARGS + [f'cache.path={tmp_path / "c"}', 'cache.write=true'])
    assert writer.best_metric_name == 'ce'


@pytest.mark.parametrize('override, match', [
    ('dataset.segment_duration=3', 'segment_duration'),
    ('optim.updates_per_epoch=5', 'has 3 batches for epoch 1'),
    ('optim.epochs=2', 'has 0 batches for epoch 2'),
    ('dataset.batch_size=8', 'batches of 4 items'),
])
def test_a_cache_that_does_not_fit_is_refused_with_the_key_to_change(written_cache, dora_dir, override, match):
    cache = written_cache[0]
    with pytest.raises(TokenCacheError, match=match):
        build_solver(CACHE_ARGS + [f'cache.path={cache}', override])


def test_reading_a_missing_cache_says_how_to_write_it(dora_dir, tmp_path):
    with pytest.raises(TokenCacheError, match='cache.write=true'):
        build_solver(CACHE_ARGS + [f'cache.path={tmp_path / "nowhere"}'])
