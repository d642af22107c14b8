"""Titans for Hugging Face Transformers.

One import name, `modeling_titans`. The top-level folders `configuration/` and `tokenization/` are
installed as its subpackages `modeling_titans.configuration` and `modeling_titans.tokenization` (and `hub_upload/`
as `modeling_titans.hub_upload`), so nothing with a generic name lands in site-packages.
"""

from setuptools import setup

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

setup(
    name="modeling-titans",
    version="0.1.0",
    description="Titans (Learning to Memorize at Test Time) for Hugging Face Transformers",
    python_requires=">=3.10",
    packages=[
        "modeling_titans",
        "modeling_titans.commands",
        "modeling_titans.layers",
        "modeling_titans.ops",
        "modeling_titans.configuration",
        "modeling_titans.tokenization",
        "modeling_titans.hub_upload",
    ],
    package_dir={
        "modeling_titans": "modeling_titans",
        "modeling_titans.configuration": "configuration",
        "modeling_titans.tokenization": "tokenization",
        "modeling_titans.hub_upload": "hub_upload",
    },
    package_data={"modeling_titans.configuration": ["presets/*.json"]},
    install_requires=REQUIRES,
    entry_points={"console_scripts": ["titans = modeling_titans.cli:main"]},
    extras_require={
        "peft": PEFT,
        # titans-pytorch is only a point of comparison in benchmarks/, never a dependency of the model
        "bench": PLOTS + ["titans-pytorch>=0.5"],
        "all": PEFT + PLOTS,
        "test": ["pytest"] + PEFT + PLOTS,
    },
)
