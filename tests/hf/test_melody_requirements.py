"""Melody bases need demucs (AudioCraft's chroma conditioner): a clear error before any data or model work."""
import importlib.util

import pytest

from audiocraft_lora.errors import BaseModelError
from helpers import DEBUG_ARGS, build_solver

pytestmark = pytest.mark.skipif(importlib.util.find_spec('demucs') is not None,
                                reason='demucs is installed: the melody path is not refused here')


def test_training_on_a_melody_base_without_demucs_says_what_to_install(dora_dir, hf_melody_dir):
    with pytest.raises(BaseModelError, match='melody base.*demucs.*htdemucs weights'):
        build_solver(DEBUG_ARGS + [f'base_model={hf_melody_dir}'])
    assert not list(dora_dir.rglob('checkpoint*.th'))


def test_loading_a_melody_base_for_generation_without_demucs_says_what_to_install(hf_melody_dir):
    from audiocraft_lora import load_musicgen
    with pytest.raises(BaseModelError, match='demucs'):
        load_musicgen(str(hf_melody_dir), device='cpu')
