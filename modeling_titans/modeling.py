"""Titans language models for Hugging Face Transformers: MAC, MAG, MAL and LMM (paper Sec. 4, design D6-D10).

The memory's math lives in `neural_memory.py`; this file wires it into Llama-style blocks:

    LMM  x + Memory(norm(x))                                 then the SwiGLU MLP
    MAL  x + Memory(norm(x)), then + SlidingWindowAttn(norm(.)) then the MLP
    MAG  x + Gate(SlidingWindowAttn(norm(x)), Memory(norm(x))) then the MLP
    MAC  x + per segment: retrieve h = M_{s-1}(q), y = Attn([persistent, h, segment]), write y, Gate(y, M(y))

Padding: inside the model every row is "compacted" so that its real tokens start at column 0 of the new input;
positions count real tokens only, and pads never write into the memory nor take attention. Chunk and segment
boundaries therefore count from each row's first real token (D10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from .cache_titans import AttentionKeys, TitansCache, TitansLayerCache
from .configuration.configuration_titans import VARIANTS, TitansConfig
from .neural_memory import (
    MemoryState,
    compute_dtype,
    initial_state,
    memory_read,
    neural_memory_scan,
    neural_memory_step,
    select_rows,
)

GATE_ACTIVATIONS = {"sigmoid": torch.sigmoid, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class TokenInfo:
    """Where the tokens of one forward pass stand, per row (compact layout: real tokens first)."""

    positions: torch.Tensor  # (batch, T) long: index of the token among its row's real tokens
    valid: torch.Tensor  # (batch, T) bool: real token (False for padding)
    seen: torch.Tensor  # (batch,) real tokens written before this pass
    all_valid: bool  # no padding at all (lets the hot path skip masking)

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    def slice(self, start: int, end: int) -> "TokenInfo":
        valid = self.valid[:, start:end]
        seen = self.seen + self.valid[:, :start].sum(dim=1)
        return TokenInfo(self.positions[:, start:end], valid, seen, self.all_valid)

    def closes_block(self, block_size: int) -> torch.Tensor:
        """(batch,) bool: the row wrote a token in this pass and its last one ends a block of `block_size`."""
        total = self.seen + self.lengths
        return (self.lengths > 0) & (total % block_size == 0)


class TitansRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class TitansRotaryEmbedding(nn.Module):
    """RoPE; the frequencies are computed on the fly (a handful of values), so no buffer needs initialising."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.base = config.rope_theta

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        exponents = torch.arange(0, self.head_dim, 2, device=x.device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.base**exponents)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, T, head_dim); cos, sin (batch, T, head_dim)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class TitansMLP(nn.Module):
    """SwiGLU channel mixer (Llama)."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TitansGate(nn.Linear):
    """Linear map to one gate logit per memory head; `bias_init` is the gate's initial value (D3)."""

    def __init__(self, hidden_size: int, num_heads: int, initial_value: float):
        super().__init__(hidden_size, num_heads)
        self.bias_init = math.log(initial_value / (1 - initial_value))


class MemoryProjection(nn.Linear):
    """q, k or v projection of the memory, initialised at unit scale per output channel (std 1/sqrt(d_in)): the
    memory's own output x + LN(.) has unit-scale channels, so small values would leave the inner loss dominated
    by the LayerNorm branch and the memory would barely store anything at the start of training."""


