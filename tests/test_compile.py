"""`torch.compile`: a forward pass over unpadded input traces into a single graph, with no graph break, for every
variant. A graph break is where dynamo falls back to Python, typically at a host sync (`.item()`, `bool(tensor)`,
`nonzero`): the input validation, the padding checks and attention's key slicing read no tensor on this path
(`TokenInfo.first_position`). Measured with `torch._dynamo.explain`, which traces without compiling kernels."""

import pytest
import torch

from helpers import random_ids, tiny_model
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
