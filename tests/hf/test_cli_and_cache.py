"""`import-hf` / `export` / `merge` through `audiocraft_lora.cli.main`, the conversion cache and the T5 registration."""
import json
import os
import subprocess
import sys

import pytest
import torch


def test_import_hf_cli(hf_text_dir, tmp_path, capsys):
    from audiocraft_lora.cli import main
    out = tmp_path / 'ac'
    assert main(['import-hf', str(hf_text_dir), '--out', str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {'state_dict.bin', 'compression_state_dict.bin', 't5', 'hf_import.json'}
    manifest = json.loads((out / 'hf_import.json').read_text())
    assert manifest['t5_name'] == 't5-small' and manifest['model_type'] == 'musicgen'
    # packages load with torch's weights_only default (no pickled OmegaConf)
    pkg = torch.load(out / 'state_dict.bin', weights_only=True)
    assert isinstance(pkg['xp.cfg'], str) and 'transformer.layers.0.self_attn.in_proj_weight' in pkg['best_state']
    # re-running into the same folder replaces it; a converted folder alone re-registers its T5
    assert main(['import-hf', str(hf_text_dir), '--out', str(out)]) == 0
    assert main(['import-hf', str(out)]) == 0
    assert 'Registered' in capsys.readouterr().out


STOCK_LOAD = """
import sys
from audiocraft.models import MusicGen
mg = MusicGen.get_pretrained(sys.argv[1], device='cpu')
mg.set_generation_params(duration=0.05, top_k=5)
wav = mg.generate(['hip hop 808 beat with trap drums'])
assert 'audiocraft_lora' not in sys.modules
print('GENERATED', tuple(wav.shape))
"""


def test_stock_audiocraft_loads_and_generates_in_a_fresh_process(hf_text_dir, hub_cache, tmp_path):
    """The headline promise: only audiocraft + the hub cache registration, offline, no audiocraft_lora import."""
    from audiocraft_lora.hf_convert import import_hf
    out = import_hf(hf_text_dir, tmp_path / 'ac')
    env = {**os.environ, 'HF_HUB_CACHE': str(hub_cache), 'HF_HUB_OFFLINE': '1', 'USER': 'test'}
    proc = subprocess.run([sys.executable, '-c', STOCK_LOAD, str(out)], env=env, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'GENERATED (1, 1, 1600)' in proc.stdout  # 10 frames at 200 Hz, 160 samples each


@pytest.mark.parametrize('content', [None, {'model_type': 't5', 'd_model': 512}])
def test_import_hf_cli_refuses_non_musicgen(tmp_path, capsys, content):
    from audiocraft_lora.cli import main
    folder = tmp_path / 'not-musicgen'
    folder.mkdir()
    if content is not None:
        (folder / 'config.json').write_text(json.dumps(content))
    assert main(['import-hf', str(folder), '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err
    assert ("model_type='t5'" in err) if content else ('no config.json' in err)
    assert not (tmp_path / 'out').exists()


def test_import_hf_names_an_incomplete_config_and_damaged_weights(hf_text_dir, tmp_path, capsys):
    import shutil
    from audiocraft_lora.cli import main
    bare = tmp_path / 'bare'
    bare.mkdir()
    (bare / 'config.json').write_text(json.dumps({'model_type': 'musicgen'}))
    assert main(['import-hf', str(bare), '--out', str(tmp_path / 'out1')]) == 2
    assert 'has no decoder, audio_encoder, text_encoder section(s): it is incomplete' in capsys.readouterr().err
    damaged = tmp_path / 'damaged'
    shutil.copytree(hf_text_dir, damaged)
    (weights,) = damaged.glob('*.safetensors')
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(['import-hf', str(damaged), '--out', str(tmp_path / 'out2')]) == 2
    assert f'The weights in {damaged} can\'t be read' in capsys.readouterr().err
    assert not (tmp_path / 'out1').exists() and not (tmp_path / 'out2').exists()


def test_import_hf_refuses_foreign_out_folder(hf_text_dir, tmp_path, capsys):
    from audiocraft_lora.cli import main
    out = tmp_path / 'busy'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    assert main(['import-hf', str(hf_text_dir), '--out', str(out)]) == 2
    assert 'not a folder written by import-hf' in capsys.readouterr().err
    assert (out / 'notes.txt').read_text() == 'mine'


def test_missing_tokenizer_is_refused_before_converting(hf_text_dir, tmp_path, monkeypatch):
    """transformers would silently build a near-empty T5 tokenizer from a folder without vocabulary files."""
    from huggingface_hub import constants
    from audiocraft_lora.errors import BaseModelError
    from audiocraft_lora.hf_convert import import_hf
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-hub'))  # no cached t5-small either
    folder = tmp_path / 'no-tokenizer'
    folder.mkdir()
    for name in ('config.json', 'generation_config.json', 'model.safetensors'):
        (folder / name).symlink_to(hf_text_dir / name)
    with pytest.raises(BaseModelError, match='no usable T5 tokenizer') as info:
        import_hf(folder, tmp_path / 'out')
    assert 'MusicgenProcessor' in str(info.value) and not (tmp_path / 'out').exists()


def test_ensure_converted_is_cached(hf_text_dir, tmp_path):
    from audiocraft_lora.base_models import resolve_base
    from audiocraft_lora.hf_convert import ensure_converted
    first = ensure_converted(hf_text_dir, cache_dir=tmp_path)
    stamp = (first / 'state_dict.bin').stat().st_mtime_ns
    assert ensure_converted(hf_text_dir, cache_dir=tmp_path) == first
    assert (first / 'state_dict.bin').stat().st_mtime_ns == stamp
    assert first.parent == tmp_path / 'hf-converted'
    base = resolve_base(str(hf_text_dir), cache_dir=tmp_path)
    assert base.kind == 'hf_dir' and base.path == str(first)
    # a changed HF folder converts again
    weights = hf_text_dir / 'model.safetensors'
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert ensure_converted(hf_text_dir, cache_dir=tmp_path) != first
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_t5_registration_never_overwrites_a_different_t5(tmp_path):
    from transformers import T5Config, T5EncoderModel
    from audiocraft_lora.errors import BaseModelError
    from audiocraft_lora.hf.t5_local import register_in_hub_cache
    from hf_tiny import tiny_tokenizer
    config = T5Config(vocab_size=len(tiny_tokenizer()), d_model=512, d_kv=8, d_ff=16, num_layers=1, num_heads=2)
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path / f't5-{seed}'
        T5EncoderModel(config).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        dirs.append(folder)
    cache = tmp_path / 'hub'
    snapshot = register_in_hub_cache(dirs[0], 't5-small', cache)
    assert register_in_hub_cache(dirs[0], 't5-small', cache) == snapshot  # idempotent
    with pytest.raises(BaseModelError, match="already holds a different 't5-small'"):
        register_in_hub_cache(dirs[1], 't5-small', cache)
    # the registered snapshot is what transformers resolves offline for that name
    loaded = T5EncoderModel.from_pretrained('t5-small', cache_dir=str(cache), local_files_only=True)
    torch.testing.assert_close(loaded.state_dict()['shared.weight'],
                               T5EncoderModel.from_pretrained(str(dirs[0])).state_dict()['shared.weight'])


def test_export_and_merge_cli(hf_text_dir, tmp_path, capsys):
    from audiocraft_lora import adapters, base_models
    from audiocraft_lora.cli import main
    from audiocraft_lora.lora import LoRASettings, inject_lora, lora_parameters
    base = base_models.resolve_base(str(hf_text_dir))
    pkg = base_models.load_lm_package(base)
    lm = base_models.build_lm(pkg)
    settings = LoRASettings(rank=2, alpha=4.0, targets=['self_attn.in_proj', 'linear2'], init='random')
    targets = inject_lora(lm, settings)
    adapter = adapters.save_adapter(tmp_path / 'adapter', {k: p.detach() for k, p in lora_parameters(lm).items()},
                                    settings, targets, base_model=str(hf_text_dir), base_kind=base.kind,
                                    base_fingerprint=base_models.fingerprint_state(pkg['best_state']),
                                    extra={'xp_sig': 'abc123', 'epoch': 3, 'last_epoch': 5,
                                           'selected_by': 'lowest valid ce (2.0000)'})
    out = tmp_path / 'exports'
    assert main(['export', '--adapter', str(adapter), '--out', str(out), '--format', 'all']) == 0
    assert {p.name for p in out.iterdir()} == {'peft', 'merged-audiocraft', 'merged-hf'}
    # every export says which XP and epoch its weights are from (best valid or last)
    recorded = [json.loads((out / 'peft' / 'audiocraft_lora_adapter.json').read_text()),
                json.loads((out / 'merged-hf' / 'merged_adapter.json').read_text()),
                json.loads(torch.load(out / 'merged-audiocraft' / 'state_dict.bin',
                                      weights_only=True)['merged_adapter'])]
    for record in recorded:
        assert (record['xp_sig'], record['epoch'], record['last_epoch']) == ('abc123', 3, 5), record
        assert record['selected_by'].startswith('lowest valid ce') and record['adapter'] == str(adapter.resolve())
    peft_cfg = json.loads((out / 'peft' / 'adapter_config.json').read_text())
    assert 'fc2' in peft_cfg['target_modules'] and 'fc1' not in peft_cfg['target_modules']
    assert 'XP abc123, epoch 3 of 5 (lowest valid ce (2.0000))' in capsys.readouterr().out
    assert main(['merge', '--adapter', str(adapter), '--out', str(tmp_path / 'merged')]) == 0
    # (an HF base: its T5 travels in the merged folder, and stock AudioCraft needs it registered on each machine)
    assert (tmp_path / 'merged' / 'hf_import.json').exists()
    printed = capsys.readouterr().out
    assert f"run `audiocraft-lora import-hf {tmp_path / 'merged'}` once" in printed and 'epoch 3 of 5' in printed
    merged = torch.load(tmp_path / 'merged' / 'state_dict.bin', weights_only=True)['best_state']
    key = 'transformer.layers.0.linear2.weight'
    assert not torch.equal(merged[key], pkg['best_state'][key])
    untouched = 'transformer.layers.0.linear1.weight'
    assert torch.equal(merged[untouched], pkg['best_state'][untouched])
    # writing into a non-empty folder is refused
    assert main(['merge', '--adapter', str(adapter), '--out', str(tmp_path / 'merged')]) == 2
    assert 'not empty' in capsys.readouterr().err
