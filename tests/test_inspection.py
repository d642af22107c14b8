"""`titans inspect`: the recorded gates, surprise and weight norms are the memory's own numbers, and the command
writes its figure, numbers and page with the needle marked where the needle is."""

import copy
import json

import pytest
import torch

from helpers import random_ids, tiny_model
from modeling_titans import TitansByteTokenizer, TitansCache
from modeling_titans.cli import main
from modeling_titans.inspection import trace_memory
from modeling_titans.layers.tokens import TokenInfo
from modeling_titans.ops.naive import naive_token_gradient


@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_trace_holds_the_memorys_own_numbers(variant):
    model = tiny_model(variant)
    ids = random_ids(1, 13)
    trace = trace_memory(model, ids)
    assert len(trace.layers) == model.config.num_hidden_layers
    heads = model.config.memory_num_heads
    for layer in trace.layers:
        assert set(layer) == {"inner_lr", "momentum", "forget", "surprise", "weight_norm"}
        assert all(values.shape == (13, heads) for values in layer.values())
        assert (layer["inner_lr"] > 0).all() and (layer["inner_lr"] <= model.config.memory_lr_max).all()
        assert ((layer["forget"] > 0) & (layer["forget"] < 1)).all() and ((layer["momentum"] > 0) & (layer["momentum"] < 1)).all()

    # The weight norm after the last token is the norm of the state a full forward leaves in the cache.
    cache = TitansCache(model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    for layer, slot in zip(trace.layers, cache.layers):
        weights = slot.state.memory.weights
        expected = torch.stack([w[0].pow(2).sum(dim=(-2, -1)) for w in weights]).sum(0).sqrt()
        torch.testing.assert_close(layer["weight_norm"][-1], expected, rtol=1e-4, atol=1e-5)

    # The first token's surprise is the norm of the inner loss's gradient at M_0, by autograd.
    memory = model.model.layers[0].mixer.memory
    records = {}

    def keep_input(module, args, output):
        records.setdefault("x", args[0])

    handle = memory.register_forward_hook(keep_input)
    with torch.no_grad():
        model(ids[:, :1], cache=TitansCache(model.config), use_cache=True)
    handle.remove()
    x = records["x"]
    tokens = TokenInfo.unpadded(1, 1)
    state = memory.initial_state(1)
    _, k, v, _ = memory.project(x, tokens, state)
    snapshot = [w.double() for w in state.snapshot]
    raw_gradient = copy.copy(memory.network)  # the surprise is the gradient before the step's normalisation
    raw_gradient.normalize_gradient = False
    gradients = naive_token_gradient(raw_gradient, snapshot, k.double(), v.double())
    expected = torch.stack([g[0].pow(2).sum(dim=(-2, -1)) for g in gradients]).sum(0).sqrt()
    torch.testing.assert_close(trace.layers[0]["surprise"][0].double(), expected, rtol=1e-4, atol=1e-6)


def test_trace_shows_each_channels_forgetting():
    """With `memory_forget_per_channel`, alpha is one series per channel and head, the decoding step's own."""
    model = tiny_model("mag", memory_depth=1, memory_forget_per_channel=True)
    ids = random_ids(1, 5)
    layer = trace_memory(model, ids).layers[0]
    heads, channels = model.config.memory_num_heads, model.config.memory_head_dim
    assert layer["forget"].shape == (5, channels * heads) and layer["inner_lr"].shape == (5, heads)
    memory = model.model.layers[0].mixer.memory
    inputs = []
    handle = memory.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    with torch.no_grad():
        model(ids[:, :1], cache=TitansCache(model.config), use_cache=True)
        first = memory.forget_gate(inputs[0])
    handle.remove()
    expected = torch.sigmoid(first[0, 0].view(heads, channels)).t().flatten()  # channel-major, as traced
    torch.testing.assert_close(layer["forget"][0], expected)


def test_inspect_command_marks_the_needle(tmp_path, capsys):
    model = tiny_model("mag")
    model.save_pretrained(tmp_path / "model")
    TitansByteTokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "report"
    assert main(["inspect", str(tmp_path / "model"), "--task", "passkey", "--length", "200", "--output-dir", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert {p.name for p in out.iterdir()} == {"memory_trace.png", "memory_trace.json", "memory_trace.html"}
    report = json.loads((out / "memory_trace.json").read_text())
    start, end = report["marks"]["needle"]
    trace_tokens = len(report["layers"][0]["surprise"])
    assert 0 < start < end < report["marks"]["question"][0] < trace_tokens
    assert f"needle {trace_tokens - end} tokens before the end" in report["title"]
    assert {row["region"] for row in report["region_means"]} == {"needle", "question", "rest"}
    assert "needle" in (out / "memory_trace.html").read_text()


def test_inspect_refuses_a_model_without_memory(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")  # fmt: skip
    TitansByteTokenizer().save_pretrained(tmp_path / "llama")
    assert main(["inspect", str(tmp_path / "llama"), "--length", "200"]) == 2
    assert "has no neural memory" in capsys.readouterr().err
