"""Titans from a pretrained Llama ("upcycling"): keep every weight of a `LlamaForCausalLM` and add a neural memory.

    model = TitansForCausalLM.from_llama("path/to/llama", variant="mag", sliding_window=1024)

The embeddings, each block's input norm, attention (q, k, v, o with Llama's RoPE and grouped key/value heads),
post-attention norm and MLP, the final norm and the output head are copied as they are. Each layer that gets a
memory (`memory_layers`, default all) becomes a MAG or MAL mixer that starts as its Llama block's attention
(`TokenMixer.start_as_attention`): the memory's output projection is zero, so it adds exactly nothing, and the MAG
output gate passes the attention output unchanged (no attention norm, W_O = I / sigma(0)). The other layers are
sliding-window attention alone (mixer kind "swa"). Right after conversion the Titans model therefore computes the
source's logits under a sliding-window mask of `sliding_window` tokens, and the source's own logits for inputs no
longer than the window; training the memory (`titans train --train-only memory`) moves it from there.

MAC cannot start exact (the retrieved memory tokens and the segment-local attention change what attention
sees), nor LMM (no attention), so both are refused, and so are persistent tokens (they add keys to attention).
A source with a part Titans does not have (attention or MLP biases, a head width other than hidden /
heads, a RoPE type Titans does not compute) is refused with a ValueError naming the field.
"""

from __future__ import annotations

import copy
import os

import torch

from .configuration.configuration_titans import ROPE_TYPES, TitansConfig

# The variants whose mixer can start as plain sliding-window attention, and why the others cannot.
CONVERTIBLE_VARIANTS = ("mag", "mal")
REFUSED_VARIANTS = {
    "mac": "its retrieved memory tokens enter attention's softmax and its attention stays within a segment, so a "
    "converted MAC model cannot give the Llama's outputs",
    "lmm": "it has no attention, so the Llama's attention would be dropped",
}
# Llama config fields copied to the Titans config as they are.
COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "attention_dropout",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def check_llama_config(llama_config):
    """Raises a one-line ValueError naming the first field of `llama_config` that Titans cannot reproduce."""
    if getattr(llama_config, "model_type", None) != "llama":
        raise ValueError(
            f"model_type={getattr(llama_config, 'model_type', None)!r}: only Llama models (model_type 'llama') can be "
            "converted."
        )
    for field in ("attention_bias", "mlp_bias"):
        if getattr(llama_config, field, False):
            raise ValueError(f"{field}=True: Titans' attention and MLP projections have no bias.")
    heads = llama_config.num_attention_heads
    head_dim = getattr(llama_config, "head_dim", None) or llama_config.hidden_size // heads
    if head_dim * heads != llama_config.hidden_size:
        raise ValueError(
            f"head_dim={head_dim}: Titans' attention heads are hidden_size / num_attention_heads = "
            f"{llama_config.hidden_size} / {heads} wide."
        )
    if getattr(llama_config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"pretraining_tp={llama_config.pretraining_tp}: only 1 is supported.")
    rope = dict(llama_config.rope_parameters or {})
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise ValueError(f"rope_parameters rope_type={rope.get('rope_type')!r}: Titans computes {ROPE_TYPES}.")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']}: RoPE must rotate whole heads.")


def titans_config_from_llama(
    llama_config, variant: str = "mag", sliding_window: int = 2048, memory_layers=None, **memory_config
) -> TitansConfig:
    """The config of the Titans model that `llama_to_titans` builds: the Llama's backbone fields (RoPE included),
    `variant` ("mag" or "mal") in the layers listed in `memory_layers` (default: all) and "swa" in the others,
    no persistent tokens, memory heads as wide as the attention heads unless `memory_config` says otherwise
    (`memory_config`: any other TitansConfig field, e.g. memory_depth, memory_chunk_size)."""
    check_llama_config(llama_config)
    if variant not in CONVERTIBLE_VARIANTS:
        reason = REFUSED_VARIANTS.get(variant, f"it is not a Titans variant {CONVERTIBLE_VARIANTS}")
        raise ValueError(f"variant={variant!r} cannot be converted from Llama: {reason}.")
    if memory_config.get("num_persistent_tokens", 0) != 0:
        raise ValueError("num_persistent_tokens must be 0 for a converted model: persistent tokens change attention.")
    for field in ("mixer_types", "variant", "gate_attention_norm"):
        if field in memory_config:
            raise ValueError(f"{field} is set by the conversion (use variant= and memory_layers=).")
    layers = llama_config.num_hidden_layers
    chosen = list(range(layers)) if memory_layers is None else sorted(set(memory_layers))
    if not chosen or not all(isinstance(i, int) and 0 <= i < layers for i in chosen):
        raise ValueError(
            f"memory_layers={memory_layers!r}: give at least one layer index in [0, {layers}) (the Llama has {layers})."
        )
    fields = {field: getattr(llama_config, field) for field in COPIED_FIELDS}
    fields["rope_parameters"] = {"rope_type": "default", **dict(llama_config.rope_parameters or {})}
    memory_config.setdefault("memory_num_heads", llama_config.num_attention_heads)
    return TitansConfig(
        **fields,
        variant=variant,
        mixer_types=[variant if i in chosen else "swa" for i in range(layers)],
        sliding_window=sliding_window,
        num_persistent_tokens=0,
        gate_attention_norm=False,
        **memory_config,
    )


