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
    assert len(record['compression_fingerprint']) == 64  # the tokens' source: the compression model's weights

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


def _base_dir(folder, seed: int, same_compression_as=None):
    """An AudioCraft-format base: the debug one of `seed`, or (same_compression_as) that folder's compression model
    with the LM's weights changed."""
    import shutil
    from audiocraft_lora.debug_base import write_debug_base
    if same_compression_as is None:
        return write_debug_base(folder, seed)
    folder.mkdir(parents=True)
    shutil.copy(same_compression_as / 'compression_state_dict.bin', folder / 'compression_state_dict.bin')
    pkg = torch.load(same_compression_as / 'state_dict.bin', weights_only=False)
    pkg['best_state'] = {k: v + 0.01 if v.is_floating_point() else v for k, v in pkg['best_state'].items()}
    torch.save(pkg, folder / 'state_dict.bin')
    return folder


def test_another_base_with_the_same_compression_model_reads_the_cache(written_cache, dora_dir, monkeypatch, tmp_path,
                                                                      debug_base_dir):
    """The tokens come from EnCodec, not the LM: musicgen-small/medium/large share a cache."""
    cache, _, written = written_cache
    other = _base_dir(tmp_path / 'other-lm', 0, same_compression_as=debug_base_dir)
    reader, rxp = build_solver(CACHE_ARGS + [f'cache.path={cache}', f'base_model={other}'])
    read = _spy(monkeypatch, reader)
    _train_epoch(reader, rxp)
    assert read['encode'] == 0 and len(read['tokens']) == UPDATES
    assert all(torch.equal(got, expected) for got, expected in zip(read['tokens'], written['tokens']))


def test_a_base_with_another_compression_model_is_refused(written_cache, dora_dir, tmp_path):
    cache = written_cache[0]
    other = _base_dir(tmp_path / 'other-codec', seed=1)
    with pytest.raises(TokenCacheError, match='tokens of another compression model'):
        build_solver(CACHE_ARGS + [f'cache.path={cache}', f'base_model={other}'])


def test_a_cache_without_the_fingerprint_is_matched_on_the_base_name(written_cache, dora_dir, tmp_path,
                                                                     debug_base_dir):
    """Caches written before the fingerprint was recorded: only the base they name is sure to fit."""
    import shutil
    cache = tmp_path / 'old-cache'
    shutil.copytree(written_cache[0], cache)
    record = json.loads((cache / 'lora_cache.json').read_text())
    del record['compression_fingerprint']
    (cache / 'lora_cache.json').write_text(json.dumps(record))
    other = _base_dir(tmp_path / 'other-lm', 0, same_compression_as=debug_base_dir)
    with pytest.raises(TokenCacheError, match=r"written with base_model='debug' but this XP has base_model="):
        build_solver(CACHE_ARGS + [f'cache.path={cache}', f'base_model={other}'])
    build_solver(CACHE_ARGS + [f'cache.path={cache}'])  # the base it names: fine