class CausalDepthwiseConv(nn.Conv1d):
    """Weights of the causal depthwise convolution on the memory's q, k, v (Sec. 4.4), initialised as the identity
    (only the tap on the current token is 1) so that it does not shrink q, k, v at the start of training. It is
    applied by `TitansNeuralMemory.causal_conv`, which keeps the causal tail between calls."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=False)


class MemoryInitialWeights(nn.ParameterList):
    """M_0: the learned initial weights of every memory head, one (heads, d_in, d_out) tensor per layer (D2)."""


@dataclass
class MixerState:
    """What the memory token mixer carries from one call to the next."""

    memory: MemoryState
    conv_tail: torch.Tensor | None  # (batch, kernel - 1, 3 * hidden): last inputs of the causal convolution


class TitansNeuralMemory(nn.Module):
    """The neural long-term memory as a token mixer (Sec. 3.1 and 4.4, D2-D6).

    q, k, v = SiLU(causal depthwise conv(Linear(x))), q and k l2-normalised per head; per-token, per-head gates
    alpha (forget), eta (momentum) and theta (inner learning rate) from x; every token writes (k, v) into the
    memory and reads M_t(q_t) after its write; output o = W_O(RMSNorm(y) * SiLU(W_G x)).

    The projections are named `mem_*` so that PEFT can target them apart from attention's `q_proj` etc.
    """

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.memory_num_heads
        self.head_dim = config.memory_head_dim
        self.chunk_size = config.memory_chunk_size
        hidden = config.hidden_size
        self.mem_q_proj = MemoryProjection(hidden, hidden, bias=False)
        self.mem_k_proj = MemoryProjection(hidden, hidden, bias=False)
        self.mem_v_proj = MemoryProjection(hidden, hidden, bias=False)
        self.conv = CausalDepthwiseConv(3 * hidden, config.conv_kernel_size) if config.use_conv else None
        self.forget_gate = (
            TitansGate(hidden, self.num_heads, config.memory_forget_init) if config.use_forgetting else None
        )  # alpha_t
        self.momentum_gate = (
            TitansGate(hidden, self.num_heads, config.memory_momentum_init) if config.use_momentum else None
        )  # eta_t
        self.lr_gate = TitansGate(hidden, self.num_heads, config.memory_lr_init)  # theta_t / theta_max
        # M_0: learned initial weights per head (D2); layer l maps d_in -> d_out on row vectors.
        dims = [self.head_dim] + [self.head_dim * config.memory_expansion] * (config.memory_depth - 1) + [self.head_dim]
        self.initial_weights = MemoryInitialWeights(
            nn.Parameter(torch.empty(self.num_heads, d_in, d_out)) for d_in, d_out in zip(dims[:-1], dims[1:])
        )
        self.out_norm = TitansRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.writes_enabled = True  # False: the memory stays at M_0 (an ablation at test time; not saved)
        self.mem_gate_proj = nn.Linear(hidden, hidden, bias=False)
        self.mem_o_proj = nn.Linear(hidden, hidden, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, T, hidden) -> (batch, heads, T, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def fresh_state(self, batch_size: int) -> MixerState:
        memory = initial_state(list(self.initial_weights), batch_size, use_momentum=self.config.use_momentum)
        return MixerState(memory=memory, conv_tail=None)

    def causal_conv(self, x: torch.Tensor, tail: torch.Tensor | None, tokens: TokenInfo):
        """Depthwise causal convolution over (tail ++ x); returns the output and the new tail (last inputs of
        each row's real tokens).

        Written as a sum over the kernel's taps, out_t = sum_j w_j * extended_{t + j}: the same numbers as
        `self.conv` (whose weight it uses), several times faster on CPU for a single decoded token (Conv1d's
        setup dominates there) and no slower for long inputs."""
        seq_len = x.shape[1]
        kernel = self.conv.kernel_size[0]
        if tail is None:
            tail = x.new_zeros(x.shape[0], kernel - 1, x.shape[2])
        extended = torch.cat([tail, x], dim=1)  # (batch, kernel - 1 + T, channels)
        taps = self.conv.weight[:, 0, :]  # (channels, kernel)
        out = sum(extended[:, j : j + seq_len] * taps[:, j] for j in range(kernel))
        if tokens.all_valid:  # every row ends at column T - 1 (a copy: a view would keep `extended` alive)
            return out, extended[:, seq_len:].clone()
        index = tokens.lengths.view(-1, 1, 1) + torch.arange(kernel - 1, device=x.device).view(1, -1, 1)
        new_tail = extended.gather(1, index.expand(-1, -1, x.shape[2]))
        return out, new_tail

    def gates(self, x: torch.Tensor):
        """log(1 - alpha_t), log(eta_t) (None without momentum) and theta_t, each (batch, heads, T), in fp32 (D11)."""
        x = x.to(compute_dtype(x.dtype))
        zeros = x.new_zeros(x.shape[0], self.num_heads, x.shape[1])
        if not self.writes_enabled:  # the memory stays at M_0: nothing written, nothing forgotten
            return zeros, None if self.momentum_gate is None else zeros, zeros

        def logits(gate):  # (batch, heads, T)
            return F.linear(x, gate.weight.to(x.dtype), gate.bias.to(x.dtype)).transpose(1, 2)

        log_retain = zeros if self.forget_gate is None else F.logsigmoid(-logits(self.forget_gate))
        log_momentum = None if self.momentum_gate is None else F.logsigmoid(logits(self.momentum_gate))
        lr = self.config.memory_lr_max * torch.sigmoid(logits(self.lr_gate))
        return log_retain, log_momentum, lr

    def retrieve(self, weights, queries: torch.Tensor) -> torch.Tensor:
        """M*(q) for already l2-normalised queries (batch, T, hidden) -> (batch, T, hidden), no write."""
        reads = memory_read(weights, self.split_heads(queries).to(weights[0].dtype))
        return reads.transpose(1, 2).flatten(2).to(queries.dtype)

    def forward(self, x: torch.Tensor, tokens: TokenInfo, state: MixerState | None):
        """x (batch, T, hidden) -> output (batch, T, hidden) and the state after the last real token."""
        batch_size, seq_len, _ = x.shape
        state = state if state is not None else self.fresh_state(batch_size)
        if not tokens.all_valid:
            x = x * tokens.valid.unsqueeze(-1).to(x.dtype)
        qkv = torch.cat([self.mem_q_proj(x), self.mem_k_proj(x), self.mem_v_proj(x)], dim=-1)
        conv_tail = None
        if self.conv is not None:
            qkv, conv_tail = self.causal_conv(qkv, state.conv_tail, tokens)
        q, k, v = (self.split_heads(t) for t in F.silu(qkv).chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        log_retain, log_momentum, lr = self.gates(x)
        write_mask = None if tokens.all_valid else tokens.valid
        if seq_len == 1:
            closes_chunk = (tokens.seen + 1) % self.chunk_size == 0
            row_mask = None if write_mask is None else write_mask[:, 0]
            reads, memory = neural_memory_step(
                state.memory, q, k, v, log_retain, log_momentum, lr, closes_chunk, row_mask
            )
        else:
            reads, memory = neural_memory_scan(
                state.memory, q, k, v, log_retain, log_momentum, lr, self.chunk_size, write_mask
            )
        y = self.out_norm(reads.to(x.dtype)).transpose(1, 2).flatten(2)  # (batch, T, hidden)
        out = self.mem_o_proj(y * F.silu(self.mem_gate_proj(x)))
        return out, MixerState(memory=memory, conv_tail=conv_tail)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention that also returns the weights (query (b, h, q, d), key/value (b, kv_h, k, d))."""
    key = key.repeat_interleave(module.num_key_value_groups, dim=1)
    value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class TitansAttention(nn.Module):
    """Softmax attention with a persistent-memory prefix (Eq. 19, D7), in one of two shapes:

    - "sliding": each query sees the last `sliding_window` tokens of its row, itself included (MAG, MAL);
    - "segment": each query sees its own segment up to itself (MAC), including the retrieved memory tokens
      `extra` passed with the segment (h_j sits at x_j's position, so x_j sees h_1..h_j and x_1..x_j).
    The persistent tokens are learned vectors projected by this layer's key/value projections, without rotary
    position, visible to every query. Cost is O(T * (window + prefix)) or O(T * segment): queries run in blocks.
    """

    def __init__(self, config: TitansConfig, layer_idx: int, kind: str):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = kind
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by the HF attention functions
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # masks are always explicit
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.persistent_tokens = (
            nn.Parameter(torch.empty(config.num_persistent_tokens, hidden)) if config.num_persistent_tokens else None
        )

    def window_start(self, positions: torch.Tensor) -> torch.Tensor:
        """First position a query at `positions` may see."""
        if self.kind == "sliding":
            return positions - self.config.sliding_window + 1
        return positions - positions % self.config.segment_size

    def project_keys(self, x, cos, sin):
        shape = (*x.shape[:2], self.num_kv_heads, self.head_dim)
        keys = apply_rotary(self.k_proj(x).view(shape).transpose(1, 2), cos, sin)
        return keys, self.v_proj(x).view(shape).transpose(1, 2)

    def prefix(self, batch_size: int, dtype):
        """Persistent keys and values, (batch, kv_heads, P, head_dim) each; no rotary."""
        shape = (1, -1, self.num_kv_heads, self.head_dim)
        keys = self.k_proj(self.persistent_tokens.to(dtype)).view(shape).transpose(1, 2)
        values = self.v_proj(self.persistent_tokens.to(dtype)).view(shape).transpose(1, 2)
        return keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1)

    def forward(self, x, tokens: TokenInfo, rotary, past: AttentionKeys | None, extra=None, output_attentions=False):
        """x (batch, T, hidden) -> (output (batch, T, hidden), weights or None, visible keys for later queries)."""
        batch_size, seq_len, _ = x.shape
        cos, sin = rotary
        queries = apply_rotary(
            self.q_proj(x).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2), cos, sin
        )
        if past is None:
            past = AttentionKeys.empty(batch_size, self.num_kv_heads, self.head_dim, x.dtype, x.device)
        keys, values = self.project_keys(x, cos, sin)
        positions, valid = tokens.positions, tokens.valid
        if extra is not None:  # MAC: the retrieved tokens come first, h_j at x_j's position
            extra_keys, extra_values = self.project_keys(extra, cos, sin)
            keys, values = torch.cat([extra_keys, keys], dim=2), torch.cat([extra_values, values], dim=2)
            positions, valid = positions.repeat(1, 2), valid.repeat(1, 2)
        visible = past.extend(keys, values, positions, valid)  # one copy of the kept keys per call

        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if self.persistent_tokens is not None:
            prefix_keys, prefix_values = self.prefix(batch_size, x.dtype)
        block = seq_len if output_attentions else max(self.config.sliding_window, 256)
        if self.kind == "segment":
            block = seq_len  # the caller already hands over one segment at a time
        outputs, weights = [], None
        for start in range(0, seq_len, block):
            q_pos = tokens.positions[:, start : start + block]
            first = self.window_start(q_pos[:, :1]).squeeze(1)
            last = q_pos[:, -1]
            # Only key columns that some row of this block may see.
            in_range = visible.valid & (visible.positions >= first[:, None]) & (visible.positions <= last[:, None])
            columns = in_range.any(dim=0).nonzero().squeeze(1)
            lo, hi = (int(columns[0]), int(columns[-1]) + 1) if len(columns) else (0, 0)
            k_pos, k_valid = visible.positions[:, lo:hi], visible.valid[:, lo:hi]
            allowed = (
                k_valid[:, None, :]
                & (k_pos[:, None, :] <= q_pos[:, :, None])
                & (k_pos[:, None, :] >= self.window_start(q_pos)[:, :, None])
            )
            keys, values = visible.keys[:, :, lo:hi], visible.values[:, :, lo:hi]
            if self.persistent_tokens is not None:
                keys, values = torch.cat([prefix_keys, keys], dim=2), torch.cat([prefix_values, values], dim=2)
                allowed = F.pad(allowed, (prefix_keys.shape[2], 0), value=True)
            # A query with nothing to see (padding without a prefix) sees everything; its output is unused.
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min).unsqueeze(1)
            out, weights = interface(
                self,
                queries[:, :, start : start + block],
                keys,
                values,
                mask,
                dropout=self.config.attention_dropout if self.training else 0.0,
                scaling=self.scaling,
            )
            outputs.append(out)
        out = torch.cat(outputs, dim=1).reshape(batch_size, seq_len, -1)
        return self.o_proj(out), weights if output_attentions else None, visible