@torch.no_grad()
def llama_to_titans(llama, variant: str = "mag", sliding_window: int = 2048, memory_layers=None, **memory_config):
    """A `TitansForCausalLM` holding the weights of the `LlamaForCausalLM` `llama` and a new neural memory in the
    layers `memory_layers` (default: all), initialised to contribute exactly nothing (module docstring). The new
    model has the source's dtype and device and a copy of its generation config."""
    from .modeling import TitansForCausalLM

    config = titans_config_from_llama(llama.config, variant, sliding_window, memory_layers, **memory_config)
    parameter = next(llama.parameters())
    with torch.device(parameter.device):
        titans = TitansForCausalLM(config).to(parameter.dtype)  # before copying: a copy would round to fp32
    titans.model.embed_tokens.load_state_dict(llama.model.embed_tokens.state_dict())
    titans.model.norm.load_state_dict(llama.model.norm.state_dict())
    if not config.tie_word_embeddings:
        titans.lm_head.load_state_dict(llama.lm_head.state_dict())
    for titans_layer, llama_layer in zip(titans.model.layers, llama.model.layers):
        titans_layer.mixer.start_as_attention(llama_layer.input_layernorm, llama_layer.self_attn)
        titans_layer.post_attention_layernorm.load_state_dict(llama_layer.post_attention_layernorm.state_dict())
        titans_layer.mlp.load_state_dict(llama_layer.mlp.state_dict())
    titans.tie_weights()
    titans.generation_config = copy.deepcopy(llama.generation_config)
    return titans.eval()


def llama_location(source: str) -> dict:
    """The `from_pretrained` arguments that read `source`: a folder (save_pretrained or a Hub download) or a GGUF
    file (read by transformers' GGUF support, which needs the `gguf` package)."""
    if os.path.isfile(source) and source.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(source))
        return {"pretrained_model_name_or_path": folder, "gguf_file": name}
    if os.path.isdir(source):
        return {"pretrained_model_name_or_path": source}
    raise ValueError(f"{source} is neither a model folder nor a .gguf file.")


def load_llama(source: str, **from_pretrained_kwargs):
    """The `LlamaForCausalLM` and tokenizer at `source` (`llama_location`); the tokenizer is None where the folder
    has none."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    location = llama_location(source)
    check_llama_config(AutoConfig.from_pretrained(**location))
    model = LlamaForCausalLM.from_pretrained(**location, **from_pretrained_kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**location)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def from_llama(model_or_path, variant: str = "mag", sliding_window: int = 2048, memory_layers=None, **memory_config):
    """`TitansForCausalLM.from_llama`: `llama_to_titans` on an in-memory `LlamaForCausalLM`, or on the one
    `load_llama` reads from a folder or GGUF file."""
    from transformers import LlamaForCausalLM

    if isinstance(model_or_path, (str, os.PathLike)):
        model_or_path, _ = load_llama(os.fspath(model_or_path))
    if not isinstance(model_or_path, LlamaForCausalLM):
        raise TypeError(f"Expected a LlamaForCausalLM or a path to one, got {type(model_or_path).__name__}.")
    return llama_to_titans(model_or_path, variant, sliding_window, memory_layers, **memory_config)


def convert_llama(
    source: str, out_dir: str, variant: str = "mag", sliding_window: int = 2048, memory_layers=None,
    overwrite: bool = False, **memory_config,
):
    """`titans convert`: converts the Llama at `source` (folder or .gguf) and saves the Titans model, its
    generation config and the source's tokenizer into `out_dir`. A non-empty `out_dir` is refused unless
    `overwrite`. Returns the model."""
    from transformers import AutoConfig

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} is not empty; pass --overwrite to write into it, or choose another folder.")
    # Refuse a source or settings that cannot convert before reading the weights.
    titans_config_from_llama(
        AutoConfig.from_pretrained(**llama_location(source)), variant, sliding_window, memory_layers, **memory_config
    )
    llama, tokenizer = load_llama(source)
    titans = llama_to_titans(llama, variant, sliding_window, memory_layers, **memory_config)
    titans.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return titans


def memory_parameter_names(model) -> list[str]:
    """Names of the parameters of the model's neural memories (every `TitansNeuralMemory` module)."""
    from .layers.memory_layer import TitansNeuralMemory

    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, TitansNeuralMemory):
            names.extend(f"{module_name}.{name}" for name, _ in module.named_parameters())
    return names


def train_only_memory(model) -> list[str]:
    """Freezes every parameter but the neural memories' (the converted backbone stays the Llama's); returns the
    names of those left trainable."""
    trainable = set(memory_parameter_names(model))
    if not trainable:
        raise ValueError("The model has no neural memory to train.")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    return sorted(trainable)


__all__ = [
    "convert_llama",
    "from_llama",
    "llama_to_titans",
    "load_llama",
    "memory_parameter_names",
    "titans_config_from_llama",
    "train_only_memory",
]
