"""Adapter exports: HF PEFT adapter, merged AudioCraft folder, merged HF folder; a mismatched base is refused.

The adapter is trained-like (random non-zero A and B) on the AudioCraft LM converted from a tiny HF MusicGen; every
export must reproduce that adapted model's logits (fp32, 1e-4), and the adapter must visibly change the logits.
"""
import json
from pathlib import Path

import pytest
import torch

from hf_tiny import TEXTS, audiocraft_raw_logits, build_hf_musicgen, hf_delay_input, hf_logits

TOL = 1e-4


@pytest.fixture(scope='module')
def adapted(hf_text_dir, tmp_path_factory):
    """(adapter folder, sequence [B, K, S], adapted logits, base logits, codes) for a random non-zero adapter."""
    from audiocraft_lora import adapters, base_models
    from audiocraft_lora.lora import LoRASettings, inject_lora, lora_parameters
    base = base_models.resolve_base(str(hf_text_dir))
    pkg = base_models.load_lm_package(base)
    lm = base_models.build_lm(pkg).eval()
    codes = torch.randint(0, lm.card, (2, lm.num_codebooks, 10), generator=torch.Generator().manual_seed(3))
    _, base_logits = audiocraft_raw_logits(lm, codes, TEXTS)
    settings = LoRASettings(rank=4, alpha=8.0, dropout=0.05, init='random')
    targets = inject_lora(lm, settings)
    lm.eval()
    sequence, logits = audiocraft_raw_logits(lm, codes, TEXTS)
    state = {k: p.detach().clone() for k, p in lora_parameters(lm).items()}
    assert any('.in_proj.' in k for k in state) and any('cross_attention' in k for k in state)
    folder = adapters.save_adapter(tmp_path_factory.mktemp('adapter') / 'adapter', state, settings, targets,
                                   base_model=str(hf_text_dir), base_kind=base.kind,
                                   base_fingerprint=base_models.fingerprint_state(pkg['best_state']))
    # sanity: the adapter changes the logits, so the equalities below can't pass with an ignored adapter
    assert (logits - base_logits).abs().max() > 1e-2
    return folder, codes, sequence, logits, base_logits


def _text_inputs(hf_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(hf_dir))(TEXTS, return_tensors='pt', padding=True)


def test_peft_export_reproduces_adapted_logits(adapted, hf_text_dir, tmp_path):
    from peft import PeftModel
    from transformers import MusicgenForConditionalGeneration
    from audiocraft_lora.hf_convert import export_peft
    folder, codes, sequence, logits, base_logits = adapted
    out = export_peft(folder, tmp_path / 'peft')
    config = json.loads((out / 'adapter_config.json').read_text())
    assert config['peft_type'] == 'LORA' and config['r'] == 4 and config['lora_alpha'] == 8.0
    hf = MusicgenForConditionalGeneration.from_pretrained(str(hf_text_dir)).eval()
    hf_input = hf_delay_input(hf, codes)
    S = sequence.shape[-1]
    base_ref = hf_logits(hf, hf_input, _text_inputs(hf_text_dir))[:, :, :S]
    torch.testing.assert_close(base_ref, base_logits, atol=TOL, rtol=0)
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    adapted_modules = {n for n, _ in peft_model.named_modules() if n.endswith(('q_proj', 'k_proj', 'v_proj'))
                       and 'lora_A' in dict(peft_model.named_modules())[n]._modules}
    assert len(adapted_modules) == 2 * 2 * 3  # layers x (self, cross) x (q, k, v)
    ref = hf_logits(peft_model, hf_input, _text_inputs(hf_text_dir))[:, :, :S]
    torch.testing.assert_close(ref, logits, atol=TOL, rtol=0)


def test_merged_audiocraft_folder_loads_with_stock_musicgen(adapted, tmp_path):
    from audiocraft.models import MusicGen
    from audiocraft_lora.hf_convert import merge_to_audiocraft
    folder, codes, sequence, logits, base_logits = adapted
    out = merge_to_audiocraft(folder, tmp_path / 'merged')
    mg = MusicGen.get_pretrained(str(out), device='cpu')
    _, merged_logits = audiocraft_raw_logits(mg.lm.eval(), codes, TEXTS)
    torch.testing.assert_close(merged_logits, logits, atol=TOL, rtol=0)
    assert (out / 't5' / 'config.json').exists()


def test_merged_hf_folder(adapted, hf_text_dir, tmp_path):
    from transformers import MusicgenForConditionalGeneration
    from audiocraft_lora.hf_convert import merge_to_hf
    folder, codes, sequence, logits, base_logits = adapted
    out = merge_to_hf(folder, tmp_path / 'merged-hf')
    hf = MusicgenForConditionalGeneration.from_pretrained(str(out)).eval()
    ref = hf_logits(hf, hf_delay_input(hf, codes), _text_inputs(out))[:, :, :sequence.shape[-1]]
    torch.testing.assert_close(ref, logits, atol=TOL, rtol=0)


def test_mismatched_base_is_refused(adapted, tmp_path):
    from audiocraft_lora.cli import main
    from audiocraft_lora.errors import BaseModelError
    from audiocraft_lora.hf_convert import export_peft
    folder = adapted[0]
    other = build_hf_musicgen(tmp_path / 'other-hf', seed=7)
    with pytest.raises(BaseModelError) as info:
        export_peft(folder, tmp_path / 'peft', base=str(other))
    message = str(info.value)
    assert 'hf-text' in message and 'other-hf' in message  # names the adapter's base and the one given
    assert not (tmp_path / 'peft').exists()
    assert main(['merge', '--adapter', str(folder), '--base', str(other), '--out', str(tmp_path / 'm')]) == 2
    assert not (tmp_path / 'm').exists()
