"""The token mixers of Titans blocks (paper Sec. 4), one class per kind, chosen per layer from `TOKEN_MIXERS`.

    lmm  MemoryOnly       x + Memory(norm(x))
    mal  MemoryAsLayer    x + Memory(norm(x)), then + SlidingWindowAttn(norm(.))
    mag  MemoryAsGate     x + Gate(SlidingWindowAttn(norm(x)), Memory(norm(x)))
    mac  MemoryAsContext  x + per segment: h = M_{s-1}(q), y = Attn([persistent, h, segment]), write y, Gate(y, M(y))

A mixer reads the residual stream and returns what it adds to it (the decoder layer adds it, then the MLP). It
owns its slot of the `TitansCache`: it alone reads and writes `cache.state`, whose type it defines. It also
declares the facts other code needs (`has_attention`, `attention_reach`, `block_size`, what a model card shows),
so the command line, the model card and the benchmarks read them instead of re-deriving them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..ops.memory_network import Weights
from ..ops.neural_memory import select_rows
from .attention import AttentionKeys, SegmentAttention, SlidingWindowAttention
from .basics import TitansRMSNorm
from .memory_layer import NeuralMemoryState, TitansNeuralMemory
from .tokens import TokenInfo

class TitansOutputGate(nn.Module):
    """o = W_O(RMSNorm_a(y) * sigma(RMSNorm_b(m))): the non-linear gate of MAG (Eq. 28) and MAC (Eq. 25)."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.memory_norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.activation = ACT2FN[config.gate_activation]
        self.gate_o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, attended, remembered):
        return self.gate_o_proj(self.attn_norm(attended) * self.activation(self.memory_norm(remembered)))


class TokenMixer(nn.Module):
    """A block's sequence mixer: its input norm, its neural memory, and whatever else the kind adds.

    Subclasses implement `mix(hidden_states, tokens, rotary, state, output_attentions)`, which returns
    (what to add to the residual stream, attention weights or None, the state for the next call).
    """

    description: str  # one line for model cards
    config_fields: tuple[str, ...] = ()  # config fields that shape this mixer beyond the memory's
    has_attention = False

    @classmethod
    def attention_reach(cls, config) -> int:
        """How many tokens back (the current one included) attention sees; 0 without attention."""
        return 0

    @classmethod
    def block_size(cls, config) -> int:
        """The parallel forms need every row to start a forward pass on a multiple of this many tokens."""
        return config.memory_chunk_size

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.input_layernorm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.memory = TitansNeuralMemory(config)

    def forward(self, hidden_states, tokens: TokenInfo, rotary, cache=None, output_attentions: bool = False):
        """`cache` is this layer's `TitansLayerCache`; its `state` is read and replaced here."""
        state = None if cache is None else cache.state
        mixed, weights, state = self.mix(hidden_states, tokens, rotary, state, output_attentions)
        if cache is not None:
            cache.state = state
        return mixed, weights

    def mix(self, hidden_states, tokens: TokenInfo, rotary, state, output_attentions: bool):
        raise NotImplementedError


class MemoryOnly(TokenMixer):
    """LMM (Sec. 4.3, "memory without attention"): the neural memory alone."""

    description = "**LMM**: the neural long-term memory alone, without attention"

    def mix(self, hidden_states, tokens, rotary, state: NeuralMemoryState | None, output_attentions):
        remembered, state = self.memory(self.input_layernorm(hidden_states), tokens, state)
        return remembered, None, state


@dataclass
class MemoryAndAttentionState:
    memory: NeuralMemoryState | None = None
    attention: AttentionKeys | None = None


class SlidingWindowMixer(TokenMixer):
    """The mixers whose attention sees a sliding window of `sliding_window` tokens (MAL, MAG)."""

    config_fields = ("sliding_window",)
    has_attention = True

    @classmethod
    def attention_reach(cls, config) -> int:
        return config.sliding_window

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = SlidingWindowAttention(config, layer_idx)


class MemoryAsLayer(SlidingWindowMixer):
    """MAL (Sec. 4.3, Eqs. 29-31): a memory layer, then sliding-window attention over its output."""

    description = "**MAL** (memory as a layer): a neural-memory layer followed by sliding-window attention"

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attention_layernorm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def mix(self, hidden_states, tokens, rotary, state: MemoryAndAttentionState | None, output_attentions):
        state = state or MemoryAndAttentionState()
        remembered, memory = self.memory(self.input_layernorm(hidden_states), tokens, state.memory)
        attended, weights, attention = self.self_attn(
            self.attention_layernorm(hidden_states + remembered), tokens, rotary, state.attention,
            output_attentions=output_attentions,
        )
        return remembered + attended, weights, MemoryAndAttentionState(memory, attention)


