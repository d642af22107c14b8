"""LoRA with PEFT on Titans: default targets on attention and memory, train / save / load the
adapter, merge_and_unload equals the adapted model, generate() on the PEFT model keeps writing into a TitansCache,
"all-linear" and the memory gates (used in the forward, merged exactly), and clear errors for target names that match
nothing."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modeling_titans import TitansCache, TitansConfig, TitansForCausalLM
from modeling_titans.peft_utils import (
    DEFAULT_LORA_TARGET_MODULES,
    MEMORY_GATE_MODULES,
    MEMORY_TARGET_MODULES,
    lora_target_modules,
    titans_lora_config,
)


def tiny_model(variant: str, seed: int = 0) -> TitansForCausalLM:
    torch.manual_seed(seed)
    return TitansForCausalLM(TitansConfig.from_preset("tiny", variant=variant)).eval()


def train_a_few_steps(model, steps: int = 5):
    """Moves the adapter away from its zero-initialised B so that adapted and base models differ."""
    torch.manual_seed(1)
    batch = torch.randint(3, 259, (2, 16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def adapted_module_names(peft_model) -> set[str]:
    return {name.rsplit(".", 2)[-2] for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}


@pytest.mark.parametrize("variant", ["mac", "lmm"])
def test_default_targets_are_attention_and_memory_projections(variant):
    model = tiny_model(variant)
    targets = lora_target_modules(model)
    expected = DEFAULT_LORA_TARGET_MODULES if variant != "lmm" else MEMORY_TARGET_MODULES  # LMM has no attention
    assert targets == list(expected)
    peft_model = get_peft_model(model, titans_lora_config(model, r=4))
    assert adapted_module_names(peft_model) == set(expected)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_lora_train_save_load_merge_and_generate(tmp_path):
    base = tiny_model("mac")
    base.save_pretrained(tmp_path / "base")
    prompt = torch.randint(3, 259, (2, 11))
    with torch.no_grad():
        base_logits = base(prompt).logits

    peft_model = get_peft_model(base, titans_lora_config(base, r=4, lora_alpha=8))
    train_a_few_steps(peft_model)
    with torch.no_grad():
        adapted_logits = peft_model(prompt).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)  # the adapter learned something

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(TitansForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, adapted_logits, atol=1e-6, rtol=0)

    # generate() on the PEFT model: a TitansCache carries the memory; tokens equal the uncached run.
    out = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, TitansCache)
    uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, uncached)

    merged = reloaded.merge_and_unload()
    assert isinstance(merged, TitansForCausalLM)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(prompt).logits, adapted_logits, atol=1e-5, rtol=0)
    assert torch.equal(merged.generate(prompt, max_new_tokens=6, do_sample=False), out.sequences)


def test_all_linear_trains_and_merges():
    model = tiny_model("mag")
    helper_targets = lora_target_modules(model, "all-linear")
    assert set(MEMORY_GATE_MODULES) <= set(helper_targets) and "lm_head" not in helper_targets
    assert {"q_proj", "mem_q_proj", "gate_o_proj", "down_proj"} <= set(helper_targets)

    # PEFT's own "all-linear" (the same layers) works as well.
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert {"mem_o_proj", "o_proj", "up_proj", *MEMORY_GATE_MODULES} <= adapted_module_names(peft_model)
    train_a_few_steps(peft_model)
    prompt = torch.randint(3, 259, (1, 9))
    with torch.no_grad():
        adapted_logits = peft_model(prompt).logits
        torch.testing.assert_close(peft_model.merge_and_unload()(prompt).logits, adapted_logits, atol=1e-5, rtol=0)


def test_bad_target_names_give_clear_errors():
    model = tiny_model("mag")
    with pytest.raises(ValueError, match=r"\['mem_qproj'\] match no linear layer.*mem_q_proj"):
        lora_target_modules(model, ["q_proj", "mem_qproj"])  # PEFT alone would silently adapt q_proj only
    with pytest.raises(ValueError, match="retrieve_q_proj"):
        lora_target_modules(model, "retrieve_q_proj")  # a MAC-only layer on a MAG model
    assert lora_target_modules(model, ["forget_gate"]) == ["forget_gate"]  # the gates are ordinary targets


def test_lora_on_the_memory_gates_changes_the_model_and_merges_exactly():
    """The gates (alpha, eta, theta) are called through their forward, so an adapter on them is used, and
    merge_and_unload gives the adapted model's logits."""
    model = tiny_model("mag")
    prompt = torch.randint(3, 259, (2, 11))
    with torch.no_grad():
        base_logits = model(prompt).logits
    peft_model = get_peft_model(model, titans_lora_config(model, target_modules=list(MEMORY_GATE_MODULES), r=4))
    assert adapted_module_names(peft_model) == set(MEMORY_GATE_MODULES)
    train_a_few_steps(peft_model)
    with torch.no_grad():
        adapted_logits = peft_model(prompt).logits
        assert (adapted_logits - base_logits).abs().max() > 1e-3
        torch.testing.assert_close(peft_model.merge_and_unload()(prompt).logits, adapted_logits, atol=1e-5, rtol=0)
