"""Fixtures for the data tests: synthetic audio files written in tmp dirs (offline, CPU, fast)."""
import os
from pathlib import Path
import sys
import tempfile
import typing as tp

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data_helpers, whatever pytest's import mode
from data_helpers import entry, write_sidecar, write_tone  # noqa: E402


def _ensure_audiocraft_team_config() -> None:
    """AudioCraft's datasets read a team config (dataset mappers); point it at a minimal one when unset."""
    if os.environ.get('AUDIOCRAFT_CONFIG'):
        return
    path = Path(tempfile.mkdtemp(prefix='acl_data_teams_')) / 'default.yaml'
    path.write_text("default:\n  dora_dir: /tmp/acl_data_outputs\n  partitions:\n    global: debug\n"
                    "    team: debug\n  reference_dir: /tmp\n")
    os.environ['AUDIOCRAFT_CONFIG'] = str(path)


_ensure_audiocraft_team_config()


@pytest.fixture
def good_clip():
    """Factory: a captioned 32 kHz mono clip; returns (audio path, manifest entry)."""
    def make(folder: Path, name: str, seconds: float = 2.0, description: str = 'a test tone',
             frequency: float = 220.0) -> tp.Tuple[Path, dict]:
        audio = write_tone(folder / name, seconds, frequency=frequency)
        write_sidecar(audio, description)
        return audio, entry(audio, seconds)
    return make
