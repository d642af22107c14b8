"""Softmax attention of the Titans blocks: the precise short-term memory next to the neural memory.

Two reaches, one class each: `SlidingWindowAttention` (MAG, MAL: each query sees the last `sliding_window`
tokens of its row, itself included) and `SegmentAttention` (MAC: each query sees its own segment up to itself).
Both put a learned persistent-memory prefix in front of the keys (Eq. 19), visible to every query, and keep in
`AttentionKeys` only the keys that later queries can still see, so their cache is bounded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .basics import apply_rotary
from .tokens import TokenInfo


class AttentionKeys:
    """Keys and values still visible to later queries, each with its absolute position, validity and slot.

    Rows may sit at different positions. A pass of several tokens drops the columns that no row still needs, which
    keeps the buffer within a window or segment (plus the spread between rows); a decoding step writes over entries
    instead (`put`), so the buffer keeps its size. A key's slot is its column in returned attention
    weights, after the persistent ones (`TitansAttention.forward`). `prefix` holds the persistent keys and values
    once projected: they depend on the weights alone, so one forward pass (every MAC segment) and the decoding
    steps that continue it project them once.
    """

    def __init__(self, keys, values, positions, valid, slots, prefix=None):
        self.keys = keys  # (batch, kv_heads, length, head_dim), rotary already applied
        self.values = values  # (batch, kv_heads, length, head_dim)
        self.positions = positions  # (batch, length) long
        self.valid = valid  # (batch, length) bool
        self.slots = slots  # (batch, length) long
        self.prefix = prefix  # None, or the persistent (keys, values), (batch, kv_heads, P, head_dim) each

    @classmethod
    def empty(cls, batch_size, kv_heads, head_dim, dtype, device):
        return cls(
            torch.zeros(batch_size, kv_heads, 0, head_dim, dtype=dtype, device=device),
            torch.zeros(batch_size, kv_heads, 0, head_dim, dtype=dtype, device=device),
            torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            torch.zeros(batch_size, 0, dtype=torch.long, device=device),
        )

    def extend(self, keys, values, positions, valid, slots, prefix=None) -> "AttentionKeys":
        """These entries followed by the given ones; `prefix` replaces a missing one."""
        return AttentionKeys(
            torch.cat([self.keys, keys], dim=2),
            torch.cat([self.values, values], dim=2),
            torch.cat([self.positions, positions], dim=1),
            torch.cat([self.valid, valid], dim=1),
            torch.cat([self.slots, slots], dim=1),
            self.prefix if self.prefix is not None else prefix,
        )

    def put(self, keys, values, positions, valid, slots, first_needed, capacity: int, prefix=None):
        """A one-token step's new entries (k per row). Below `capacity` columns they are appended; from there on
        each row writes them over k of its own entries that its query no longer sees (before `first_needed`
        (batch,) or pads), so the buffer keeps its shape and nothing is read from a tensor (a compiled decoding
        step stays one graph). Columns are then no longer in position order; attention masks by position.
        With `capacity` >= the entries one query may see, every row has k such entries."""
        if self.keys.shape[2] < capacity:
            return self.extend(keys, values, positions, valid, slots, prefix)
        unseen = ~(self.valid & (self.positions >= first_needed[:, None]))
        index = torch.topk(unseen.to(torch.uint8), keys.shape[2], dim=1).indices  # (batch, k) columns to reuse
        entry_index = index[:, None, :, None].expand(*keys.shape)
        return AttentionKeys(
            self.keys.scatter(2, entry_index, keys),
            self.values.scatter(2, entry_index, values),
            self.positions.scatter(1, index, positions),
            self.valid.scatter(1, index, valid),
            self.slots.scatter(1, index, slots),
            self.prefix if self.prefix is not None else prefix,
        )

    def keep_from(self, first_position: torch.Tensor | int, start: int | None = None) -> "AttentionKeys":
        """Keeps, per row, the entries at positions >= first_position ((batch,), or one int for every row) and
        drops the columns before `start`; None: before the first column any row still needs (read from the
        tensors, a host sync)."""
        threshold = first_position if isinstance(first_position, int) else first_position.unsqueeze(1)
        valid = self.valid & (self.positions >= threshold)
        if start is None:
            needed = valid.any(dim=0).nonzero()
            start = int(needed[0]) if len(needed) else valid.shape[1]
        return AttentionKeys(self.keys, self.values, self.positions, valid, self.slots, self.prefix).tail(start)

    def tail(self, start: int) -> "AttentionKeys":
        """The entries from column `start` on."""
        return AttentionKeys(
            self.keys[:, :, start:],
            self.values[:, :, start:],
            self.positions[:, start:],
            self.valid[:, start:],
            self.slots[:, start:],
            self.prefix,
        )


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


def slotted_weights(weights, slots, num_slots: int, query_valid):
    """Attention weights over a block's keys (batch, heads, q, P + keys), the P persistent ones first, spread over
    P + num_slots columns with each key at its slot (batch, keys); rows of pad queries become zero."""
    num_persistent = weights.shape[-1] - slots.shape[1]
    out = weights.new_zeros(*weights.shape[:-1], num_persistent + num_slots)
    out[..., :num_persistent] = weights[..., :num_persistent]
    index = (num_persistent + slots)[:, None, None, :].expand(*weights.shape[:-1], slots.shape[1])
    out = out.scatter(-1, index, weights[..., num_persistent:])
    return out * query_valid[:, None, :, None].to(out.dtype)


class TitansAttention(nn.Module):
    """Softmax attention with a persistent-memory prefix; subclasses say which earlier tokens a query may see
    (`window_start`). The persistent tokens are learned vectors projected by this layer's key/value projections,
    without rotary position. Cost is O(T * (reach + prefix)): queries run in blocks against the keys they reach.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
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
        raise NotImplementedError

    @classmethod
    def reach(cls, config) -> int:
        """The most positions one query may see, itself included."""
        raise NotImplementedError

    def query_block_size(self, seq_len: int) -> int:
        """Queries per block of the forward pass (each block is one attention call against the keys it reaches)."""
        return seq_len

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

    def forward(
        self,
        x: torch.Tensor,
        tokens: TokenInfo,
        rotary,
        past: AttentionKeys | None,
        memory_tokens: torch.Tensor | None = None,
        output_attentions: bool = False,
    ):
        """x (batch, T, hidden) -> (output (batch, T, hidden), weights or None, the keys later queries still see).

        `memory_tokens` (MAC): one extra token per input token, h_j at x_j's position, placed before the input
        tokens so that x_j sees h_1..h_j and x_1..x_j.

        `output_attentions`: the weights are (batch, heads, T, P + K) with T in the packed layout of `x` (the model
        moves the rows back to the input's columns). The key axis holds the P persistent tokens first, then K
        columns aligned with the input columns of the sequence so far (cached ones included): one per input
        column, or with `memory_tokens` two, the retrieved token h_j then the token x_j. Keys out of reach, pads
        and the rows of pad queries are zero.
        """
        batch_size, seq_len, _ = x.shape
        cos, sin = rotary
        queries = apply_rotary(
            self.q_proj(x).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2), cos, sin
        )
        if past is None:
            past = AttentionKeys.empty(batch_size, self.num_kv_heads, self.head_dim, x.dtype, x.device)
        keys, values = self.project_keys(x, cos, sin)
        positions, valid, slots = tokens.positions, tokens.valid, tokens.columns
        slots_per_column = 1
        if memory_tokens is not None:
            extra_keys, extra_values = self.project_keys(memory_tokens, cos, sin)
            keys, values = torch.cat([extra_keys, keys], dim=2), torch.cat([extra_values, values], dim=2)
            positions, valid = positions.repeat(1, 2), valid.repeat(1, 2)
            slots, slots_per_column = torch.cat([2 * slots, 2 * slots + 1], dim=1), 2
        prefix = None
        if self.persistent_tokens is not None and past.prefix is None:
            prefix = self.prefix(batch_size, x.dtype)
        if seq_len == 1:  # decoding: a buffer of fixed size, each row overwriting keys it no longer sees
            capacity = self.reach(self.config) * keys.shape[2]
            first_needed = self.window_start(tokens.positions[:, 0])
            visible = past.put(keys, values, positions, valid, slots, first_needed, capacity, prefix)
        else:
            visible = past.extend(keys, values, positions, valid, slots, prefix)  # one copy of the kept keys

        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        block = self.query_block_size(seq_len)
        # A fresh pass without padding: key column c holds position first_position + c (twice over with memory
        # tokens), so the columns each block reaches are known without reading a tensor.
        static_first = tokens.first_position if past.keys.shape[2] == 0 else None
        outputs, weights = [], []
        for start in range(0, seq_len, block):
            q_pos = tokens.positions[:, start : start + block]
            if seq_len == 1:  # one query per row, the whole fixed-size buffer (masked by position)
                lo, hi = 0, visible.keys.shape[2]
            elif static_first is None:
                lo, hi = self.reached_columns(visible, q_pos)
            elif memory_tokens is None:
                lo = max(0, self.window_start(static_first + start) - static_first)
                hi = min(start + block, seq_len)
            else:  # MAC: one segment per call, every column of it reachable
                lo, hi = 0, visible.keys.shape[2]
            k_pos, k_valid = visible.positions[:, lo:hi], visible.valid[:, lo:hi]
            allowed = (
                k_valid[:, None, :]
                & (k_pos[:, None, :] <= q_pos[:, :, None])
                & (k_pos[:, None, :] >= self.window_start(q_pos)[:, :, None])
            )
            block_keys, block_values = visible.keys[:, :, lo:hi], visible.values[:, :, lo:hi]
            if visible.prefix is not None:
                prefix_keys, prefix_values = visible.prefix
                block_keys = torch.cat([prefix_keys, block_keys], dim=2)
                block_values = torch.cat([prefix_values, block_values], dim=2)
                # Every query sees the prefix. (Checking anyway made inductor emit C++ that does not compile on CPU.)
                allowed = F.pad(allowed, (prefix_keys.shape[2], 0), value=True)
            else:  # a query with nothing to see (padding) sees everything; its output is unused
                allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min).unsqueeze(1)
            out, block_weights = interface(
                self,
                queries[:, :, start : start + block],
                block_keys,
                block_values,
                mask,
                dropout=self.config.attention_dropout if self.training else 0.0,
                scaling=self.scaling,
            )
            outputs.append(out)
            if output_attentions:
                query_valid = tokens.valid[:, start : start + block]
                num_slots = slots_per_column * tokens.num_columns
                weights.append(slotted_weights(block_weights, visible.slots[:, lo:hi], num_slots, query_valid))
        out = torch.cat(outputs, dim=1).reshape(batch_size, seq_len, -1)
        if seq_len == 1:
            kept = visible
        elif static_first is None:
            kept = visible.keep_from(self.window_start(tokens.next_position))
        else:  # the next query's window starts at column `first` of each half (none kept when it is past the end)
            next_start = self.window_start(static_first + seq_len)
            first = min(max(0, next_start - static_first), seq_len)
            kept = visible.keep_from(next_start, start=visible.keys.shape[2] if first == seq_len else first)
        return self.o_proj(out), torch.cat(weights, dim=2) if output_attentions else None, kept

    def reached_columns(self, visible: AttentionKeys, q_pos: torch.Tensor) -> tuple[int, int]:
        """[lo, hi): the key columns that some row's query at the positions `q_pos` (batch, block) may see."""
        first = self.window_start(q_pos[:, :1]).squeeze(1)
        last = q_pos[:, -1]
        in_range = visible.valid & (visible.positions >= first[:, None]) & (visible.positions <= last[:, None])
        columns = in_range.any(dim=0).nonzero().squeeze(1)
        return (int(columns[0]), int(columns[-1]) + 1) if len(columns) else (0, 0)


class SlidingWindowAttention(TitansAttention):
    """Each query sees the last `sliding_window` tokens of its row, itself included (MAG, MAL)."""

    @classmethod
    def reach(cls, config) -> int:
        return config.sliding_window

    def window_start(self, positions: torch.Tensor) -> torch.Tensor:
        return positions - self.config.sliding_window + 1

    def query_block_size(self, seq_len: int) -> int:
        return max(self.config.sliding_window, 256)


class SegmentAttention(TitansAttention):
    """Each query sees its own segment of `segment_size` tokens up to itself (MAC); the caller hands over one
    segment at a time, so all its queries form one block."""

    @classmethod
    def reach(cls, config) -> int:
        return config.segment_size

    def window_start(self, positions: torch.Tensor) -> torch.Tensor:
        return positions - positions % self.config.segment_size
