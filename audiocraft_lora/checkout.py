"""Where the training tree lives, and how `dora run` reaches it from wherever the user stands.

`dora run` reads our Hydra tree from the checkout (`config/` next to the package: install.sh installs it in editable
mode), so `dset=audio/<name>` means `<checkout>/config/dset/audio/<name>.yaml` whatever the current folder is.
dora finds the training package by looking in the current folder: from the checkout plain `dora run` works, from
any other folder it needs `-P audiocraft_lora`. Relative paths given to a run (`base_model=local/musicgen-small`, a
dset's split folders, manifest entries) are relative to the folder `dora run` was launched from (AudioCraft's rule:
dora's `git_save.to_absolute_path`), not to the XP folder the run works in.
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / 'config'


def dora_run() -> str:
    """The `dora run` prefix that works from the current folder."""
    here = Path(os.getcwd()).resolve()
    return 'dora run' if here == ROOT else 'dora -P audiocraft_lora run'


def dora_dir() -> Path:
    """Where `dora run` keeps its XPs (`<dir>/xps/<sig>`): AUDIOCRAFT_LORA_DORA_DIR, else `<checkout>/outputs`."""
    return Path(os.environ.get('AUDIOCRAFT_LORA_DORA_DIR') or (ROOT / 'outputs'))
