"""Shared fixtures: a tiny deterministic base model and helpers to build the solver in-process.

Everything is offline and CPU: the base is `audiocraft_lora.debug_base` (built once per session in a temp cache),
and solvers are built through the same dora/Hydra entry point users run.
"""
import os
from pathlib import Path
import sys
import tempfile
import typing as tp

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SESSION_TMP = Path(tempfile.mkdtemp(prefix='audiocraft_lora_tests_'))
os.environ.setdefault('AUDIOCRAFT_LORA_CACHE', str(_SESSION_TMP / 'cache'))
os.environ['AUDIOCRAFT_LORA_DORA_DIR'] = str(_SESSION_TMP / 'outputs')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch  # noqa: E402


@pytest.fixture(scope='session')
def debug_base_dir() -> Path:
    from audiocraft_lora.debug_base import ensure_debug_base
    return ensure_debug_base()


@pytest.fixture(scope='session')
def debug_lm_pkg(debug_base_dir):
    from audiocraft_lora import base_models
    return base_models.load_lm_package(base_models.resolve_base('debug'))


@pytest.fixture
def dora_dir(tmp_path, monkeypatch) -> Path:
    """A fresh dora folder for the XPs of one test."""
    from audiocraft_lora import train
    folder = tmp_path / 'outputs'
    monkeypatch.setenv('AUDIOCRAFT_LORA_DORA_DIR', str(folder))
    monkeypatch.setattr(train.main.dora, 'dir', folder)
    return folder
