"""fp16 and bf16 models with padded batches: no NaN may reach a real token, the loss or the memory state.

Pads are zero vectors at the memory's input; l2-normalising a zero vector in fp16 used to divide 0 by 0 (the
normalisation's 1e-12 floor underflows to 0 in fp16), and a NaN at a pad spreads to real tokens through the
memory's writes and through attention (a masked key still multiplies its value by 0).
"""

import pytest
import torch

from helpers import SEGMENT, VARIANTS, random_ids, tiny_model
from modeling_titans import TitansCache, TitansForCausalLM
from modeling_titans.cache_titans import map_tensors
from modeling_titans.layers.memory_layer import MEMORY_GATES

HALF_DTYPES = [torch.float16, torch.bfloat16]
LENGTHS = [SEGMENT + 5, 6, 2 * SEGMENT]  # pads: 3, 10 and 0 tokens


def padded_batch(pad_token_id: int, side: str):
    """(input_ids, attention_mask) of three rows of LENGTHS real tokens, padded on `side`."""
    width = max(LENGTHS)
    input_ids = random_ids(len(LENGTHS), width, seed=4)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        if side == "left":
            attention_mask[row, width - length :] = 1
        else:
            attention_mask[row, :length] = 1
    return input_ids.masked_fill(attention_mask == 0, pad_token_id), attention_mask


def assert_state_finite(cache: TitansCache):
    """Every float tensor of every layer's state (memory weights, momentum, conv tail, attention keys) is finite."""
    tensors = []
    for layer in cache.layers:
        map_tensors(layer.state, lambda t: tensors.append(t) or t)
    assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_half_precision_forward_and_loss_are_finite(variant, dtype, side):
    model = tiny_model(variant).to(dtype)
    reference = tiny_model(variant)  # the same weights in fp32
    input_ids, attention_mask = padded_batch(model.config.pad_token_id, side)
    real = attention_mask.bool()
    cache = TitansCache(model.config)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, cache=cache).logits
        expected = reference(input_ids, attention_mask=attention_mask).logits
    assert torch.isfinite(logits[real]).all()
    assert_state_finite(cache)
    # Half precision rounds, but stays near the fp32 model at every real token.
    assert (logits[real].float() - expected[real]).abs().max() < 0.1

    model.train()
    labels = input_ids.masked_fill(~real, -100)
    loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_half_precision_generate_emits_real_tokens(variant, dtype, side):
    model = tiny_model(variant).to(dtype)
    input_ids, attention_mask = padded_batch(model.config.pad_token_id, side)
    cache = TitansCache(model.config)
    outputs = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=SEGMENT + 2, min_new_tokens=SEGMENT + 2,
        do_sample=False, output_logits=True, return_dict_in_generate=True, cache=cache,
    )
    assert all(torch.isfinite(step).all() for step in outputs.logits)
    assert_state_finite(cache)
    if side == "left":  # (right padding: the first new token comes from a pad's logits, in Llama as well)
        assert (outputs.sequences[:, input_ids.shape[1] :] != model.config.pad_token_id).all()


def test_loading_in_fp16_keeps_the_memory_gates_in_fp32(tmp_path):
    tiny_model("mag").save_pretrained(tmp_path)
    model = TitansForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).eval()
    for name, parameter in model.named_parameters():
        is_gate = any(f".{gate}." in name for gate in MEMORY_GATES)
        assert parameter.dtype == (torch.float32 if is_gate else torch.float16), name
    input_ids, attention_mask = padded_batch(model.config.pad_token_id, "left")
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        expected = tiny_model("mag")(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (logits[real].float() - expected[real]).abs().max() < 0.1