class TitansOutputGate(nn.Module):
    """o = W_O(RMSNorm_a(y) * sigma(RMSNorm_b(m))): the non-linear gate of MAG (Eq. 28) and MAC (Eq. 25)."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.attn_norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.memory_norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.activation = GATE_ACTIVATIONS[config.gate_activation]
        self.gate_o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, attended, remembered):
        return self.gate_o_proj(self.attn_norm(attended) * self.activation(self.memory_norm(remembered)))


class TitansDecoderLayer(GradientCheckpointingLayer):
    """One block; its token mixer depends on `config.variant` (see the module docstring)."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.variant = config.variant
        self.layer_idx = layer_idx
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.memory = TitansNeuralMemory(config)
        self.input_layernorm = TitansRMSNorm(hidden, eps=eps)
        if self.variant in ("mag", "mal"):
            self.self_attn = TitansAttention(config, layer_idx, kind="sliding")
        if self.variant == "mac":
            self.self_attn = TitansAttention(config, layer_idx, kind="segment")
            # Eq. 21: the queries that retrieve h_t = M*_{t-1}(q_t) from the memory before the segment.
            self.retrieve_q_proj = nn.Linear(hidden, hidden, bias=False)
            self.retrieve_o_proj = nn.Linear(hidden, hidden, bias=False)
        if self.variant in ("mag", "mac"):
            self.output_gate = TitansOutputGate(config)
        if self.variant == "mal":
            self.attention_layernorm = TitansRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = TitansRMSNorm(hidden, eps=eps)
        self.mlp = TitansMLP(config)

    def forward(
        self, hidden_states, tokens: TokenInfo, rotary, cache: TitansLayerCache | None = None, output_attentions=False
    ):
        """`cache` is this layer's part of the TitansCache, updated in place (a keyword argument, so that activation
        checkpointing drops it instead of writing the state twice)."""
        state = None
        if cache is not None and cache.memory is not None:
            state = MixerState(cache.memory, cache.conv_tail)
        past = None if cache is None else cache.attention
        weights, visible = None, None

        x = self.input_layernorm(hidden_states)
        if self.variant == "lmm":
            mixed, state = self.memory(x, tokens, state)
        elif self.variant == "mal":
            remembered, state = self.memory(x, tokens, state)
            hidden_states = hidden_states + remembered
            x = self.attention_layernorm(hidden_states)
            mixed, weights, visible = self.self_attn(x, tokens, rotary, past, output_attentions=output_attentions)
        elif self.variant == "mag":
            attended, weights, visible = self.self_attn(x, tokens, rotary, past, output_attentions=output_attentions)
            remembered, state = self.memory(x, tokens, state)
            mixed = self.output_gate(attended, remembered)
        else:
            segment_start = None if cache is None else cache.segment_start
            mixed, state, segment_start, kept = self.memory_as_context(x, tokens, rotary, state, segment_start, past)
            if cache is not None:  # `kept` already holds only what later queries of the segment may see
                cache.segment_start, cache.attention = segment_start, kept
        hidden_states = hidden_states + mixed

        if cache is not None:
            cache.memory, cache.conv_tail = state.memory, state.conv_tail
            if visible is not None:
                next_position = tokens.seen + tokens.lengths
                cache.attention = visible.keep_from(self.self_attn.window_start(next_position))

        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights

    def memory_as_context(self, x, tokens: TokenInfo, rotary, state, segment_start, past):
        """MAC (Eqs. 21-25), one segment after the other (segment s reads the memory that segments < s wrote).

        For each segment: h_j = M*_{s-1}(q_j) with q_j from the segment's own tokens; y = attention over
        [persistent, h, segment] with the causal rule of D8; write y into the memory (chunked, per-token reads
        after each write); o_j = Gate(y_j, M_j*(y_j)).
        """
        segment_size = self.config.segment_size
        state = state if state is not None else self.memory.fresh_state(x.shape[0])
        segment_start = segment_start if segment_start is not None else state.memory.weights
        cos, sin = rotary
        outputs = []
        for start in range(0, x.shape[1], segment_size):
            end = start + segment_size
            segment, segment_tokens = x[:, start:end], tokens.slice(start, end)
            queries = F.normalize(self.memory.split_heads(self.retrieve_q_proj(segment)), dim=-1)
            retrieved = self.retrieve_o_proj(self.memory.retrieve(segment_start, queries.transpose(1, 2).flatten(2)))
            attended, _, past = self.self_attn(
                segment, segment_tokens, (cos[:, start:end], sin[:, start:end]), past, extra=retrieved
            )
            remembered, state = self.memory(attended, segment_tokens, state)
            outputs.append(self.output_gate(attended, remembered))
            closes = segment_tokens.closes_block(segment_size)
            segment_start = select_rows(closes, state.memory.weights, segment_start)
            past = past.keep_from(self.self_attn.window_start(segment_tokens.seen + segment_tokens.lengths))
        return torch.cat(outputs, dim=1), state, segment_start, past


