"""The user's own project folder, outside the checkout: their local HF `local/musicgen-small`, a metadata.json of
15 s-style clips, an evaluation_prompts.json. `prepare` there, then the exact `Next:` command it prints, then
`generate` from yet another folder, all through the installed console scripts, as they would type them."""
import json
import os
from pathlib import Path
import shlex
import subprocess
import sys

import numpy as np
from omegaconf import OmegaConf
import soundfile as sf

from audiocraft_lora.checkout import CONFIG_DIR


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _run(cmd, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _user_project(folder: Path, hf_dir: Path) -> None:
    _mkdir(folder / 'local').joinpath('musicgen-small').symlink_to(hf_dir)  # card 64: below the default top_k of 250
    clips = _mkdir(folder / 'clips')
    rng = np.random.default_rng(0)
    records = {'train': [], 'valid': []}
    for index in range(6):  # stereo 44.1 kHz beats, listed by a metadata.json with the user's own keys
        t = np.arange(int(2.5 * 44100)) / 44100
        beat = np.sin(2 * np.pi * 50 * t) * np.exp(-(t % 0.43) * 8) + 0.1 * rng.standard_normal(t.size)
        sf.write(clips / f'clip_{index}.wav', np.stack([beat, beat], 1) * 0.4, 44100)
        records['valid' if index >= 4 else 'train'].append(
            {'audio_path': f'clips/clip_{index}.wav', 'prompt': 'hip hop 808 beat with trap drums', 'bpm': 140})
    (folder / 'metadata.json').write_text(json.dumps(records))
    (folder / 'evaluation_prompts.json').write_text(json.dumps(['trap hiphop beat, 808 sub bass heavy']))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_prepare_train_generate_from_the_users_own_folder(hf_text_dir, tmp_path):
    project = tmp_path / 'my project'
    _user_project(project, hf_text_dir)
    name = f'test_user_{os.getpid()}'  # (git-ignored, removed at the end)
    dset_yaml = CONFIG_DIR / 'dset' / 'audio' / f'{name}.yaml'
    env = dict(os.environ, AUDIOCRAFT_LORA_DORA_DIR=str(tmp_path / 'xps'), PYTHONUNBUFFERED='1')
    try:
        prepared = _run([_script('audiocraft-lora'), 'prepare', 'metadata.json', '--name', name], project, env)
        # the dset lands where `dora run` reads dset=audio/<name>, naming the user's folders absolutely
        split_dirs = OmegaConf.load(dset_yaml).datasource
        assert split_dirs['train'] == str(project / 'egs' / name / 'train')
        assert 'xFormers' not in prepared.stderr and 'Hydra' not in prepared.stderr
        (next_line,) = [line for line in prepared.stdout.splitlines() if line.startswith('Next: ')]
        command = shlex.split(next_line[len('Next: '):])
        assert command[:4] == ['dora', '-P', 'audiocraft_lora', 'run'] and f'dset=audio/{name}' in command

        # exactly that command, from the project folder, with the base given as the user gives it (relative)
        fast = ['base_model=local/musicgen-small', 'device=cpu', 'autocast=false', 'dataset.num_workers=0',
                'dataset.batch_size=2', 'dataset.segment_duration=2', 'optim.epochs=1', 'optim.updates_per_epoch=2',
                'schedule.cosine.warmup=1', 'dataset.valid.num_samples=2', 'dataset.generate.num_samples=1',
                'generate.every=1', 'generate.lm.gen_duration=1', 'generate.lm.prompt_duration=0.5']
        trained = _run([_script(command[0])] + command[1:] + fast, project, env)
        assert 'Hydra 1.4' not in trained.stderr and 'WARNING[XFORMERS]' not in trained.stderr
        (xp,) = (tmp_path / 'xps' / 'xps').iterdir()
        history = json.loads((xp / 'history.json').read_text())
        assert history[-1]['generate']['gen_count'] >= 1  # sampled with top_k 250 on a 64-token codebook
        adapter = xp / 'adapter'
        config = json.loads((adapter / 'adapter_config.json').read_text())
        assert config['base_model'] == str(project / 'local' / 'musicgen-small')  # not a hub id, and absolute

        # the adapter finds its base from any folder; default sampling (top_k 250) on the tiny codebook
        elsewhere = _mkdir(tmp_path / 'elsewhere')
        _run([_script('audiocraft-lora'), 'generate', '--adapter', str(adapter), '--prompts-file',
              str(project / 'evaluation_prompts.json'), '--duration', '1', '--seed', '0', '--out', 'samples'],
             elsewhere, env)
        (wav,) = (elsewhere / 'samples').glob('*.wav')
        assert sf.info(str(wav)).duration > 0.9
    finally:
        dset_yaml.unlink(missing_ok=True)
