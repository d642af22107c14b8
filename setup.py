"""Titans for Hugging Face Transformers.

One import name, `modeling_titans`: the folder `modeling_titans/` is the whole package (its subpackages included),
so nothing with a generic name lands in site-packages, and the source folder imports as it is installed.
"""

from setuptools import find_packages, setup

# The `titans` command line trains with Trainer (accelerate) on `datasets` and trains tokenizers (tokenizers).
REQUIRES = [
    "torch>=2.4",
    "transformers>=5.24,<6",
    "safetensors",
    "huggingface_hub",
    "accelerate>=1.0",
    "datasets>=3.0",
    "tokenizers>=0.21",
]
PEFT = ["peft>=0.15"]
PLOTS = ["matplotlib>=3.7"]
# reading a Llama from a .gguf file (`titans convert model.gguf ...`); the GGUF tests also write one with it
UPCYCLE = ["gguf"]
TESTS = ["pytest"]
# What the README's commands use: LoRA, plots, GGUF, and the test suite (its command 2; CI installs exactly this).
ALL = PEFT + PLOTS + UPCYCLE + TESTS

setup(
    name="modeling-titans",
    version="0.1.0",
    description="Titans (Learning to Memorize at Test Time) for Hugging Face Transformers",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_titans", "modeling_titans.*"]),
    package_data={"modeling_titans.configuration": ["presets/*.json"]},
    install_requires=REQUIRES,
    entry_points={"console_scripts": ["titans = modeling_titans.cli:main"]},
    extras_require={
        "peft": PEFT,
        "upcycle": UPCYCLE,
        # titans-pytorch is only a point of comparison in benchmarks/, never a dependency of the model
        "bench": PLOTS + ["titans-pytorch>=0.5"],
        "all": ALL,
        "test": ALL,
    },
)
