"""LoRA on Titans with PEFT: which linear layers to adapt, and a check that the names match the model.

Every projection of a Titans block has a distinct name, so an adapter can target attention and the neural memory
separately (PEFT matches a name against the end of each module's path):

    attention (MAG, MAL, MAC)   q_proj  k_proj  v_proj  o_proj
    neural memory (all)         mem_q_proj  mem_k_proj  mem_v_proj  mem_gate_proj  mem_o_proj
    memory gates (all)          forget_gate  momentum_gate  lr_gate      (alpha, eta, theta; present when enabled)
    MAC retrieval (Eq. 21)      retrieve_q_proj  retrieve_o_proj
    output gate (MAG, MAC)      gate_o_proj
    MLP (all)                   gate_proj  up_proj  down_proj

The default, `DEFAULT_LORA_TARGET_MODULES`, adapts attention and the memory's projections: the parts that decide
what is attended to and what is written into and read from the memory. "all-linear" adds the memory gates, the
MAC retrieval, the output gate and the MLP. The memory gates compute their logits in fp32 through their own
forward, so an adapter on them is used like any other and `merge_and_unload` folds it into their weights.

    from peft import get_peft_model
    from modeling_titans.peft_utils import titans_lora_config

    model = get_peft_model(model, titans_lora_config(model, r=8))                 # attention + memory
    model = get_peft_model(model, titans_lora_config(model, target_modules=MEMORY_TARGET_MODULES))
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .layers.memory_layer import MEMORY_GATES

ATTENTION_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MEMORY_TARGET_MODULES = ("mem_q_proj", "mem_k_proj", "mem_v_proj", "mem_gate_proj", "mem_o_proj")
MAC_RETRIEVAL_TARGET_MODULES = ("retrieve_q_proj", "retrieve_o_proj")
MLP_TARGET_MODULES = ("gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_TARGET_MODULES = ATTENTION_TARGET_MODULES + MEMORY_TARGET_MODULES

MEMORY_GATE_MODULES = MEMORY_GATES  # forget_gate, momentum_gate, lr_gate: alpha, eta and theta of the memory
# The output head is tied to the embeddings in the presets; PEFT's "all-linear" leaves it out as well.
OUTPUT_MODULES = ("lm_head",)


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's `nn.Linear` layers (e.g. "q_proj", "mem_k_proj"), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def lora_target_modules(model: nn.Module, target_modules: str | Iterable[str] | None = None) -> list[str]:
    """Checks LoRA target names against `model` and returns the list to give `LoraConfig(target_modules=...)`.

    - None: `DEFAULT_LORA_TARGET_MODULES`, keeping those the variant has (an LMM model has no attention);
    - "all-linear": every linear layer except `lm_head`;
    - a name or a list of names: each must be a linear layer of this model, else a ValueError lists the choices
      (PEFT itself silently drops names that match nothing as long as one other name matches).
    """
    available = linear_module_names(model)
    adaptable = [name for name in available if name not in OUTPUT_MODULES]
    if target_modules is None:
        return [name for name in DEFAULT_LORA_TARGET_MODULES if name in adaptable]
    if target_modules == "all-linear":
        return adaptable
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"LoRA target_modules {unknown} match no linear layer of this Titans model "
            f"(variant {getattr(getattr(model, 'config', None), 'variant', '?')!r}). Choose among: {', '.join(adaptable)}; "
            "the defaults are modeling_titans.peft_utils.DEFAULT_LORA_TARGET_MODULES."
        )
    return names


def titans_lora_config(model: nn.Module, target_modules: str | Iterable[str] | None = None, **lora_kwargs):
    """A `peft.LoraConfig` for a causal LM whose targets were checked by `lora_target_modules`.

    `lora_kwargs` go to `LoraConfig` as they are (r, lora_alpha, lora_dropout, ...).
    """
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, target_modules=lora_target_modules(model, target_modules), **lora_kwargs
    )
