"""TitansCache: the row operations generate() relies on, reset, bounded size, refused operations, and
the refusal of a cache built for another model or one that has already consumed the whole input.

Each row operation is checked against its meaning: after reorder / select / repeat, decoding continues exactly as a
cache built from scratch on the correspondingly reordered / selected / repeated prompts.
"""

import pytest
import torch

from helpers import SEGMENT, VARIANTS, WINDOW, full_logits, random_ids, tiny_model
from modeling_titans import TitansCache
from modeling_titans.cache_titans import map_tensors


# Three prompts of different lengths, left-padded, so that rows stand at different chunk / segment offsets.
LENGTHS = [11, 6, 9]


def padded_prompts(pad_token_id: int):
    width = max(LENGTHS)
    input_ids = random_ids(len(LENGTHS), width, seed=5)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(LENGTHS):
        attention_mask[row, : width - length] = 0
    return input_ids.masked_fill(attention_mask == 0, pad_token_id), attention_mask


@torch.no_grad()
def prefill(model, input_ids, attention_mask):
    cache = TitansCache(model.config)
    model(input_ids, attention_mask=attention_mask, cache=cache)
    return cache


@torch.no_grad()
def decode(model, cache, continuation, attention_mask):
    """Feeds `continuation` (batch, n) one token per call, growing the mask as generate() does."""
    logits = []
    for t in range(continuation.shape[1]):
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        logits.append(model(continuation[:, t : t + 1], attention_mask=attention_mask, cache=cache).logits)
    return torch.cat(logits, dim=1)


