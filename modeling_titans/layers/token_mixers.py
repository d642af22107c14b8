"""The token mixers of Titans blocks (paper Sec. 4), one class per kind, chosen per layer from `TOKEN_MIXERS`.

    lmm  MemoryOnly       x + Memory(norm(x))
    mal  MemoryAsLayer    x + Memory(norm(x)), then + SlidingWindowAttn(norm(.))
    mag  MemoryAsGate     x + Gate(SlidingWindowAttn(norm(x)), Memory(norm(x)))
    mac  MemoryAsContext  x + per segment: h = M_{s-1}(q), y = Attn([persistent, h, segment]), write u = norm(x + y),
                          Gate(y, M(u)) (x: the block's input)
    swa  SlidingWindowAttentionOnly  x + SlidingWindowAttn(norm(x)), no memory (layers of a converted Llama)

A mixer reads the residual stream and returns what it adds to it (the decoder layer adds it, then the MLP). It
owns its slot of the `TitansCache`: it alone reads and writes `cache.state`, whose type it defines. It also
declares the facts other code needs (`has_attention`, `attention_reach`, `block_size`, what a model card shows),
so the command line, the model card and the benchmarks read them instead of re-deriving them.

MAL, MAG and the memory-less kind can start as a Llama block's attention (`start_as_attention`): the memory's
output projection is zero, so at that point the mixer computes exactly the block's attention and the memory adds
nothing until it is trained (`modeling_titans/upcycling.py`).
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
from .basics import TitansRMSNorm, recompute_in_backward, rms_norm
from .memory_layer import NeuralMemoryState, TitansNeuralMemory
from .tokens import TokenInfo


class TitansOutputGate(nn.Module):
    """o = W_O(RMSNorm_a(y) * sigma(RMSNorm_b(m))): the non-linear gate of MAG (Eq. 28) and MAC (Eq. 25). Without
    `config.gate_attention_norm`, o = W_O(y * sigma(RMSNorm_b(m))): the attention output y is not normalised."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = (
            TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.gate_attention_norm else None
        )
        self.memory_norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.activation = ACT2FN[config.gate_activation]
        self.gate_o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, attended, remembered):
        attn_weight = None if self.attn_norm is None else self.attn_norm.weight
        gated = recompute_in_backward(self.gated, attended, remembered, attn_weight, self.memory_norm.weight)
        return self.gate_o_proj(gated)

    def gated(self, attended, remembered, attn_weight, memory_weight):
        """The product before W_O, from the two norms' weights (recomputed in backward)."""
        if attn_weight is not None:
            attended = rms_norm(attended, attn_weight, self.attn_norm.variance_epsilon)
        return attended * self.activation(rms_norm(remembered, memory_weight, self.memory_norm.variance_epsilon))

    @torch.no_grad()
    def pass_attention(self):
        """Sets the gate to o = y wherever the memory reads m = 0: there sigma(RMSNorm_b(0)) = sigma(0) = c for every
        channel, so W_O = I / c (exact when c is a power of two, as sigmoid's 1/2). Needs the gate without the
        attention norm, which no linear map can undo."""
        if self.attn_norm is not None:
            raise ValueError(
                "gate_attention_norm=True: the output gate RMS-normalises the attention output, so it cannot pass "
                "it unchanged; use gate_attention_norm=False."
            )
        scale = float(self.activation(torch.zeros(())))
        if scale == 0.0:
            raise ValueError("gate_activation is 0 at 0, so the output gate cannot pass attention; use sigmoid.")
        weight = self.gate_o_proj.weight
        weight.copy_(torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device) / scale)


class TokenMixer(nn.Module):
    """A block's sequence mixer: its input norm, its neural memory, and whatever else the kind adds.

    Subclasses implement `mix(hidden_states, tokens, rotary, state, output_attentions)`, which returns
    (what to add to the residual stream, attention weights or None, the state for the next call).
    """

    description: str  # one line for model cards
    config_fields: tuple[str, ...] = ()  # config fields that shape this mixer beyond the memory's
    has_attention = False
    has_memory = True

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
        self.memory = TitansNeuralMemory(config) if self.has_memory else None

    def forward(self, hidden_states, tokens: TokenInfo, rotary, cache=None, output_attentions: bool = False):
        """`cache` is this layer's `TitansLayerCache`; its `state` is read and replaced here."""
        state = None if cache is None else cache.state
        mixed, weights, state = self.mix(hidden_states, tokens, rotary, state, output_attentions)
        if cache is not None:
            cache.state = state
        return mixed, weights

    def mix(self, hidden_states, tokens: TokenInfo, rotary, state, output_attentions: bool):
        raise NotImplementedError

    def silence_memory(self):
        """Zeroes the memory's output projection: the memory then adds exactly 0 wherever its output goes, while
        its other weights (and the gradient reaching that projection) stay as they are."""
        with torch.no_grad():
            self.memory.mem_o_proj.weight.zero_()


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
        return SlidingWindowAttention.reach(config)

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = SlidingWindowAttention(config, layer_idx)

    def start_as_attention(self, norm: nn.Module, attention: nn.Module):
        """Makes this mixer compute exactly `attention(norm(x))` (a Llama block's input RMSNorm and attention,
        whose weights are copied) under the sliding window, the memory adding nothing until it is trained."""
        raise NotImplementedError


