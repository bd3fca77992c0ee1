"""Resolving bases: hub id through the local HF cache (offline), local AudioCraft folder, clear errors."""
import shutil

import pytest

from audiocraft_lora import base_models
from audiocraft_lora.errors import BaseModelError


def _fake_hub_cache(root, repo_id, files):
    """Lay files out as huggingface_hub's cache does (models--org--name/snapshots/<rev>, refs/main)."""
    repo = root / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0' * 40)
    for f in files:
        shutil.copy(f, snapshot / f.name)
    return root


def test_hub_id_loads_from_the_local_cache_offline(debug_base_dir, tmp_path, monkeypatch):
    cache = _fake_hub_cache(tmp_path / 'hub', 'tiny-org/musicgen-tiny',
                            [debug_base_dir / 'state_dict.bin', debug_base_dir / 'compression_state_dict.bin'])
    monkeypatch.setenv('AUDIOCRAFT_CACHE_DIR', str(cache))  # AudioCraft's loaders pass it to hf_hub_download
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    base = base_models.resolve_base('tiny-org/musicgen-tiny')
    assert base.kind == 'hub'
    pkg = base_models.load_lm_package(base)
    local = base_models.load_lm_package(base_models.resolve_base(str(debug_base_dir)))
    assert base_models.fingerprint_state(pkg['best_state']) == base_models.fingerprint_state(local['best_state'])
    compression = base_models.load_compression_model(base)
    assert compression.sample_rate == 32000 and not any(p.requires_grad for p in compression.parameters())


def test_local_audiocraft_folder(debug_base_dir):
    base = base_models.resolve_base(str(debug_base_dir))
    assert base.kind == 'audiocraft_dir'
    lm = base_models.build_lm(base_models.load_lm_package(base))
    assert lm.cfg.dtype == 'float32'


@pytest.mark.parametrize('filename, content, target, match', [
    (None, b'', '', 'neither state_dict.bin'),
    ('state_dict.bin', b'', '', 'no compression_state_dict.bin'),
    ('f.bin', b'x', 'f.bin', 'is a file'),
    ('config.json', b'{"model_type": "t5"}', '', "model_type='t5'"),
])
def test_bad_local_bases_name_the_problem(tmp_path, filename, content, target, match):
    if filename:
        (tmp_path / filename).write_bytes(content)
    with pytest.raises(BaseModelError, match=match):
        base_models.resolve_base(str(tmp_path / target))


def test_fingerprint_differs_between_bases(debug_lm_pkg):
    state = dict(debug_lm_pkg['best_state'])
    fp = base_models.fingerprint_state(state)
    key = next(k for k in state if k.endswith('linear1.weight'))
    state[key] = state[key] + 1e-3
    assert base_models.fingerprint_state(state) != fp
