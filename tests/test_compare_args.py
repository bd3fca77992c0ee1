"""compare's argument parsing: adapter labels and the data given to the valid cross-entropy."""
import json

import pytest

from audiocraft_lora.compare_cli import parse_adapters, valid_overrides
from audiocraft_lora.errors import UserError


def test_adapter_labels(tmp_path):
    labelled = parse_adapters([str(tmp_path / 'xps' / 'ab12cd34' / 'adapter'), f'r64={tmp_path / "other"}',
                               str(tmp_path / 'exported_trap')])
    assert list(labelled) == ['adapter:ab12cd34', 'adapter:r64', 'adapter:exported_trap']
    with pytest.raises(UserError, match="labelled 'x'"):
        parse_adapters([f'x={tmp_path}/a', f'x={tmp_path}/b'])


def test_valid_overrides_auto_explicit_and_folder(tmp_path):
    xp = tmp_path / 'xps' / 'ab12cd34'
    (xp / 'adapter').mkdir(parents=True)
    (xp / '.argv.json').write_text(json.dumps([
        'solver=musicgen/lora_small', 'dset=audio/trap', 'dataset.segment_duration=10', 'device=cuda',
        'autocast=true', 'stop_at_epoch=3', 'base_model=/models/small', 'logging.log_wandb=true', 'lora.rank=64']))
    # the XP's recipe, data and segments; not how or where it ran, nor what each adapter's config gives
    assert valid_overrides(['auto'], xp / 'adapter') == [
        'solver=musicgen/lora_small', 'dset=audio/trap', 'dataset.segment_duration=10']
    with pytest.raises(UserError, match='not the adapter folder of a training XP'):
        valid_overrides(['auto'], tmp_path / 'exported')
    assert valid_overrides(['dset=audio/trap', 'dataset.batch_size=4']) == ['dset=audio/trap', 'dataset.batch_size=4']
    with pytest.raises(UserError, match='not Hydra overrides'):
        valid_overrides(['dset=audio/trap', 'oops'])
    folder = tmp_path / 'egs' / 'trap' / 'valid'
    folder.mkdir(parents=True)
    assert valid_overrides([str(folder)]) == [f'datasource.{s}={folder.resolve()}'
                                              for s in ('train', 'valid', 'evaluate', 'generate')]
    with pytest.raises(UserError, match='no such manifest folder'):
        valid_overrides([str(tmp_path / 'nope')])


def test_valid_ce_of_a_dataset_that_is_gone_says_how_to_give_the_data(dora_dir):
    from audiocraft_lora.valid_ce import valid_cross_entropy
    with pytest.raises(UserError, match=r"Could not find 'dset/audio/moved_away'.*--valid dset=audio/<name>"):
        valid_cross_entropy('debug', {}, ['dset=audio/moved_away'])


def test_valid_ce_of_a_manifest_folder_checks_only_the_valid_split(dora_dir):
    """`--valid <manifest folder>` points every split at the folder (AudioCraft builds them all); only the valid split
    is checked, so the same files in 'train' are not a train/valid leak, and the CE is measured."""
    from helpers import ROOT
    from audiocraft_lora.valid_ce import valid_cross_entropy
    overrides = valid_overrides([str(ROOT / 'egs' / 'example' / 'valid')]) + [
        'dataset.segment_duration=1', 'dataset.batch_size=2', 'dataset.valid.num_samples=2']
    results = valid_cross_entropy('debug', {}, overrides)
    assert results['base']['num_batches'] == 1 and len(results['base']['per_codebook']) == 4
    assert all(0 < ce < 20 for ce in results['base']['per_codebook'])
    # the recipe's autocast (lora_default: bf16), as training ran it, on the CPU too: a CPU run of lora_small trains
    # under bf16 autocast and its history's valid CE is that one; float32 only when the recipe or overrides say so
    fp32 = valid_cross_entropy('debug', {}, overrides + ['autocast=false'])['base']['ce']
    assert fp32 != results['base']['ce'] and abs(fp32 - results['base']['ce']) < 0.05 * fp32
