"""LoRA injection on AudioCraft's LM: exactness at init, sanity with a non-zero adapter, merge, errors."""
import copy

import pytest
import torch

from audiocraft_lora import base_models
from audiocraft_lora.errors import LoRAConfigError
from audiocraft_lora.lora import (
    AdapterParameters, LoRASettings, inject_lora, lora_parameters, merge_into_state_dict)
from helpers import conditioned_logits

PROMPTS = ['trap beat with 808 bass', 'ambient pad']


@pytest.fixture
def base_lm(debug_lm_pkg):
    return base_models.build_lm(debug_lm_pkg)


@pytest.fixture
def codes():
    return torch.randint(0, 256, (2, 4, 24), generator=torch.Generator().manual_seed(0))


def test_zero_init_lora_gives_the_base_logits_exactly(base_lm, codes):
    expected = conditioned_logits(base_lm, codes, PROMPTS)
    targets = inject_lora(base_lm, LoRASettings(rank=4, alpha=8))
    assert 'self_attn.in_proj' in targets and 'cross_attention.in_proj' in targets
    assert torch.equal(conditioned_logits(base_lm, codes, PROMPTS), expected)


def test_nonzero_adapter_changes_logits_and_merge_matches_unmerged(base_lm, codes):
    base_state = copy.deepcopy(base_lm.state_dict())
    base_logits = conditioned_logits(base_lm, codes, PROMPTS)
    settings = LoRASettings(rank=4, alpha=8, init='random')
    inject_lora(base_lm, settings)
    adapted = conditioned_logits(base_lm, codes, PROMPTS)
    assert (adapted - base_logits).abs().max() > 1e-2  # sanity: the adapter does something

    adapter = {k: v.detach().clone() for k, v in lora_parameters(base_lm).items()}
    merged_lm = base_models.build_lm({'xp.cfg': base_lm.cfg, 'best_state': base_state})
    merged_lm.load_state_dict(merge_into_state_dict(base_state, adapter, settings.scaling))
    torch.testing.assert_close(conditioned_logits(merged_lm, codes, PROMPTS), adapted, atol=1e-5, rtol=0)


def test_every_fused_in_proj_gets_a_lora_pair(base_lm):
    inject_lora(base_lm, LoRASettings(rank=4, alpha=8))
    names = set(lora_parameters(base_lm))
    dim = base_lm.dim
    for layer in range(len(base_lm.transformer.layers)):
        for block in ('self_attn', 'cross_attention'):
            a = lora_parameters(base_lm)[f'transformer.layers.{layer}.{block}.in_proj.lora_A.weight']
            b = lora_parameters(base_lm)[f'transformer.layers.{layer}.{block}.in_proj.lora_B.weight']
            assert a.shape == (4, dim) and b.shape == (3 * dim, 4)
        for module in ('self_attn.out_proj', 'cross_attention.out_proj', 'linear1', 'linear2'):
            assert f'transformer.layers.{layer}.{module}.lora_A.weight' in names


def test_only_adapter_parameters_require_grad(base_lm):
    inject_lora(base_lm, LoRASettings(rank=2, alpha=4))
    trainable = {n for n, p in base_lm.named_parameters() if p.requires_grad}
    assert trainable and all('.lora_A.' in n or '.lora_B.' in n for n in trainable)
    view = AdapterParameters(base_lm)
    assert set(view.state_dict()) == set(lora_parameters(base_lm))
    assert view.num_parameters() == sum(base_lm.get_parameter(n).numel() for n in trainable)


def test_adapter_view_load_roundtrip_and_mismatch(base_lm):
    inject_lora(base_lm, LoRASettings(rank=2, alpha=4, init='random'))
    view = AdapterParameters(base_lm)
    saved = {k: v.clone() for k, v in view.state_dict().items()}
    with torch.no_grad():
        for p in view.parameters():
            p.zero_()
    view.load_state_dict(saved)
    for k, v in view.state_dict().items():
        assert torch.equal(v, saved[k])
    with pytest.raises(KeyError, match='missing'):
        view.load_state_dict({k: v for k, v in list(saved.items())[1:]})


@pytest.mark.parametrize('kwargs, match', [
    ({'rank': 0}, 'lora.rank must be a positive integer'),
    ({'rank': -3}, 'lora.rank must be a positive integer'),
    ({'alpha': 0}, 'lora.alpha'),
    ({'targets': ['self_attn.q_proj']}, r"Unknown LoRA target\(s\) \['self_attn.q_proj'\]"),
    ({'targets': []}, 'lora.targets is empty'),
    ({'dropout': 1.5}, 'lora.dropout'),
])
def test_bad_settings_are_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(LoRAConfigError, match=match):
        LoRASettings.from_config(kwargs)


def test_unknown_config_keys_are_ignored():
    settings = LoRASettings.from_config({'rank': 4, 'alpha': 8, 'from_the_future': True})
    assert settings.rank == 4 and settings.scaling == 2.0


def test_target_missing_from_the_model_lists_what_exists(debug_lm_pkg):
    from omegaconf import OmegaConf
    cfg = OmegaConf.create(debug_lm_pkg['xp.cfg'])
    cfg.transformer_lm.memory_efficient = False  # torch's nn.MultiheadAttention: no raw in_proj_weight to adapt
    from audiocraft.models import builders
    lm = builders.get_lm_model(cfg)
    with pytest.raises(LoRAConfigError, match=r"matches nothing.*Modules that exist in each layer: \[.*linear1"):
        inject_lora(lm, LoRASettings(rank=2, alpha=4, targets=['self_attn.in_proj']))


def test_cross_attention_targets_are_skipped_on_a_base_without_cross_attention(debug_lm_pkg):
    from omegaconf import OmegaConf
    from audiocraft.models import builders
    cfg = OmegaConf.create(debug_lm_pkg['xp.cfg'])
    cfg.fuser.cross = []
    cfg.fuser.prepend = ['description']  # melody-style conditioning by prepending, no cross-attention
    lm = builders.get_lm_model(cfg)
    targets = inject_lora(lm, LoRASettings(rank=2, alpha=4))
    assert 'cross_attention.in_proj' not in targets and 'self_attn.in_proj' in targets
    assert not any('cross_attention' in n for n in lora_parameters(lm))
