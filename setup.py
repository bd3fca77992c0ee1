"""audiocraft-lora: LoRA fine-tuning of MusicGen inside AudioCraft's own solver.

audiocraft 1.3.0 pins torch==2.1.0, av==11.0.0 and xformers<0.0.23, which do not resolve on Python >= 3.11.
It is therefore installed with `pip install --no-deps audiocraft==1.3.0` (see install.sh) and its real
runtime imports are declared here instead.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# The torch stack must match itself: torchaudio follows torch's version exactly, xformers is built for it.
TORCH_STACK = [
    'torch>=2.6,<2.12',
    'torchaudio>=2.6,<2.12',
    'xformers>=0.0.29',
]

# audiocraft 1.3.0's real imports on the training / generation path (its own pins are unusable).
AUDIOCRAFT_RUNTIME = [
    'av>=12',
    'einops',
    'flashy>=0.0.2',
    'dora-search>=0.1.12',
    'hydra-core>=1.3',
    'hydra_colorlog',
    'omegaconf>=2.3',
    'julius>=0.2.7',
    'num2words',
    'numpy',
    'sentencepiece',
    'spacy>=3.6.1',
    'huggingface_hub',
    'tqdm',
    'transformers>=4.46',
    'librosa',
    'soundfile',
    'torchmetrics',
    'protobuf',
    'treetable',
    'demucs==4.0.1',  # melody bases: the chroma conditioner separates stems with htdemucs
]

OURS = [
    'peft>=0.17',  # target_parameters reaches the fused q/k/v `in_proj_weight`
    'safetensors',
    'matplotlib',
    'pyloudnorm',
    'scipy',  # Fréchet distance (compare --clap-model)
]

setup(
    name='audiocraft-lora',
    version='0.1.0',
    description='AudioCraft-native LoRA fine-tuning for MusicGen',
    long_description=(HERE / 'README.md').read_text(encoding='utf-8') if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['audiocraft_lora', 'audiocraft_lora.*', 'grids', 'grids.*']),
    include_package_data=True,
    install_requires=TORCH_STACK + AUDIOCRAFT_RUNTIME + OURS,
    extras_require={'test': ['pytest>=7', 'pytest-xdist>=3']},
    entry_points={'console_scripts': ['audiocraft-lora=audiocraft_lora.cli:main']},
)
