"""The block structure: the table of token mixers, per-layer mixers (hybrids), the facts mixers declare, and
checkpoints of the previous weight layout."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import CHUNK, SEGMENT, WINDOW, full_logits, prefill_then_decode, random_ids, tiny_config, tiny_model
from modeling_titans import TitansCache, TitansConfig, TitansForCausalLM
from modeling_titans.configuration.configuration_titans import MIXER_KINDS, TITANS_FORMAT_VERSION, VARIANTS
from modeling_titans.layers.token_mixers import TOKEN_MIXERS, attention_reach, block_size, has_attention
from modeling_titans.ops import chunk_scan

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_every_variant_has_one_mixer_class():
    assert set(TOKEN_MIXERS) == set(MIXER_KINDS) and set(VARIANTS) < set(MIXER_KINDS)
    assert len(set(TOKEN_MIXERS.values())) == len(MIXER_KINDS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_layer_holds_the_mixer_of_its_variant(variant):
    model = tiny_model(variant)
    assert all(type(layer.mixer) is TOKEN_MIXERS[variant] for layer in model.model.layers)


@pytest.mark.parametrize(
    "variant, reach, block, attends",
    [("mac", SEGMENT, SEGMENT, True), ("mag", WINDOW, CHUNK, True), ("mal", WINDOW, CHUNK, True), ("lmm", 0, CHUNK, False)],
)
def test_mixers_declare_reach_block_and_attention(variant, reach, block, attends):
    config = tiny_config(variant)
    assert (attention_reach(config), block_size(config), has_attention(config)) == (reach, block, attends)


HYBRID = ["lmm", "mac"]


def test_hybrid_model_runs_a_mixer_per_layer_and_decodes_exactly():
    """A model whose layers mix kinds: the widest reach and the longest block count for the model, and
    prefill + token-by-token decoding over chunk and segment boundaries gives the full forward's logits."""
    config = tiny_config("mag", mixer_types=HYBRID)
    torch.manual_seed(0)
    model = TitansForCausalLM(config).eval()
    assert [type(layer.mixer) for layer in model.model.layers] == [TOKEN_MIXERS[kind] for kind in HYBRID]
    assert (attention_reach(config), block_size(config)) == (SEGMENT, SEGMENT)
    input_ids = random_ids(2, 2 * SEGMENT + 5)
    expected = full_logits(model, input_ids)
    torch.testing.assert_close(prefill_then_decode(model, input_ids, SEGMENT + 3), expected, rtol=0, atol=1e-4)


def test_layers_without_memory_decode_exactly():
    """Sliding-window attention without a memory ("swa", the layers a converted Llama leaves without one) next to
    a memory layer: its reach is the window, it needs no block alignment, and decoding gives the full forward."""
    config = tiny_config("mag", mixer_types=["swa", "mal"])
    assert (attention_reach(config), block_size(config), has_attention(config)) == (WINDOW, CHUNK, True)
    torch.manual_seed(0)
    model = TitansForCausalLM(config).eval()
    assert model.model.layers[0].mixer.memory is None
    model.set_memory_writes(False)
    model.set_memory_writes(True)
    input_ids = random_ids(2, 3 * WINDOW + 1)
    expected = full_logits(model, input_ids)
    torch.testing.assert_close(prefill_then_decode(model, input_ids, WINDOW + 3), expected, rtol=0, atol=1e-4)


def test_set_memory_scan_compiled_routes_every_memory_layer_through_the_compiled_steps(monkeypatch):
    """The switch reaches each layer with a memory (not the "swa" one) and only the scan uses it; the compiled
    steps' own numbers are `tests/test_chunk_scan.py`'s (here they are counted eager steps, to stay fast)."""
    calls = []

    def counted(step):
        def run(*args, **kwargs):
            calls.append(step.__name__)
            return step(*args, **kwargs)
        return run

    monkeypatch.setattr(chunk_scan, "compiled_chunk_steps", lambda: chunk_scan.ChunkSteps(
        *(counted(step) for step in chunk_scan.EAGER_STEPS)
    ))
    torch.manual_seed(0)
    model = TitansForCausalLM(tiny_config("mag", mixer_types=["swa", "mal"])).train()
    input_ids = random_ids(2, 2 * CHUNK)
    expected = model(input_ids, labels=input_ids).loss
    assert calls == []
    model.set_memory_scan_compiled(True)
    assert [layer.mixer.memory is not None and layer.mixer.memory.compile_scan for layer in model.model.layers] == [
        False, True
    ]
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert {"gradient_factors", "chunk_read", "_end_state_backward"} < set(calls)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    model.set_memory_scan_compiled(False)
    calls.clear()
    model(input_ids, labels=input_ids).loss.backward()
    assert calls == []


