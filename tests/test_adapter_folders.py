"""Adapter folders as users name them: a folder, an XP signature, or the README's `outputs/xps/<sig>/adapter` from
another folder; damaged weights are a clear error, not a safetensors traceback."""
import pytest
import torch

from audiocraft_lora import adapters
from audiocraft_lora.errors import UserError
from audiocraft_lora.lora import LoRASettings


def _save(folder):
    return adapters.save_adapter(folder, {'layers.0.linear1.lora_A': torch.ones(2, 3)}, LoRASettings(rank=2),
                                 ['linear1'], 'debug', 'f' * 64)


def test_an_xp_signature_or_the_readme_path_finds_the_adapter_in_the_runs_folder(tmp_path, monkeypatch):
    runs = tmp_path / 'runs'
    _save(runs / 'xps' / '9a366928' / 'adapter')
    monkeypatch.setenv('AUDIOCRAFT_LORA_DORA_DIR', str(runs))
    monkeypatch.chdir(tmp_path)  # (a user's own project folder: no outputs/ here)
    for given in ('9a366928', 'outputs/xps/9a366928/adapter', str(runs / 'xps' / '9a366928' / 'adapter')):
        adapter = adapters.load_adapter(given)
        assert torch.equal(adapter.state['layers.0.linear1.lora_A'], torch.ones(2, 3)), given
    with pytest.raises(UserError, match=rf"Training runs are in {runs / 'xps'}.*XPs with an adapter there: 9a366928"):
        adapters.load_adapter('outputs/xps/deadbeef/adapter')


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'garbage'])
def test_damaged_weights_name_the_file_and_the_fix(tmp_path, damage):
    folder = _save(tmp_path / 'adapter')
    weights = folder / adapters.WEIGHTS_NAME
    data = weights.read_bytes()
    damaged = {'truncated': data[:len(data) // 2], 'empty': b'', 'garbage': b'\x00not safetensors' * 9}
    weights.write_bytes(damaged[damage])
    with pytest.raises(UserError, match=rf"{weights}.*can't be read as safetensors.*truncated or damaged"):
        adapters.load_adapter(folder)


def test_the_exported_epoch_is_the_latest_with_the_lowest_valid_metric_or_the_last():
    from audiocraft_lora.checkpointing import exported_epoch
    history = [{'valid': {'ce': 3.0}}, {'valid': {'ce': 2.5}}, {'train': {'ce': 1.0}}, {'valid': {'ce': 2.5}},
               {'valid': {'ce': 2.7}}]
    assert exported_epoch(history, 'ce', best=True) == {
        'epoch': 4, 'last_epoch': 5, 'selected_by': 'lowest valid ce (2.5000)'}  # (ties: the latest, as AudioCraft)
    assert exported_epoch(history, 'ce', best=False) == {'epoch': 5, 'last_epoch': 5, 'selected_by': 'last epoch'}
    assert exported_epoch([{'train': {}}], 'ce', best=True)['selected_by'] == 'last epoch'  # (no valid stage yet)


def test_the_cli_records_the_resolved_folder(tmp_path, monkeypatch):
    """generate/export/merge/compare take a signature or the README's path from anywhere, and record (and look for
    the XP's history and argv next to) the real folder."""
    from audiocraft_lora.compare_cli import parse_adapters
    runs = tmp_path / 'runs'
    folder = _save(runs / 'xps' / '9a366928' / 'adapter')
    monkeypatch.setenv('AUDIOCRAFT_LORA_DORA_DIR', str(runs))
    monkeypatch.chdir(tmp_path)
    assert parse_adapters(['9a366928', 'mine=outputs/xps/9a366928/adapter']) == {
        'adapter:9a366928': folder, 'adapter:mine': folder}
    assert parse_adapters(['elsewhere/adapter']) == {'adapter:elsewhere': tmp_path.joinpath('elsewhere/adapter')
                                                     .relative_to(tmp_path)}  # (not found: left for its error)


def test_a_nan_first_valid_score_exports_the_last_epoch_and_says_why():
    """AudioCraft's best state never moves past a NaN first score (min() stays NaN): exporting it would hand out the
    initial adapter. The last epoch is exported instead; a NaN later on is only skipped."""
    from audiocraft_lora.checkpointing import exported_epoch
    nan = float('nan')
    first = exported_epoch([{'valid': {'ce': nan}}, {'valid': {'ce': 3.0}}], 'ce', best=True)
    assert first['epoch'] == 2 and first['selected_by'].startswith('last epoch (epoch 1 had no finite valid ce')
    later = exported_epoch([{'valid': {'ce': 3.0}}, {'valid': {'ce': nan}}, {'valid': {'ce': 2.0}}], 'ce', best=True)
    assert later == {'epoch': 3, 'last_epoch': 3, 'selected_by': 'lowest valid ce (2.0000)'}
