"""generate() with a TitansCache: exactness against one full forward, padding, sampling,
beam search, streamers, pipeline("text-generation") and the refusal of assisted decoding."""

import pytest
import torch
from transformers import DynamicCache, TextStreamer, pipeline

from helpers import (
    CHUNK,
    SEGMENT,
    VARIANTS,
    CollectingStreamer,
    full_logits,
    prefill_then_decode,
    random_ids,
    tiny_model,
)
from modeling_titans import TitansCache
from modeling_titans.tokenization import TitansByteTokenizer


# Continue for more than 3 windows / segments (both 8 tokens) after the prompt.
NEW_TOKENS = 3 * SEGMENT + 2


def greedy(model, input_ids, attention_mask=None, new_tokens=NEW_TOKENS, **kwargs):
    """Greedy generate; returns the sequences and the raw logits of every step, (batch, new_tokens, vocab).
    `min_new_tokens` keeps EOS out, so every row of a batch runs as long as it would alone."""
    outputs = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return outputs.sequences, torch.stack(outputs.logits, dim=1)


def left_pad(prompts: list[torch.Tensor], pad_token_id: int):
    """Left-pads 1D prompts into (input_ids, attention_mask)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------------------
# Exactness of the cache
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt_length", [1, CHUNK, CHUNK + 1, SEGMENT, SEGMENT + CHUNK + 1])  # 1, 4, 5, 8, 13
def test_prefill_then_decode_equals_full_forward(variant, prompt_length):
    model = tiny_model(variant)
    input_ids = random_ids(2, prompt_length + NEW_TOKENS)
    torch.testing.assert_close(
        prefill_then_decode(model, input_ids, prompt_length), full_logits(model, input_ids), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_multi_token_continuation_from_a_mid_chunk_cache(variant):
    model = tiny_model(variant)
    pieces = [5, 7, 4, 1, 11, 8]  # boundaries at 5, 12, 16, 17, 28: mid-chunk, chunk, segment, ...
    input_ids = random_ids(2, sum(pieces))
    cache = TitansCache(model.config)
    logits, start = [], 0
    with torch.no_grad():
        for length in pieces:
            logits.append(model(input_ids[:, start : start + length], cache=cache).logits)
            start += length
    assert cache.get_seq_length() == sum(pieces)
    torch.testing.assert_close(torch.cat(logits, dim=1), full_logits(model, input_ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_past_key_values_is_an_alias_of_cache(variant):
    model = tiny_model(variant)
    input_ids = random_ids(1, 12)
    cache = TitansCache(model.config)
    with torch.no_grad():
        first = model(input_ids[:, :5], past_key_values=cache).logits
        rest = model(input_ids[:, 5:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full_logits(model, input_ids), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# generate(): with and without cache, sampling, continuation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_and_without_cache_gives_identical_tokens(variant):
    model = tiny_model(variant)
    prompt = random_ids(2, 11)
    # A random tiny model tends to repeat one token; the penalty (still greedy) makes it walk through many.
    cached_tokens, cached_logits = greedy(model, prompt, use_cache=True, repetition_penalty=3.0)
    plain_tokens, plain_logits = greedy(model, prompt, use_cache=False, repetition_penalty=3.0)
    assert cached_tokens.shape == (2, 11 + NEW_TOKENS)
    assert torch.equal(cached_tokens, plain_tokens)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=0, atol=1e-4)
    assert len(set(cached_tokens[0, 11:].tolist())) > 1, "degenerate test: the model repeats one token"


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_with_num_return_sequences_is_the_same_with_and_without_cache(variant):
    model = tiny_model(variant)
    prompt = random_ids(2, 6)
    samples = {}
    for use_cache in (True, False):
        torch.manual_seed(1234)
        samples[use_cache] = model.generate(
            prompt, do_sample=True, num_return_sequences=3, max_new_tokens=12, min_new_tokens=12, use_cache=use_cache
        )
    assert samples[True].shape == (6, 18)
    assert torch.equal(samples[True], samples[False])
    assert torch.equal(samples[True][:, :6], prompt.repeat_interleave(3, dim=0))
    assert not torch.equal(samples[True][0], samples[True][1]), "the three samples of a prompt should differ"


@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_continues_from_a_returned_cache(variant):
    model = tiny_model(variant)
    prompt = random_ids(2, 5)
    cache = TitansCache(model.config)
    first = model.generate(prompt, max_new_tokens=7, min_new_tokens=7, do_sample=False, cache=cache)
    continued = model.generate(first, max_new_tokens=9, min_new_tokens=9, do_sample=False, cache=cache)
    in_one_go = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(continued, in_one_go)


# ----------------------------------------------------------------------------------------------------------------
# Left-padded batches
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_matches_each_prompt_alone(variant):
    model = tiny_model(variant)
    lengths = [13, 5, 9, 2]  # padding 0, 8 (a segment), 4 (a chunk), 11 (neither)
    prompts = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    input_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    batch_tokens, batch_logits = greedy(model, input_ids, attention_mask)
    for row, prompt in enumerate(prompts):
        alone_tokens, alone_logits = greedy(model, prompt[None])
        assert torch.equal(batch_tokens[row, -NEW_TOKENS:], alone_tokens[0, -NEW_TOKENS:]), f"row {row}"
        torch.testing.assert_close(batch_logits[row], alone_logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_full_forward_matches_each_prompt_alone(variant):
    model = tiny_model(variant)
    lengths = [3 * SEGMENT + 1, 7, 2 * SEGMENT]
    prompts = [random_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    input_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    batch = full_logits(model, input_ids, attention_mask)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(batch[row, -len(prompt) :], full_logits(model, prompt[None])[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_right_padded_batch_generates_the_same_with_and_without_cache(variant):
    """Without a cache generate() feeds each row's real tokens, its pads, then the generated tokens: a gap that
    must give what the cache gives (pads neither write nor take attention; positions count real tokens)."""
    model = tiny_model(variant)
    lengths = [13, 5, 9]
    input_ids = random_ids(len(lengths), max(lengths), seed=40)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, model.config.pad_token_id)
    cached_tokens, cached_logits = greedy(model, input_ids, attention_mask, use_cache=True, repetition_penalty=3.0)
    plain_tokens, plain_logits = greedy(model, input_ids, attention_mask, use_cache=False, repetition_penalty=3.0)
    assert torch.equal(cached_tokens, plain_tokens)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_is_the_same_with_and_without_cache(variant):
    model = tiny_model(variant)
    prompts = [random_ids(1, 2 * SEGMENT - 3, seed=30)[0], random_ids(1, SEGMENT + 3, seed=31)[0]]  # 13 and 11 > 8
    input_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    results = {}
    for use_cache in (True, False):
        results[use_cache] = model.generate(
            input_ids,
            attention_mask=attention_mask,
            num_beams=3,
            num_return_sequences=2,
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            use_cache=use_cache,
        )
    assert results[True].sequences.shape == (4, 13 + 10)
    assert torch.equal(results[True].sequences, results[False].sequences)
    torch.testing.assert_close(results[True].sequences_scores, results[False].sequences_scores, rtol=0, atol=1e-4)
    # Each prompt's best beam equals the beam search over that prompt alone.
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], num_beams=3, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(results[True].sequences[2 * row, -10:], alone[0, -10:])


# ----------------------------------------------------------------------------------------------------------------
# Streamers and pipeline
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_streamer_receives_the_prompt_then_every_token(variant):
    model = tiny_model(variant)
    prompt = random_ids(1, 9)
    streamer = CollectingStreamer()
    sequence = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, streamer=streamer)
    assert streamer.ended
    assert torch.equal(streamer.chunks[0], prompt[0])
    assert all(len(chunk) == 1 for chunk in streamer.chunks[1:])
    assert torch.equal(torch.cat(streamer.chunks), sequence[0])


def test_text_streamer_prints_the_generated_text(capsys):
    model = tiny_model("mal")
    tokenizer = TitansByteTokenizer()
    prompt = tokenizer("Titans remember", return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    sequence = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(sequence[0, prompt.shape[1] :]) + "\n"


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_generation_pipeline(variant):
    model = tiny_model(variant)
    tokenizer = TitansByteTokenizer()  # pads on the left
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["The memory learns", "at test time."]
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    batched = generator(prompts, batch_size=2, **settings)
    for prompt, result in zip(prompts, batched):
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = tokenizer.decode(model.generate(prompt_ids, **settings)[0], skip_special_tokens=True)
        assert result[0]["generated_text"] == expected
        assert expected.startswith(prompt) and len(expected.encode()) > len(prompt.encode())


# ----------------------------------------------------------------------------------------------------------------
# Refused modes
# ----------------------------------------------------------------------------------------------------------------


# transformers up to 5.24 refuses assisted generation for stateful models itself; from 5.25 on it asks the cache to
# record its past for rollback, which TitansCache refuses.
ASSISTED_REFUSAL = "assisted generation is not supported with stateful models|cannot take part in assisted generation"


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_assisted_decoding_is_refused(variant):
    model = tiny_model(variant)
    prompt = random_ids(1, 6)
    with pytest.raises(ValueError, match=ASSISTED_REFUSAL):
        model.generate(prompt, assistant_model=tiny_model(variant, seed=1), max_new_tokens=4, do_sample=False)
    with pytest.raises(ValueError, match=ASSISTED_REFUSAL):
        model.generate(prompt, prompt_lookup_num_tokens=2, max_new_tokens=4, do_sample=False)


def test_other_cache_implementations_are_refused():
    model = tiny_model("mag")
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        model.generate(random_ids(1, 6), cache_implementation="static", max_new_tokens=2)


def test_generate_refuses_a_dynamic_cache():
    model = tiny_model("mac")
    with pytest.raises(TypeError, match="Titans generates with a TitansCache, got DynamicCache"):
        model.generate(random_ids(1, 6), cache=DynamicCache(), max_new_tokens=2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_padded_single_token_step_leaves_that_row_untouched(variant):
    """A one-token forward in which one row's token is padding (attention_mask 0) must not write that row's
    memory: its later logits equal those of the row decoded without the padded step."""
    model = tiny_model(variant)
    input_ids = random_ids(2, 12)
    with torch.no_grad():
        cache = TitansCache(model.config)
        model(input_ids[:, :7], cache=cache)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 7] = 0
        model(input_ids[:, 7:8], attention_mask=mask, cache=cache)
        mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], dim=1)
        padded = model(input_ids[:, 8:], attention_mask=mask, cache=cache).logits
        alone_cache = TitansCache(model.config)
        model(input_ids[1:, :7], cache=alone_cache)
        alone = model(input_ids[1:, 8:], cache=alone_cache).logits
    torch.testing.assert_close(padded[1:], alone, rtol=0, atol=1e-4)
