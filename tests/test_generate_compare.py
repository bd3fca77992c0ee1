"""generate / compare / the Python API end to end on a tiny trained adapter, and training-time diagnostics."""
import json
from pathlib import Path

import pytest
import soundfile
import torch

from audiocraft_lora import cli
from helpers import ROOT, conditioned_logits, run_dora, write_tiny_clap


@pytest.fixture(scope='module')
def trained_xp(tmp_path_factory):
    """A lora_debug XP (2 epochs, samples generated at epoch 2) whose fade-warning threshold always fires."""
    dora_dir = tmp_path_factory.mktemp('generate_compare') / 'outputs'
    proc = run_dora(['solver=musicgen/lora_debug', 'diagnostics.fade_warning_db=60'], dora_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [p for p in (dora_dir / 'xps').iterdir() if p.is_dir()]
    return folder, proc.stdout + proc.stderr


def _main(argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # dset yamls name manifests relative to the checkout, as for `dora run`
    return cli.main(argv)


def test_training_logs_sample_diagnostics_and_warns_on_fade(trained_xp):
    folder, log = trained_xp
    history = json.loads((folder / 'history.json').read_text())
    generate = history[-1]['generate']
    for prefix in ('gen_', 'gen_cont_'):  # unprompted samples and continuations
        for metric in ('fade_ratio_db', 'silence_fraction', 'spectral_flatness', 'clipping_fraction',
                       'flag_rate_fades'):
            assert f'{prefix}{metric}' in generate, sorted(generate)
        assert generate[f'{prefix}count'] == 2  # dataset.generate.num_samples of lora_debug
    assert 'generate' not in history[0]  # generate.every=2
    assert (folder / 'loss_curves.png').stat().st_size > 0 and (folder / 'sample_fade.png').stat().st_size > 0
    # the threshold (+60 dB) is above any fade ratio: the warning names the epoch
    assert 'epoch 2: generated samples fade' in log


def test_api_gives_a_stock_musicgen_and_merge_equals_lora_modules(trained_xp):
    from audiocraft.models import MusicGen
    from audiocraft_lora import load_musicgen
    adapter = trained_xp[0] / 'adapter'
    merged = load_musicgen(adapter=adapter, device='cpu')
    unmerged = load_musicgen(adapter=adapter, device='cpu', merge=False)
    base = load_musicgen('debug', device='cpu')
    assert type(merged) is MusicGen and merged.audiocraft_lora['merged'] is True
    assert merged.audiocraft_lora['base_fingerprint'] == base.audiocraft_lora['base_fingerprint']
    codes = torch.randint(0, 256, (2, 4, 24), generator=torch.Generator().manual_seed(0))
    text = ['trap beat', 'lofi']
    merged_logits = conditioned_logits(merged.lm, codes, text)
    assert torch.allclose(merged_logits, conditioned_logits(unmerged.lm, codes, text), atol=1e-5)
    assert (merged_logits - conditioned_logits(base.lm, codes, text)).abs().max() > 1e-3  # the adapter matters
    # AudioCraft's own API on it
    merged.set_generation_params(duration=1.0)
    wav = merged.generate(['trap beat'])
    assert wav.shape == (1, 1, 32000)
    continued = merged.generate_continuation(wav[..., :16000], 32000, ['trap beat'])
    assert continued.shape == (1, 1, 32000)


def test_generate_writes_files_and_settings_and_is_reproducible(trained_xp, tmp_path, monkeypatch):
    adapter = trained_xp[0] / 'adapter'
    out = tmp_path / 'samples'
    argv = ['generate', '--adapter', str(adapter), '--duration', '1', '--guidance', '3', '--top-k', '50',
            '--device', 'cpu']
    assert _main(argv + ['--prompts', 'trap beat', 'lofi', '--seed', '0', '1', '--out', str(out)], monkeypatch) == 0
    settings = json.loads((out / 'generation.json').read_text())
    assert settings['model']['adapter'] == str(adapter.resolve())
    assert settings['model']['base_model'] == 'debug' and settings['seeds'] == [0, 1]
    assert settings['sampling']['cfg_coef'] == 3.0 and settings['sampling']['top_k'] == 50
    assert settings['environment']['audiocraft'] == '1.3.0'
    records = {(r['prompt'], r['seed']): r for r in settings['samples']}
    assert set(records) == {('trap beat', 0), ('trap beat', 1), ('lofi', 0), ('lofi', 1)}
    for record in records.values():
        audio, sample_rate = soundfile.read(out / record['file'])
        assert sample_rate == 32000 and audio.shape == (32000,)
        assert record['diagnostics']['duration_s'] == pytest.approx(1.0)
    assert records[('lofi', 0)]['tokens_sha256'] != records[('lofi', 1)]['tokens_sha256']
    # one prompt and one seed alone: the very same tokens (independent of the other prompts of the run)
    again = tmp_path / 'again'
    assert _main(argv + ['--prompts', 'lofi', '--seed', '1', '--out', str(again)], monkeypatch) == 0
    (record,) = json.loads((again / 'generation.json').read_text())['samples']
    assert record['tokens_sha256'] == records[('lofi', 1)]['tokens_sha256']


def test_generate_and_compare_refuse_bad_input_before_sampling(trained_xp, tmp_path, monkeypatch, capsys):
    from audiocraft_lora.debug_base import write_debug_base
    adapter = str(trained_xp[0] / 'adapter')
    other_base = str(write_debug_base(tmp_path / 'other_base', seed=1))
    bad_file = tmp_path / 'prompts.json'
    bad_file.write_text('{"prompt": "not a list"}')
    common = ['--prompts', 'x', '--duration', '1', '--device', 'cpu']
    cases = [
        (['generate', '--adapter', str(tmp_path / 'missing'), *common], 'does not exist'),
        (['generate', '--base', other_base, '--adapter', adapter, *common], 'trained on base'),
        (['generate', '--base', 'debug', '--prompts', 'x', '--duration', '0'], '--duration: duration must be > 0'),
        (['generate', '--base', 'debug', '--prompts-file', str(bad_file)], 'non-empty JSON list'),
        (['generate', '--base', 'debug', '--prompts', 'x', '--top-p', '2'], '--top-p must be in [0, 1]'),
        (['compare', '--adapter', str(tmp_path / 'missing'), *common], 'does not exist'),
        (['compare', '--base', other_base, '--adapter', adapter, *common], 'trained on base'),
        (['compare', '--adapter', adapter, *common, '--valid', str(tmp_path / 'nowhere')], 'no such manifest'),
        (['compare', '--adapter', f'base={adapter}', *common], "labelled 'base'"),
    ]
    for argv, message in cases:
        out = tmp_path / 'out'
        assert _main(argv + ['--out', str(out)], monkeypatch) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not out.exists(), argv  # nothing generated
    # forcing the mismatch is possible, and recorded
    out = tmp_path / 'forced'
    argv = ['generate', '--base', other_base, '--adapter', adapter, *common, '--force-base-mismatch', '--out', str(out)]
    assert _main(argv, monkeypatch) == 0
    assert json.loads((out / 'generation.json').read_text())['model']['base_model'] == other_base


def test_compare_report_numbers_files_and_valid_ce_from_training_code(trained_xp, tmp_path, monkeypatch):
    from audiocraft_lora.report_html import referenced_files
    folder = trained_xp[0]
    out = tmp_path / 'compare'
    clap = write_tiny_clap(tmp_path / 'clap')
    argv = ['compare', '--adapter', f'trap={folder / "adapter"}', '--prompts', 'trap beat', '--duration', '1',
            '--seed', '0', '1', '--valid', 'auto', '--device', 'cpu', '--out', str(out),
            '--clap-model', str(clap), '--fad-reference', 'egs/example/valid']
    assert _main(argv, monkeypatch) == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['models'] == ['base', 'adapter:trap']
    assert {(s['model'], s['seed']) for s in report['samples']} == {
        (m, s) for m in report['models'] for s in (0, 1)}
    assert 'fade_ratio_db' in report['comparisons']['adapter:trap']['metrics']
    assert report['skipped'] == []
    for metric in ('CLAP', 'FAD'):  # from the local CLAP model; FAD against the valid clips
        values = report['reference_metrics'][metric]['values']
        assert set(values) == {'base', 'adapter:trap'} and all(v is not None for v in values.values())
    assert -1.0 <= report['reference_metrics']['CLAP']['values']['base'] <= 1.0
    assert 'Reference-model metrics' in (out / 'report.html').read_text()
    files = referenced_files(out / 'report.html')
    assert files and all(f.exists() for f in files)
    assert {f.suffix for f in files} >= {'.wav', '.png'}
    assert report['figures']['cross_entropy'] and report['figures']['history']['adapter:trap']

    # valid CE per codebook, measured by the training code: the adapter's equals the training history's valid CE
    # of the epoch it was exported from (the best one), and the base is worse on this data.
    history = json.loads((folder / 'history.json').read_text())
    best = min(epoch['valid']['ce'] for epoch in history)
    ce = report['cross_entropy']
    assert len(ce['adapter:trap']['per_codebook']) == 4
    assert ce['adapter:trap']['ce'] == pytest.approx(best, abs=1e-5)
    per_codebook = [history[-1]['valid'][f'ce_q{k}'] for k in range(1, 5)] if best == history[-1]['valid']['ce'] \
        else None
    if per_codebook:
        assert ce['adapter:trap']['per_codebook'] == pytest.approx(per_codebook, abs=1e-5)
    assert ce['base']['mean'] > ce['adapter:trap']['mean']

    # same prompt, seed and sampling as `generate` with the base alone -> the same tokens
    gen = tmp_path / 'gen'
    assert _main(['generate', '--base', 'debug', '--prompts', 'trap beat', '--duration', '1', '--seed', '1',
                  '--device', 'cpu', '--out', str(gen)], monkeypatch) == 0
    (record,) = json.loads((gen / 'generation.json').read_text())['samples']
    compare_hashes = report['extra']['tokens_sha256']
    assert compare_hashes['base|00_trap_beat|seed1'] == record['tokens_sha256']
    assert compare_hashes['adapter:trap|00_trap_beat|seed1'] != record['tokens_sha256']


def test_compare_without_reference_models_or_data_says_what_was_skipped(trained_xp, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'compare'
    argv = ['compare', '--adapter', str(trained_xp[0] / 'adapter'), '--prompts', 'lofi', '--duration', '1',
            '--device', 'cpu', '--out', str(out)]
    assert _main(argv, monkeypatch) == 0
    report = json.loads((out / 'report.json').read_text())
    assert {s['name'] for s in report['skipped']} == {'valid cross-entropy', 'CLAP', 'FAD'}
    assert report['cross_entropy'] == {} and report['reference_metrics'] == {}
    html = (out / 'report.html').read_text()
    assert 'CLAP: skipped' in html and 'FAD: skipped' in html
    printed = capsys.readouterr().out
    assert 'base' in printed and f'adapter:{trained_xp[0].name}' in printed  # summary table, default label = XP sig