ROW_OPERATIONS = {
    # name: (apply to the cache, the same on a batch dimension)
    "reorder_cache": (lambda c: c.reorder_cache(torch.tensor([2, 0, 0])), lambda t: t[[2, 0, 0]]),
    "batch_select_indices": (lambda c: c.batch_select_indices(torch.tensor([0, 2])), lambda t: t[[0, 2]]),
    "batch_repeat_interleave": (lambda c: c.batch_repeat_interleave(2), lambda t: t.repeat_interleave(2, dim=0)),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("operation", list(ROW_OPERATIONS))
def test_row_operation_then_decode_equals_a_fresh_cache_on_the_same_rows(variant, operation):
    model = tiny_model(variant)
    on_cache, on_rows = ROW_OPERATIONS[operation]
    input_ids, attention_mask = padded_prompts(model.config.pad_token_id)
    cache = prefill(model, input_ids, attention_mask)
    on_cache(cache)
    rows_ids, rows_mask = on_rows(input_ids), on_rows(attention_mask)
    assert cache.batch_size == rows_ids.shape[0]
    continuation = on_rows(random_ids(len(LENGTHS), SEGMENT + 3, seed=6))  # crosses chunk and segment boundaries
    fresh = prefill(model, rows_ids, rows_mask)
    torch.testing.assert_close(
        decode(model, cache, continuation, rows_mask), decode(model, fresh, continuation, rows_mask), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_reset_empties_the_cache_for_reuse(variant):
    model = tiny_model(variant)
    input_ids = random_ids(2, 13)
    cache = prefill(model, input_ids[:, :9], None)
    cache.reset()
    assert not cache.is_initialized and cache.get_seq_length() == 0 and cache.memory_bytes() == 0
    # A reset cache behaves like a new one, also with another batch size.
    single = random_ids(1, 13, seed=3)
    with torch.no_grad():
        logits = model(single, cache=cache).logits
    torch.testing.assert_close(logits, full_logits(model, single), rtol=0, atol=1e-5)
    assert cache.batch_size == 1 and cache.get_seq_length() == 13


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_size_is_bounded_once_the_window_or_segment_is_full(variant):
    model = tiny_model(variant)
    steps = 6 * SEGMENT
    input_ids = random_ids(2, 2 * WINDOW + steps)
    cache = prefill(model, input_ids[:, : 2 * WINDOW], None)
    sizes = []
    with torch.no_grad():
        for t in range(2 * WINDOW, input_ids.shape[1]):
            model(input_ids[:, t : t + 1], cache=cache)
            sizes.append(cache.memory_bytes())
    assert cache.get_seq_length() == input_ids.shape[1]
    if variant == "mac":
        # A prefill keeps the current segment only; decoding fills a buffer of one segment's retrieved and input
        # tokens, then writes over the keys of past segments.
        assert len(set(sizes[:SEGMENT])) == SEGMENT and len(set(sizes[SEGMENT:])) == 1
    else:
        assert len(set(sizes)) == 1  # a window of keys (MAG / MAL), or the memory alone (LMM)
    # And the size does not depend on how long the prompt was (same phase in the segment).
    long_cache = prefill(model, random_ids(2, 2 * WINDOW + 4 * SEGMENT), None)
    assert long_cache.memory_bytes() == prefill(model, input_ids[:, : 2 * WINDOW], None).memory_bytes()


def test_cache_holds_the_memory_state_of_every_layer():
    model = tiny_model("mag")
    cache = prefill(model, random_ids(2, 10), None)
    config = model.config
    memory_head_dim = config.hidden_size // config.memory_num_heads
    for layer in cache.layers:
        first, second = layer.state.memory.weights
        assert first.shape == (2, config.memory_num_heads, memory_head_dim, memory_head_dim * config.memory_expansion)
        assert second.shape == (2, config.memory_num_heads, memory_head_dim * config.memory_expansion, memory_head_dim)
        assert layer.state.memory.conv_tail.shape == (2, config.conv_kernel_size - 1, 3 * config.hidden_size)
        assert layer.state.attention.keys.shape[2] == WINDOW - 1
    assert cache.seen_tokens.tolist() == [10, 10]


def test_cache_cannot_be_cropped_or_record_its_past():
    model = tiny_model("mal")
    cache = prefill(model, random_ids(1, 6), None)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(2)
    for arguments in ({}, {"recurrent_states_to_keep": 2}):  # transformers >= 5.25 passes how many to keep
        with pytest.raises(ValueError, match="cannot take part in assisted generation"):
            cache.activate_past_recording(**arguments)


def cache_tensors(cache) -> list[torch.Tensor]:
    tensors = []
    for layer in cache.layers:
        map_tensors(layer.state, lambda t: tensors.append(t.clone()) or t)
    return tensors


OTHER_MODELS = {
    # name: (the other model's variant and config overrides, a fragment of the refusal)
    "4 layers": (("mag", {"num_hidden_layers": 4}), "num_hidden_layers=4"),
    "MAC mixers": (("mac", {}), "mixer_types=['mac', 'mac']"),
    "hidden size 64": (("mag", {"hidden_size": 64, "intermediate_size": 64}), "hidden_size=64"),
}


@pytest.mark.parametrize("other", list(OTHER_MODELS))
def test_a_cache_of_another_model_is_refused_and_left_intact(other):
    (variant, overrides), fragment = OTHER_MODELS[other]
    model = tiny_model("mag")
    other_model = tiny_model(variant, **overrides)
    foreign = prefill(other_model, random_ids(1, 6), None)
    before = cache_tensors(foreign)
    for call in (
        lambda: model(random_ids(1, 1), cache=foreign),
        lambda: model.generate(random_ids(1, 6), cache=foreign, max_new_tokens=2),
    ):
        with pytest.raises(ValueError, match="built for a different model") as error:
            call()
        assert fragment in str(error.value)
    assert foreign.get_seq_length() == 6
    assert all(torch.equal(a, b) for a, b in zip(before, cache_tensors(foreign)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_refuses_a_cache_that_already_holds_the_whole_input(variant):
    """generate() feeds the input columns after those the cache consumed; with none left it would feed the whole
    prompt again and the memory would learn it twice."""
    model = tiny_model(variant)
    prompt = random_ids(2, 6)
    cache = TitansCache(model.config)
    sequences = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache=cache)
    filled = prefill(model, prompt, None)
    for used, input_ids in ((filled, prompt), (cache, prompt), (cache, sequences[:, :-1])):
        before = (used.get_seq_length(), cache_tensors(used))
        with pytest.raises(ValueError, match="already consumed"):
            model.generate(input_ids, max_new_tokens=3, do_sample=False, cache=used)
        assert used.get_seq_length() == before[0]
        assert all(torch.equal(a, b) for a, b in zip(before[1], cache_tensors(used)))
    # The intended continuation (the cache's columns plus new ones) still runs as in one go.
    continued = model.generate(sequences, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache=cache)
    in_one_go = model.generate(prompt, max_new_tokens=7, min_new_tokens=7, do_sample=False, use_cache=False)
    assert torch.equal(continued, in_one_go)
