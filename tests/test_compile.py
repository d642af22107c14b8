"""`torch.compile`: a forward pass over unpadded input traces into a single graph, with no graph break, for every
variant. A graph break is where dynamo falls back to Python, typically at a host sync (`.item()`, `bool(tensor)`,
`nonzero`): the input validation, the padding checks and attention's key slicing read no tensor on this path
(`TokenInfo.first_position`). Measured with `torch._dynamo.explain`, which traces without compiling kernels."""

import pytest
import torch

from helpers import WINDOW, random_ids, tiny_model
from modeling_titans.configuration.configuration_titans import VARIANTS

pytestmark = pytest.mark.slow  # tracing unrolls every chunk: ~10-60 s per test

LENGTH = 20  # five memory chunks, two and a half windows and segments of the tiny preset


def graph_breaks(function, *args) -> list[str]:
    explanation = torch._dynamo.explain(function)(*args)
    assert explanation.graph_count >= 1
    return [reason.reason.splitlines()[0] for reason in explanation.break_reasons]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_traces_without_graph_breaks(variant):
    torch._dynamo.reset()
    model = tiny_model(variant)
    with torch.no_grad():
        assert graph_breaks(model, random_ids(2, LENGTH)) == []


def test_training_step_traces_without_graph_breaks():
    """Forward and loss in training mode (the checkpointed memory scan is a custom autograd function)."""
    torch._dynamo.reset()
    model = tiny_model("mag").train()
    ids = random_ids(2, 8)  # two chunks
    assert graph_breaks(lambda x: model(x, labels=x).loss, ids) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoding_step_traces_without_graph_breaks(variant):
    """A one-token step continuing a cache, before the key buffer is full (appending) and after (overwriting), the
    second with the attention mask generate() passes: the buffer keeps its shape, so nothing is read from a tensor."""
    torch._dynamo.reset()
    model = tiny_model(variant)
    with torch.no_grad():
        cache = model(random_ids(2, LENGTH), use_cache=True).cache
        assert graph_breaks(lambda x: model(x, cache=cache).logits, random_ids(2, 1)) == []
        for step in range(2 * WINDOW):
            model(random_ids(2, 1, seed=step), cache=cache)
        mask = torch.ones(2, cache.get_seq_length() + 1, dtype=torch.long)
        assert graph_breaks(lambda x, m: model(x, attention_mask=m, cache=cache).logits, random_ids(2, 1), mask) == []


def test_compiled_decoding_gives_the_eager_logits():
    """torch.compile (inductor) of the decoding steps of a MAG model: the same logits as the eager steps, past the
    point where the key buffer is full and across memory chunks."""
    torch._dynamo.reset()
    model = tiny_model("mag")
    compiled = torch.compile(model)
    ids = random_ids(2, LENGTH + 3 * WINDOW)
    with torch.no_grad():
        eager_cache = model(ids[:, :LENGTH], use_cache=True).cache
        compiled_cache = model(ids[:, :LENGTH], use_cache=True).cache
        for t in range(LENGTH, ids.shape[1]):
            expected = model(ids[:, t : t + 1], cache=eager_cache).logits
            actual = compiled(ids[:, t : t + 1], cache=compiled_cache).logits
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_compiled_training_step_gives_the_eager_loss_and_gradients():
    """torch.compile (inductor) of a training step of a MAG model with persistent tokens (whose attention masks once
    hit an inductor code-generation error on CPU): the eager loss and parameter gradients."""
    torch._dynamo.reset()
    model = tiny_model("mag").train()
    assert model.config.num_persistent_tokens > 0
    ids = random_ids(2, 8)  # two chunks

    def loss_and_gradients(step):
        model.zero_grad(set_to_none=True)
        loss = step(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected_grads = loss_and_gradients(model)
    actual_loss, actual_grads = loss_and_gradients(torch.compile(model))
    torch.testing.assert_close(actual_loss, expected_loss, rtol=0, atol=1e-5)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