class MemoryAsGate(SlidingWindowMixer):
    """MAG (Sec. 4.2, Eqs. 26-28): sliding-window attention and the memory read the same input; a non-linear
    gate combines them."""

    description = (
        "**MAG** (memory as a gate): sliding-window attention and the neural memory read the same input and a "
        "gate combines them"
    )

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.output_gate = TitansOutputGate(config)

    def mix(self, hidden_states, tokens, rotary, state: MemoryAndAttentionState | None, output_attentions):
        state = state or MemoryAndAttentionState()
        x = self.input_layernorm(hidden_states)
        attended, weights, attention = self.self_attn(
            x, tokens, rotary, state.attention, output_attentions=output_attentions
        )
        remembered, memory = self.memory(x, tokens, state.memory)
        return self.output_gate(attended, remembered), weights, MemoryAndAttentionState(memory, attention)


@dataclass
class MemoryAsContextState:
    memory: NeuralMemoryState | None = None
    attention: AttentionKeys | None = None  # the current segment's retrieved and input tokens
    segment_start: Weights | None = None  # the memory's weights when the current segment began


class MemoryAsContext(TokenMixer):
    """MAC (Sec. 4.1, Eqs. 21-25), one segment after the other; segment s reads the memory that segments < s wrote:

        h_j = M*_{s-1}(q_j)                  retrieve, q_j from the segment's own tokens        (Eq. 21)
        y = Attn([persistent, h, segment])   x_j sees the prefix, h_1..h_j and x_1..x_j         (Eqs. 22-23)
        write y into the memory              chunked, each token reads after its own write      (Eq. 24)
        o_j = Gate(y_j, M_j*(y_j))                                                              (Eq. 25)
    """

    description = (
        "**MAC** (memory as a context): each segment attends to learned persistent tokens, to what the neural "
        "memory retrieves for it, and to itself; the memory is written with the attention outputs"
    )
    config_fields = ("segment_size",)
    has_attention = True

    @classmethod
    def attention_reach(cls, config) -> int:
        return config.segment_size

    @classmethod
    def block_size(cls, config) -> int:
        return config.segment_size

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = SegmentAttention(config, layer_idx)
        # Eq. 21: the queries that retrieve h_t = M*_{t-1}(q_t) from the memory before the segment.
        self.retrieve_q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.retrieve_o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.output_gate = TitansOutputGate(config)

    def mix(self, hidden_states, tokens, rotary, state: MemoryAsContextState | None, output_attentions):
        x = self.input_layernorm(hidden_states)
        segment_size = self.config.segment_size
        state = state or MemoryAsContextState()
        memory = state.memory or self.memory.initial_state(x.shape[0])
        segment_start = state.segment_start or memory.weights
        attention = state.attention
        cos, sin = rotary
        outputs, weights = [], []
        for start in range(0, x.shape[1], segment_size):
            end = start + segment_size
            segment, segment_tokens = x[:, start:end], tokens.slice(start, end)
            retrieved = self.retrieve_o_proj(self.memory.recall(segment_start, self.retrieve_q_proj(segment)))
            attended, segment_weights, attention = self.self_attn(
                segment, segment_tokens, (cos[:, start:end], sin[:, start:end]), attention,
                memory_tokens=retrieved, output_attentions=output_attentions,
            )
            remembered, memory = self.memory(attended, segment_tokens, memory)
            outputs.append(self.output_gate(attended, remembered))
            weights.append(segment_weights)
            segment_start = select_rows(segment_tokens.closes_block(segment_size), memory.weights, segment_start)
        weights = torch.cat(weights, dim=2) if output_attentions else None
        return torch.cat(outputs, dim=1), weights, MemoryAsContextState(memory, attention, segment_start)


# The one table of block kinds: `TitansConfig.mixer_types` names an entry per layer.
TOKEN_MIXERS: dict[str, type[TokenMixer]] = {
    "mac": MemoryAsContext,
    "mag": MemoryAsGate,
    "mal": MemoryAsLayer,
    "lmm": MemoryOnly,
}


def mixer_classes(config) -> list[type[TokenMixer]]:
    return [TOKEN_MIXERS[kind] for kind in config.mixer_types]


def has_attention(config) -> bool:
    return any(cls.has_attention for cls in mixer_classes(config))


def attention_reach(config) -> int:
    """How far back the model's attention sees (its widest layer); 0 for a model without attention."""
    return max(cls.attention_reach(config) for cls in mixer_classes(config))


def block_size(config) -> int:
    """Every forward pass of several tokens must start each row on a multiple of this (all layers' blocks)."""
    return math.lcm(*(cls.block_size(config) for cls in mixer_classes(config)))
