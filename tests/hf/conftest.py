"""Fixtures of the HF interop tests: an isolated offline hub cache and tiny HF MusicGen folders (see `hf_tiny`).

Every test here runs with `HF_HUB_OFFLINE` on and the hub cache in a temp folder, so nothing can be downloaded and
the T5 registration of `import-hf` never touches the real cache.
"""
import os
from pathlib import Path
import typing as tp

import pytest

os.environ.setdefault('USER', 'test')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['TRANSFORMERS_OFFLINE'] = '1'

from hf_tiny import build_hf_musicgen  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def hub_cache(tmp_path_factory) -> tp.Iterator[Path]:
    """Offline, with a per-session temp hub cache (huggingface_hub reads its env at import time: patch it)."""
    from huggingface_hub import constants
    cache = tmp_path_factory.mktemp('hub-cache')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, 'HF_HUB_CACHE', str(cache))
        mp.setattr(constants, 'HF_HUB_OFFLINE', True)
        mp.setenv('HF_HUB_OFFLINE', '1')
        mp.setenv('AUDIOCRAFT_LORA_CACHE', str(tmp_path_factory.mktemp('alora-cache')))
        yield cache


@pytest.fixture(scope='session')
def hf_text_dir(hub_cache, tmp_path_factory) -> Path:
    return build_hf_musicgen(tmp_path_factory.mktemp('hf-text'))


@pytest.fixture(scope='session')
def hf_melody_dir(hub_cache, tmp_path_factory) -> Path:
    return build_hf_musicgen(tmp_path_factory.mktemp('hf-melody'), melody=True)


@pytest.fixture(scope='session')
def hf_stereo_dir(hub_cache, tmp_path_factory) -> Path:
    return build_hf_musicgen(tmp_path_factory.mktemp('hf-stereo'), stereo=True, decoder_hidden=512)
