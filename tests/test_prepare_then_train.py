"""`audiocraft-lora prepare` output is what the solver trains on: validated, then a training step runs."""
import numpy as np
import soundfile as sf
import torch

from audiocraft_lora.data.prepare import prepare_dataset
from helpers import DEBUG_ARGS, build_solver


def test_prepared_folder_trains(dora_dir, tmp_path):
    source = tmp_path / 'my beats'
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # stereo 44.1 kHz, non-ASCII names, captions in sibling .txt files
        t = np.arange(int(3.5 * 44100)) / 44100
        wav = 0.3 * np.sin(2 * np.pi * 55 * (i + 1) * t) * (1 + 0.1 * rng.standard_normal(t.shape))
        sf.write(source / f'节拍_{i}.wav', np.stack([wav, wav], axis=1), 44100)
        (source / f'节拍_{i}.txt').write_text(f'trap beat number {i}, 808 bass', encoding='utf-8')
    prepared = prepare_dataset(source, 'mybeats', egs_root=tmp_path / 'egs', config_root=tmp_path / 'config',
                               valid_ratio=0.34, seed=0)
    assert prepared.dset_yaml.exists()
    args = DEBUG_ARGS + [f'datasource.{split}={path.parent}' for split, path in prepared.manifests.items()]
    args += [f'dataset.segment_duration={min(prepared.suggested_segment_duration, 3)}', 'dataset.batch_size=2']
    solver, _ = build_solver(args)  # validate_data=true: every prepared entry is checked first
    audio, infos = next(iter(solver.dataloaders['train']))
    assert audio.shape[1] == 1  # stereo 44.1 kHz converted to the base's mono 32 kHz by AudioCraft's dataset
    # (MusicDataset may merge other fields into the text or drop it: AudioCraft's text augmentation)
    assert all('trap beat number' in info.description for info in infos if info.description)
    solver._current_stage = 'train'
    solver.model.train()
    metrics = solver.run_step(0, (audio, infos), {})
    solver._current_stage = None
    assert torch.isfinite(metrics['ce'])
