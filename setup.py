"""Phoenix: an end-to-end LLM pretraining framework on megatron-core.

The C++ data-plan builder in csrc/ is compiled here as ``phoenix.data._plan_cpp``.
torch is left as a range so that GPU users keep the CUDA build of their environment
(e.g. an NGC container); the CPU test environment pins it in the Makefile.
"""

import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = []
if glob.glob("csrc/*.cpp"):
    ext_modules.append(
        Pybind11Extension(
            "phoenix.data._plan_cpp",
            sorted(glob.glob("csrc/*.cpp")),
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )

setup(
    name="phoenix-pretrain",
    version="0.1.0",
    description="End-to-end LLM pretraining on megatron-core: exact data mixtures, staged schedules, observability",
    packages=find_packages(include=["phoenix", "phoenix.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.17",
        "psutil",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tensorboard",
        "pyyaml",
        "tqdm",
        "einops",
    ],
    extras_require={"test": ["pytest", "hypothesis", "matplotlib", "transformers"],
                    "plot": ["matplotlib"], "hf": ["transformers"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    entry_points={"console_scripts": ["phoenix=phoenix.cli:main"]},
)
