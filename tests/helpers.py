"""Helpers shared by the tests (importable as `helpers`, see pytest.ini)."""
import os
from pathlib import Path
import sys
import typing as tp

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent


def conditioned_logits(lm, codes: torch.Tensor, descriptions: tp.Sequence[str]) -> torch.Tensor:
    """Teacher-forced logits [B, K, T, card] of `lm` for `codes` [B, K, T], in eval mode, NaN (invalid) -> 0."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    lm.eval()
    attributes = [ConditioningAttributes(text={'description': d}) for d in descriptions]
    with torch.no_grad():
        tokenized = lm.condition_provider.tokenize(attributes)
        condition_tensors = lm.condition_provider(tokenized)
        out = lm.compute_predictions(codes, [], condition_tensors)
    return torch.nan_to_num(out.logits, nan=0.0)


def build_solver(argv: tp.List[str]):
    """Build a LoRAMusicGenSolver through dora exactly as `dora run <argv>` would, and return (solver, xp)."""
    from audiocraft_lora import train
    from audiocraft.modules.transformer import set_efficient_attention_backend
    set_efficient_attention_backend('torch')
    xp = train.main.get_xp(argv)
    xp.folder.mkdir(parents=True, exist_ok=True)
    with xp.enter():
        solver = train.get_solver(xp.cfg)
    return solver, xp


DEBUG_ARGS = ['solver=musicgen/lora_debug', 'dataset.num_workers=0', 'device=cpu', 'autocast=false']


def run_dora(args: tp.List[str], dora_dir: Path, timeout: float = 600) -> 'subprocess.CompletedProcess':
    """Run `dora run <args>` in a subprocess from the root of the checkout, as a user would."""
    import subprocess
    env = dict(os.environ, AUDIOCRAFT_LORA_DORA_DIR=str(dora_dir), PYTHONUNBUFFERED='1')
    dora = Path(sys.executable).parent / 'dora'
    cmd = [str(dora) if dora.exists() else 'dora', 'run'] + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def write_tiny_clap(folder: Path) -> Path:
    """A random, tiny transformers CLAP (model + processor with a small byte-level BPE tokenizer) saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizerFast
    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE(unk_token='<unk>'))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(['trap beat 808 drums', 'lofi hip hop piano'], trainers.BpeTrainer(
        vocab_size=300, special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.RobertaProcessing(('</s>', 2), ('<s>', 0))
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
                                     pad_token='<pad>', mask_token='<mask>')
    config = ClapConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64, pad_token_id=1),
        audio_config=dict(depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16, hidden_size=32,
                          num_mel_bins=64, spec_size=256, window_size=4, patch_stride=(4, 4), patch_size=4,
                          projection_hidden_size=32),
        projection_dim=16)
    ClapModel(config).eval().save_pretrained(folder)
    extractor = ClapFeatureExtractor(feature_size=64, truncation='rand_trunc')
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return Path(folder)


HTDEMUCS_SIGNATURE = '955717e8-8726e21a.th'  # the file demucs' get_model('htdemucs') loads from the torch hub cache


def write_tiny_htdemucs(torch_home: Path) -> Path:
    """A random, tiny demucs HTDemucs package where `demucs.pretrained.get_model('htdemucs')` finds it offline.

    Same format as the released file ({'klass', 'args', 'kwargs', 'state'}), so AudioCraft's melody conditioner
    runs demucs' real separation code, just with small random weights.
    """
    from demucs.htdemucs import HTDemucs
    torch.manual_seed(0)
    kwargs = dict(channels=8, dconv_comp=2, norm_starts=99, depth=2, t_layers=1, t_heads=1, t_hidden_scale=1.0,
                  nfft=512, segment=4, samplerate=44100, bottom_channels=0, t_dropout=0.0)
    sources = ['drums', 'bass', 'other', 'vocals']
    model = HTDemucs(sources, **kwargs)
    path = Path(torch_home) / 'hub' / 'checkpoints' / HTDEMUCS_SIGNATURE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'klass': HTDemucs, 'args': [sources], 'kwargs': kwargs, 'state': model.state_dict()}, path)
    return path


def debug_lora_lm(dropout: float = 0.0, rank: int = 4):
    """The debug base's LM with a random LoRA (fast path; rank 4 unless said), in training mode, seeded."""
    from audiocraft_lora import base_models
    from audiocraft_lora.lora import LoRASettings, inject_lora
    torch.manual_seed(0)
    lm = base_models.build_lm(base_models.load_lm_package(base_models.resolve_base('debug')))
    inject_lora(lm, LoRASettings(rank=rank, alpha=2 * rank, init='random', dropout=dropout))
    return lm.train()


def lora_step(lm, codes: torch.Tensor, autocast: bool = True, dtype: torch.dtype = torch.bfloat16):
    """(logits, cross-entropy, adapter gradients) of one CPU training forward/backward on `codes` with the same
    dropout draws every call (seed 1), under autocast to `dtype`."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft.solvers.musicgen import MusicGenSolver
    from audiocraft_lora.lora import lora_parameters
    torch.manual_seed(1)
    attributes = [ConditioningAttributes(text={'description': f'trap beat {i}'}) for i in range(codes.shape[0])]
    with torch.autocast('cpu', dtype=dtype, enabled=autocast):
        out = lm.compute_predictions(codes, [], lm.condition_provider(lm.condition_provider.tokenize(attributes)))
        ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)  # type: ignore
    grads = torch.autograd.grad(ce, [p for p in lora_parameters(lm).values() if p.requires_grad])
    return torch.nan_to_num(out.logits), ce, grads  # (NaN where the delay pattern has no token)


def sample_tokens(lm) -> torch.Tensor:
    """AudioCraft's token-by-token generation (streaming cache, CFG, top-k sampling, seed 4) of 12 steps for two
    'trap beat' prompts, under CPU bf16 autocast."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    conditions = [ConditioningAttributes(text={'description': 'trap beat'}) for _ in range(2)]
    torch.manual_seed(4)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        return lm.generate(None, conditions, max_gen_len=12, use_sampling=True, top_k=50, cfg_coef=3.0)


class OpsSeen(TorchDispatchMode):
    """Names of the ops dispatched while active (`where`: only those whose tensor output passes it)."""

    def __init__(self, where: tp.Optional[tp.Callable[[torch.Tensor], bool]] = None):
        super().__init__()
        self.where, self.names = where, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.where is None or (isinstance(out, torch.Tensor) and self.where(out)):
            self.names.append(func.overloadpacket.__name__)
        return out