class SlidingWindowAttentionOnly(SlidingWindowMixer):
    """Sliding-window attention without a neural memory: the layers of a model converted from Llama that the
    memory was not added to."""

    description = "sliding-window attention without a neural memory"
    has_memory = False

    @classmethod
    def block_size(cls, config) -> int:
        return 1

    def mix(self, hidden_states, tokens, rotary, state: AttentionKeys | None, output_attentions):
        attended, weights, state = self.self_attn(
            self.input_layernorm(hidden_states), tokens, rotary, state, output_attentions=output_attentions
        )
        return attended, weights, state

    def start_as_attention(self, norm: nn.Module, attention: nn.Module):
        self.input_layernorm.load_state_dict(norm.state_dict())
        self.self_attn.load_state_dict(attention.state_dict())


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

    def start_as_attention(self, norm: nn.Module, attention: nn.Module):
        """The attention reads attention_layernorm(x + 0), the memory the same normalised input."""
        self.input_layernorm.load_state_dict(norm.state_dict())
        self.attention_layernorm.load_state_dict(norm.state_dict())
        self.self_attn.load_state_dict(attention.state_dict())
        self.silence_memory()


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

    def start_as_attention(self, norm: nn.Module, attention: nn.Module):
        """The memory reads 0, so the gate is sigma(0) on every channel, which its output projection undoes."""
        self.input_layernorm.load_state_dict(norm.state_dict())
        self.self_attn.load_state_dict(attention.state_dict())
        self.silence_memory()
        self.output_gate.pass_attention()


@dataclass
class MemoryAsContextState:
    memory: NeuralMemoryState | None = None
    attention: AttentionKeys | None = None  # the current segment's retrieved and input tokens
    segment_start: Weights | None = None  # the memory's weights when the current segment began


class MemoryAsContext(TokenMixer):
    """MAC (Sec. 4.1, Eqs. 21-25), one segment after the other; segment s reads the memory that segments < s wrote:

        h_j = M*_{s-1}(q_j)                  retrieve, q_j from the segment's own tokens        (Eq. 21)
        y = Attn([persistent, h, segment])   x_j sees the prefix, h_1..h_j and x_1..x_j         (Eqs. 22-23)
        write u = RMSNorm(r + y)             chunked, each token reads after its own write      (Eq. 24)
        o_j = Gate(y_j, M_j*(u_j))                                                              (Eq. 25)

    What the memory writes and reads (`config.mac_memory_input`): "residual" (default) u_j = RMSNorm(r_j + y_j),
    the block's input r (the residual stream, before the input norm) plus the attention output;
    "normed_attention" RMSNorm(y_j); "attention" y_j itself, the literal Eq. 24. y alone is an average over the
    segment (the vectors of different tokens nearly parallel, so the memory's keys cannot tell them apart) and at
    initialisation ~0.3% of the tokens' scale: the memory stored next to nothing token-specific and MAC did not
    learn the passkey task, with y or RMSNorm(y). The gate's attention side is y in every case.
    """

    description = (
        "**MAC** (memory as a context): each segment attends to learned persistent tokens, to what the neural "
        "memory retrieves for it, and to itself; the memory is written with the attention outputs (by default added "
        "to the block's input and normalised)"
    )
    config_fields = ("segment_size", "mac_memory_input")
    has_attention = True

    @classmethod
    def attention_reach(cls, config) -> int:
        return SegmentAttention.reach(config)

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
        # Eqs. 24-25: what the memory is written with and read by (`config.mac_memory_input`).
        self.memory_input_norm = (
            None
            if config.mac_memory_input == "attention"
            else TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        )

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
            memory_input = self.memory_input(hidden_states[:, start:end], attended)
            remembered, memory = self.memory(memory_input, segment_tokens, memory)
            outputs.append(self.output_gate(attended, remembered))
            weights.append(segment_weights)
            segment_start = select_rows(segment_tokens.closes_block(segment_size), memory.weights, segment_start)
        weights = torch.cat(weights, dim=2) if output_attentions else None
        return torch.cat(outputs, dim=1), weights, MemoryAsContextState(memory, attention, segment_start)

    def memory_input(self, residual, attended):
        """What a segment writes into the memory and reads it with, from the block's input (the residual stream)
        and the attention outputs."""
        kind = self.config.mac_memory_input
        if kind == "attention":
            return attended
        return self.memory_input_norm(residual + attended if kind == "residual" else attended)


# The one table of block kinds: `TitansConfig.mixer_types` names an entry per layer.
TOKEN_MIXERS: dict[str, type[TokenMixer]] = {
    "mac": MemoryAsContext,
    "mag": MemoryAsGate,
    "mal": MemoryAsLayer,
    "lmm": MemoryOnly,
    "swa": SlidingWindowAttentionOnly,
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