class TitansPreTrainedModel(PreTrainedModel):
    config_class = TitansConfig
    config: TitansConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TitansDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _is_stateful = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint whose decoder layers do not match this model
        (e.g. a MAG checkpoint loaded with a MAC config) instead of silently initialising the missing weights."""
        if kwargs.get("variant") in VARIANTS:
            raise ValueError(
                f"from_pretrained(variant={kwargs['variant']!r}): `variant` there names a weights-file variant in "
                "transformers. A checkpoint keeps the Titans variant it was trained with; to build another one, "
                "use a new config: TitansForCausalLM(TitansConfig(..., variant=...))."
            )
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        mismatched = [k for k in (*info["missing_keys"], *info["unexpected_keys"]) if "layers." in k]
        if mismatched:
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path} does not fit this {model.config.variant!r}-variant "
                f"Titans model: {len(mismatched)} layer weights are missing or unexpected (e.g. {mismatched[0]}). "
                "A checkpoint of one variant or depth cannot be loaded as another."
            )
        return (model, info) if wants_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TitansGate):
            module.bias.fill_(module.bias_init)
        elif isinstance(module, MemoryProjection):
            module.weight.normal_(0.0, module.in_features**-0.5)
        elif isinstance(module, CausalDepthwiseConv):
            module.weight.zero_()
            module.weight[:, 0, -1] = 1.0
        elif isinstance(module, MemoryInitialWeights):
            for weights in module:
                # M_0 ~ N(0, 1/d_in): a generic MLP initialisation; it is trained as an outer parameter.
                weights.normal_(0.0, weights.shape[1] ** -0.5)
        elif isinstance(module, TitansAttention) and module.persistent_tokens is not None:
            module.persistent_tokens.normal_(0.0, self.config.initializer_range)


class TitansModel(TitansPreTrainedModel):
    """The decoder stack: embeddings, `num_hidden_layers` Titans blocks, final RMSNorm."""

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(TitansDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = TitansRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_memory_writes(self, enabled: bool):
        """Switches test-time learning on or off in every layer. Off, each memory stays at its learned M_0:
        the model keeps only what attention sees (and M_0's fixed knowledge), which isolates what the memory adds."""
        for layer in self.layers:
            layer.memory.writes_enabled = enabled

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TitansCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: TitansCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Runs the decoder stack. `attention_mask` (batch, cached + new tokens) marks real tokens with 1 (left or
        right padding); `cache` (alias `past_key_values`) is a TitansCache to continue and update."""
        cache = cache if cache is not None else past_key_values
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            self.check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        if cache is not None and not isinstance(cache, TitansCache):
            raise TypeError(
                f"Titans keeps its neural memory in a TitansCache, got {type(cache).__name__}; pass "
                "`cache=TitansCache(model.config)` or let generate() create one."
            )
        if use_cache and cache is None:
            cache = TitansCache(self.config)
        if output_attentions and self.config.variant == "mac":
            raise ValueError("output_attentions is not supported for the MAC variant (attention runs per segment).")
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions needs the eager attention (got attn_implementation="
                f"{self.config._attn_implementation!r}); load the model with attn_implementation=\"eager\"."
            )

        batch_size, seq_len, _ = inputs_embeds.shape
        past_positions = cache.num_positions if cache is not None else 0
        new_mask = self.new_token_mask(attention_mask, batch_size, seq_len, past_positions, inputs_embeds.device)
        seen = cache.seen_tokens if cache is not None and cache.seen_tokens is not None else None
        if seen is None:
            seen = torch.zeros(batch_size, dtype=torch.long, device=inputs_embeds.device)
        elif seen.shape[0] != batch_size:
            raise ValueError(f"The cache holds {seen.shape[0]} rows but the input has {batch_size}.")

        period = self.config.segment_size if self.config.variant == "mac" else self.config.memory_chunk_size
        if seq_len > 1 and bool((seen % period != 0).any()):
            # Some row stands inside a chunk or segment: the parallel forms assume each row starts on a boundary.
            # Continue token by token, which is exact (the same math the decoding step uses).
            return self.forward_token_by_token(inputs_embeds, new_mask, position_ids, cache, output_hidden_states)

        # Compact layout: each row's real tokens first (left padding moves to the end).
        offsets = (~new_mask).long().argmin(dim=1) * new_mask.any(dim=1)  # first real column per row
        hidden_states = shift_rows(inputs_embeds, -offsets)
        valid = shift_rows(new_mask, -offsets)
        positions = seen[:, None] + torch.arange(seq_len, device=seen.device)
        tokens = TokenInfo(positions=positions, valid=valid, seen=seen, all_valid=bool(new_mask.all()))
        rope_positions = positions if position_ids is None else shift_rows(position_ids.expand(batch_size, -1), -offsets)
        rotary = self.rotary_emb(hidden_states, rope_positions)

        all_hidden_states, all_attentions = [], []
        for layer_idx, decoder_layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states.append(shift_rows(hidden_states, offsets))
            layer_cache = cache.layers[layer_idx] if cache is not None else None
            hidden_states, weights = decoder_layer(
                hidden_states, tokens, rotary, cache=layer_cache, output_attentions=output_attentions
            )
            if output_attentions:
                all_attentions.append(weights)
        hidden_states = shift_rows(self.norm(hidden_states), offsets)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        if cache is not None:
            cache.seen_tokens = seen + tokens.lengths
            cache.num_positions = past_positions + seq_len
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )

    def forward_token_by_token(self, inputs_embeds, new_mask, position_ids, cache, output_hidden_states):
        if not bool(new_mask.all()):
            raise ValueError(
                "Padding inside a continuation is not supported: when continuing from a TitansCache, every new "
                "token of every row must be real (attention_mask of the new part all ones)."
            )
        steps = []
        for t in range(inputs_embeds.shape[1]):
            step_positions = None if position_ids is None else position_ids[:, t : t + 1]
            steps.append(
                self(
                    inputs_embeds=inputs_embeds[:, t : t + 1],
                    position_ids=step_positions,
                    cache=cache,
                    use_cache=True,
                    output_hidden_states=output_hidden_states,
                )
            )
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*(s.hidden_states for s in steps)))
        return BaseModelOutputWithPast(
            last_hidden_state=torch.cat([s.last_hidden_state for s in steps], dim=1),
            cache=cache,
            hidden_states=hidden_states,
        )

    def check_token_ids(self, input_ids):
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)]
            raise ValueError(
                f"input_ids contain {bad[0].item()}, outside the vocabulary [0, {self.config.vocab_size}); check that "
                "the tokenizer matches the model's vocab_size."
            )

    @staticmethod
    def new_token_mask(attention_mask, batch_size, seq_len, past_positions, device):
        """(batch, T) bool mask of the new tokens; real tokens of a row must be one contiguous run."""
        if attention_mask is None:
            return torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        expected = [(batch_size, past_positions + seq_len)]
        if past_positions:
            expected.append((batch_size, seq_len))
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) not in expected:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected a 2D 0/1 mask of shape "
                f"{' or '.join(str(s) for s in expected)} (batch, cached + new tokens)."
            )
        mask = attention_mask[:, -seq_len:].bool()
        starts = mask.long().diff(dim=1, prepend=torch.zeros_like(mask[:, :1], dtype=torch.long)) == 1
        if bool((starts.sum(dim=1) > 1).any()):
            raise ValueError(
                "attention_mask has padding between real tokens; Titans supports left or right padding only "
                "(each row's real tokens must be contiguous)."
            )
        return mask


def shift_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out[r, t] = x[r, t - shift[r]] (zero where that falls outside): moves each row along dim 1."""
    if not bool(shift.any()):
        return x
    seq_len = x.shape[1]
    source = torch.arange(seq_len, device=x.device)[None, :] - shift[:, None]
    inside = (source >= 0) & (source < seq_len)
    index = source.clamp(0, seq_len - 1)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    out = x.gather(1, index)
    inside = inside.view(*inside.shape, *([1] * (x.dim() - 2)))
    return out * inside if out.dtype != torch.bool else out & inside


class TitansForCausalLM(TitansPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TitansCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: TitansCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward. `cache` (alias `past_key_values`) is a `TitansCache` that the memory writes into;
        `labels` give the shifted next-token loss through `self.loss_function` (handles `num_items_in_batch`)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def set_memory_writes(self, enabled: bool):
        """See `TitansModel.set_memory_writes`."""
        self.model.set_memory_writes(enabled)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets a TitansCache (never a DynamicCache); a cache passed in by the user is continued."""
        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if user_cache is not None:
            if not isinstance(user_cache, TitansCache):
                raise TypeError(f"Titans generates with a TitansCache, got {type(user_cache).__name__}.")
            model_kwargs["cache"] = user_cache
            user_cache._is_user_defined = True
            return
        if generation_config.cache_implementation is not None:
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: Titans always "
                "uses its own TitansCache."
            )
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = TitansCache(self.config)


__all__ = ["TitansForCausalLM", "TitansModel", "TitansPreTrainedModel"]