@pytest.mark.parametrize(
    "mixer_types", [["mag"], ["mag", "moe"], "mag"], ids=["too-few", "unknown-kind", "not-a-list"]
)
def test_mixer_types_must_name_a_known_kind_per_layer(mixer_types):
    with pytest.raises(ValueError, match="TitansConfig.mixer_types="):
        tiny_config("mag", mixer_types=mixer_types)


def test_changing_the_variant_of_a_saved_config_resets_its_mixers(tmp_path):
    """`mixer_types` defaults to the variant in every layer; a config built from another's dict with a new variant
    and `mixer_types=None` gets the new kind everywhere."""
    config = tiny_config("mag")
    other = TitansConfig.from_dict({**config.to_dict(), "variant": "mac", "mixer_types": None})
    assert other.mixer_types == ["mac"] * config.num_hidden_layers


@pytest.mark.parametrize("variant", ["mac", "mal"])
def test_format_1_checkpoints_load_with_renamed_weights_and_the_same_logits(variant, tmp_path):
    """A checkpoint saved by the previous layout (token mixer's modules directly in the decoder layer, M_0 in the
    memory module) loads into the current one with the logits it gave then, and saves in the current format."""
    folder = os.path.join(FIXTURES, f"format1-{variant}")
    expected = load_file(os.path.join(folder, "expected_logits.safetensors"))
    model = TitansForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = TitansForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.titans_format_version == TITANS_FORMAT_VERSION
    torch.testing.assert_close(full_logits(reloaded, expected["input_ids"]), full_logits(model, expected["input_ids"]))


