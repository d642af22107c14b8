"""The model card (`README.md`) of an exported Titans repository.

YAML metadata the Hub reads (library_name, pipeline_tag, license, tags), then: what the model is (variant), a
usage snippet that works as written, the configuration as a table, and training data and metrics when the
checkpoint recorded them in `training_summary.json` (written by `titans train`).
"""

import json

from huggingface_hub import ModelCardData

from modeling_titans import TitansConfig
from modeling_titans.layers.token_mixers import TOKEN_MIXERS, has_attention, mixer_classes

PAPER = "Behrouz, Zhong, Mirrokni: [Titans: Learning to Memorize at Test Time](https://arxiv.org/abs/2501.00663)"
# Config fields shown in the card's table, in this order; the rest is in config.json.
BACKBONE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
ATTENTION_FIELDS = ("num_attention_heads", "num_key_value_heads", "num_persistent_tokens")
MEMORY_FIELDS = (
    "memory_depth",
    "memory_num_heads",
    "memory_expansion",
    "memory_chunk_size",
    "memory_lr_max",
    "memory_lr_relative",
    "memory_normalize_grad",
    "memory_gates_from_input",
    "memory_per_layer_gates",
    "memory_forget_per_channel",
    "use_momentum",
    "use_forgetting",
    "use_conv",
    "tie_word_embeddings",
    "titans_format_version",
)
LONG_LIST = 8  # longer lists in the training summary (e.g. a loss curve) are summarised, not printed


def model_description(config: TitansConfig) -> str:
    """"variant <description>", or the layers' kinds of a hybrid model."""
    kinds = list(dict.fromkeys(config.mixer_types))
    if len(kinds) == 1:
        return f"variant {TOKEN_MIXERS[kinds[0]].description}"
    return "a hybrid of " + "; ".join(
        f"{TOKEN_MIXERS[kind].description} in layers {', '.join(str(i) for i, k in enumerate(config.mixer_types) if k == kind)}"
        for kind in kinds
    )


def usage_snippet(repo_id: str) -> str:
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

repo_id = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)

inputs = tokenizer("The passkey is", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(tokenizer.decode(output[0], skip_special_tokens=True))
```"""


def config_table(config: TitansConfig, num_parameters: int) -> str:
    mixer_fields = tuple(dict.fromkeys(field for cls in mixer_classes(config) for field in cls.config_fields))
    fields = BACKBONE_FIELDS + (ATTENTION_FIELDS if has_attention(config) else ()) + mixer_fields
    rows = [("variant", config.variant), ("parameters", f"{num_parameters:,}"), ("dtype", str(config.dtype))]
    if len(set(config.mixer_types)) > 1:
        rows.append(("mixer_types", ", ".join(config.mixer_types)))
    rows += [(field, getattr(config, field)) for field in fields + MEMORY_FIELDS]
    return "\n".join(["| field | value |", "|---|---|"] + [f"| `{field}` | {value} |" for field, value in rows])


def summary_rows(summary: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Flattens part of a training summary into (dotted key, value) rows; skips empty values and summarises
    long lists (loss curves)."""
    rows = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, dict):
            rows += summary_rows(value, f"{name}.")
        elif isinstance(value, list) and (len(value) > LONG_LIST or any(isinstance(v, (dict, list)) for v in value)):
            rows.append((name, f"list of {len(value)}, in training_summary.json"))
        elif isinstance(value, float):
            rows.append((name, f"{value:.4g}"))
        else:
            rows.append((name, json.dumps(value) if isinstance(value, list) else str(value)))
    return rows


def training_section(summary: dict | None) -> str:
    """One table per group of the summary (`titans train` writes model, data, training, metrics, loss_curve)."""
    if not summary:
        return "No training record (`training_summary.json`) came with this checkpoint."
    groups = [("", {key: value for key, value in summary.items() if not isinstance(value, dict)})]
    groups += [(key, value) for key, value in summary.items() if isinstance(value, dict)]
    parts = ["As recorded by the training run (`training_summary.json` in this repository)."]
    for heading, values in groups:
        rows = summary_rows(values)
        if rows:
            table = "\n".join(["| | |", "|---|---|"] + [f"| `{key}` | {value} |" for key, value in rows])
            parts.append(f"### {heading.replace('_', ' ').capitalize()}\n\n{table}" if heading else table)
    return "\n\n".join(parts)


def model_card(
    config: TitansConfig,
    num_parameters: int,
    repo_id: str,
    license: str,
    code_files: list[str],
    weight_files: list[str],
    tokenizer_class: str,
    package_version: str,
    summary: dict | None,
) -> str:
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=["titans", *(f"titans-{kind}" for kind in dict.fromkeys(config.mixer_types)), "neural-memory", "long-context"],
    )
    title = repo_id.rsplit("/", 1)[-1]
    return f"""---
{metadata.to_yaml()}
---

# {title}

A Titans language model, {model_description(config)}.

Titans ({PAPER}) adds a neural long-term memory next to attention: a small MLP whose weights keep learning while
the model reads, by gradient descent with momentum and weight decay on an associative-memory loss.
`generate()` writes every new token into the memory too.

## Usage

{usage_snippet(repo_id)}

The code (`{"`, `".join(code_files)}`) is in this repository, so `transformers` and `torch` are all you
need. With the `modeling-titans` package installed, `import modeling_titans` registers the Titans classes with the
Auto classes and `trust_remote_code` is no longer needed.

## Model

{config_table(config, num_parameters)}

## Training

{training_section(summary)}

## Files

- weights: {", ".join(f"`{name}`" for name in weight_files)} (safetensors only, no pickle)
- tokenizer: `{tokenizer_class}`
- code: generated by `titans export` from modeling-titans {package_version}
"""
