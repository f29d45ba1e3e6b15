"""Install megatron-timeexpert.

``pip install -e .`` gives the CPU core (torch, megatron-core, configs, trainer).
Extras:
  gpu     transformer-engine and NVIDIA DALI (CUDA machines only)
  video   PyAV decoding and the synthetic video generator
  logging wandb and TensorBoard sinks
  eval    evaluation helpers (transformers for exported checkpoints)
  launch  mpi4py for MPI launch
  dev     everything the test-suite needs on a CPU machine
"""

from setuptools import find_packages, setup

CORE = [
    # torch: CPU machines install the local 2.13.0 CPU build first (see .ci/run).
    "torch>=2.4",
    # 0.16.x is the newest line that pip installs on Python 3.11 without extra flags.
    "megatron-core==0.16.1",
    "numpy",
    "pyyaml",
    "tqdm",
    "packaging",
    # megatron dist_checkpointing reports writer memory through psutil (fails without it).
    "psutil",
]

EXTRAS = {
    "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda120"],
    "video": ["av>=12"],
    "logging": ["wandb", "tensorboard"],
    # transformers: the SigLIP vision encoder; sentencepiece: the text tokenizer;
    # pycocoevalcap: CIDEr and METEOR for dense captioning (METEOR runs Java).
    "model": ["transformers>=4.45", "sentencepiece"],
    "eval": ["transformers>=4.45", "sentencepiece", "pycocoevalcap"],
    "launch": ["mpi4py"],
}
EXTRAS["dev"] = sorted(
    set(EXTRAS["video"] + EXTRAS["logging"] + EXTRAS["eval"] + ["pytest", "pytest-timeout", "ruff", "scikit-video"])
)

setup(
    name="megatron-timeexpert",
    version="0.1.0",
    description="Distributed training of TimeExpert adaptive-k MoE video-language models on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_timeexpert*", "parallel*", "dali_pipes*", "launch*", "tools*"]),
    package_data={"megatron_timeexpert": ["../configs/*.yaml"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["timeexpert=megatron_timeexpert.cli:main"]},
)