def test_hybrid_model_returns_the_attention_weights_of_its_attention_layers():
    """A hybrid's LMM layers have no attention; its MAC layers two key columns per input column (the retrieved
    token, then the token), also when a continuation from mid-segment runs token by token."""
    config = tiny_config("mag", mixer_types=["lmm", "mac", "mag"], num_hidden_layers=3, attn_implementation="eager")
    torch.manual_seed(0)
    model = TitansForCausalLM(config).eval()
    input_ids = random_ids(2, SEGMENT + 6)
    persistent = config.num_persistent_tokens
    with torch.no_grad():
        full = model(input_ids, output_attentions=True).attentions
        cache = TitansCache(config)
        model(input_ids[:, :5], cache=cache)
        continued = model(input_ids[:, 5:], cache=cache, output_attentions=True).attentions
    assert [w.shape[-1] for w in full] == [persistent + 2 * (SEGMENT + 6), persistent + SEGMENT + 6]
    for weights, part in zip(full, continued):
        torch.testing.assert_close(part, weights[:, :, 5:], rtol=0, atol=1e-5)


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
def test_rope_scaling_gives_llamas_rotary_embedding(name):
    """Each RoPE type computes the cos / sin of transformers' Llama for the same rope_parameters (the dynamic one
    past max_position_embeddings, where it starts to scale)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from modeling_titans.layers.basics import TitansRotaryEmbedding

    rope = {**ROPE_SCALINGS[name], "rope_theta": 500.0}
    config = tiny_config("mag", rope_parameters=dict(rope), max_position_embeddings=32)
    llama = LlamaConfig(
        hidden_size=32, num_attention_heads=4, rope_parameters=dict(rope), max_position_embeddings=32
    )
    x = torch.zeros(1, dtype=torch.float32)
    for length in (20, 50):
        positions = torch.arange(length)[None]
        ours = TitansRotaryEmbedding(config)(x, positions)
        theirs = LlamaRotaryEmbedding(llama)(x, positions)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "yarn"])
def test_a_model_with_rope_scaling_decodes_exactly_and_differs_from_plain_rope(name):
    config = tiny_config("mag", rope_parameters=dict(ROPE_SCALINGS[name]))
    torch.manual_seed(0)
    model = TitansForCausalLM(config).eval()
    input_ids = random_ids(2, 2 * SEGMENT + 5)
    expected = full_logits(model, input_ids)
    torch.testing.assert_close(prefill_then_decode(model, input_ids, SEGMENT + 3), expected, rtol=0, atol=1e-4)
    assert (expected - full_logits(tiny_model("mag"), input_ids)).abs().max() > 1e-3


def test_mlp_and_gate_activations_follow_the_config():
    input_ids = random_ids(1, 12)
    plain = full_logits(tiny_model("mag"), input_ids)
    for overrides in ({"hidden_act": "gelu"}, {"gate_activation": "tanh"}):
        model = tiny_model("mag", **overrides)
        assert (full_logits(model, input_ids) - plain).abs().max() > 1e-4, overrides


def memory_inputs(model, input_ids) -> list[torch.Tensor]:
    """What each layer's neural memory is written with (and read by) in a forward pass of `input_ids`."""
    seen = []
    hooks = [
        layer.mixer.memory.register_forward_hook(lambda module, args, output: seen.append(args[0]))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        full_logits(model, input_ids)
    for hook in hooks:
        hook.remove()
    return seen


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def cosine_between_tokens(x: torch.Tensor) -> float:
    """Mean cosine similarity between the vectors of different tokens of a row (batch, T, hidden)."""
    unit = torch.nn.functional.normalize(x, dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    length = x.shape[1]
    return float((similarity.sum((1, 2)) - length).mean() / (length * (length - 1)))


def test_mac_writes_its_memory_with_distinct_unit_scale_tokens():
    """The literal Eq. 24 writes the attention outputs y into the memory. They are averages over the segment, so
    different tokens give nearly parallel vectors the memory's keys cannot tell apart, and at initialisation they
    leave the attention's output projection (N(0, 0.02)) at ~0.3% of the tokens' scale: MAC did not learn the
    passkey task. The default `mac_memory_input="residual"` writes RMSNorm(r + y): unit scale, and in the first
    layer as distinct per token as MAG's input (the embeddings)."""
    input_ids = random_ids(2, 2 * SEGMENT)
    residual = memory_inputs(tiny_model("mac"), input_ids)  # layer 1's segments, then layer 2's
    attention = memory_inputs(tiny_model("mac", mac_memory_input="attention"), input_ids)
    for written, literal in zip(residual, attention):
        assert 0.9 < rms(written) < 1.1 and rms(literal) < 0.05
        assert cosine_between_tokens(written) < cosine_between_tokens(literal) - 0.2
    assert all(cosine_between_tokens(written) < 0.1 for written in residual[:2])  # layer 1: the embeddings
    assert all(cosine_between_tokens(literal) > 0.5 for literal in attention)
    for written in memory_inputs(tiny_model("mac", mac_memory_input="normed_attention"), input_ids):
        assert 0.9 < rms(written) < 1.1
    for written in memory_inputs(tiny_model("mag"), input_ids):  # MAG's memory reads the normalised tokens
        assert 0.9 < rms(written) < 1.1


def test_a_format_3_mac_checkpoint_keeps_writing_raw_attention_outputs(tmp_path):
    """A config saved before titans_format_version 4 has no `mac_memory_input`: it loads with "attention", so a MAC
    checkpoint trained then has no `memory_input_norm` weights to miss and gives the logits it gave then; saved
    again, it keeps the setting. A new config gets "residual"."""
    model = tiny_model("mac", mac_memory_input="attention")
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    fields = json.loads(path.read_text())
    del fields["mac_memory_input"]
    fields["titans_format_version"] = 3
    path.write_text(json.dumps(fields))
    reloaded = TitansForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.mac_memory_input == "attention"
    assert all(layer.mixer.memory_input_norm is None for layer in reloaded.model.layers)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[name], loaded[name]) for name in saved)
    input_ids = random_ids(2, 2 * SEGMENT + 3)
    torch.testing.assert_close(full_logits(reloaded, input_ids), full_logits(model, input_ids), rtol=0, atol=1e-5)
    reloaded.save_pretrained(tmp_path / "again")
    assert TitansConfig.from_pretrained(tmp_path / "again").mac_memory_input == "attention"
    assert TitansConfig.from_preset("tiny", variant="mac").mac_memory_input == "residual"


@pytest.mark.parametrize("memory_input", ["residual", "normed_attention"])
def test_mac_with_a_normalised_memory_input_decodes_exactly(memory_input):
    """The norm acts per token, so prefill + token-by-token decoding over segment boundaries still gives the full
    forward's logits."""
    model = tiny_model("mac", mac_memory_input=memory_input)
    assert all(layer.mixer.memory_input_norm is not None for layer in model.model.layers)
    input_ids = random_ids(2, 2 * SEGMENT + 5)
    expected = full_logits(model, input_ids)
    torch.testing.assert_close(prefill_then_decode(model, input_ids, SEGMENT + 3), expected, rtol=0, atol=1e-4)
