"""`TitansCache`: the state that lets `generate()` keep writing every new token into the neural memory (D10).

Per decoder layer it holds
- the memory: current weights M_t, momentum S_t, the chunk-start weights M_{t'} where gradients are taken, and
  for MAC the weights at the start of the current segment (the state its retrieved tokens read);
- the tail of the causal convolution (its last `conv_kernel_size - 1` inputs);
- the attention keys and values still visible: the last `sliding_window - 1` tokens (MAG, MAL) or the current
  segment's retrieved-memory and input tokens (MAC).
All of it is bounded, so the cache has the same size after 100 tokens and after 100,000. Per row it also counts
the real tokens written so far: chunk and segment boundaries count from each row's own first real token, so a
left-padded batch gives, row by row, what each prompt gives alone.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .neural_memory import MemoryState


class AttentionKeys:
    """Keys and values still visible to later queries, each with its absolute position and validity.

    Rows may sit at different positions; a column that no row still needs is dropped, which keeps the buffer
    within a window or segment (plus the spread between rows).
    """

    def __init__(self, keys, values, positions, valid):
        self.keys = keys  # (batch, kv_heads, length, head_dim), rotary already applied
        self.values = values  # (batch, kv_heads, length, head_dim)
        self.positions = positions  # (batch, length) long
        self.valid = valid  # (batch, length) bool

    @classmethod
    def empty(cls, batch_size, kv_heads, head_dim, dtype, device):
        return cls(
            torch.zeros(batch_size, kv_heads, 0, head_dim, dtype=dtype, device=device),
            torch.zeros(batch_size, kv_heads, 0, head_dim, dtype=dtype, device=device),
            torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
        )

    def extend(self, keys, values, positions, valid) -> "AttentionKeys":
        return AttentionKeys(
            torch.cat([self.keys, keys], dim=2),
            torch.cat([self.values, values], dim=2),
            torch.cat([self.positions, positions], dim=1),
            torch.cat([self.valid, valid], dim=1),
        )

    def keep_from(self, first_position: torch.Tensor) -> "AttentionKeys":
        """Keeps, per row, the entries at positions >= first_position (batch,); drops columns nobody needs."""
        valid = self.valid & (self.positions >= first_position.unsqueeze(1))
        needed = valid.any(dim=0).nonzero()
        start = int(needed[0]) if len(needed) else valid.shape[1]
        return AttentionKeys(
            self.keys[:, :, start:], self.values[:, :, start:], self.positions[:, start:], valid[:, start:]
        )

    def map_rows(self, fn) -> "AttentionKeys":
        return AttentionKeys(fn(self.keys), fn(self.values), fn(self.positions), fn(self.valid))


class TitansLayerCache:
    """One decoder layer's state; filled by the layer on its first forward."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self):
        self.memory: MemoryState | None = None
        self.segment_start: tuple[torch.Tensor, ...] | None = None  # MAC only
        self.conv_tail: torch.Tensor | None = None
        self.attention: AttentionKeys | None = None

    def map_rows(self, fn):
        if self.memory is not None:
            self.memory = self.memory.map(fn)
        if self.segment_start is not None:
            self.segment_start = tuple(fn(w) for w in self.segment_start)
        if self.conv_tail is not None:
            self.conv_tail = fn(self.conv_tail)
        if self.attention is not None:
            self.attention = self.attention.map_rows(fn)

    def reset(self):
        self.__init__()

    def reorder_cache(self, beam_idx):
        self.map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self.map_rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int):
        raise ValueError("TitansCache cannot be cropped: the neural memory has no way to forget a written token.")

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        pass

    def prefetch(self):
        pass


class TitansCache(Cache):
    """Cache of a `TitansForCausalLM`: each layer's memory, convolution and attention state (see module doc).

    `generate()` makes one by itself; pass one in (`cache=TitansCache(model.config)`) to keep it, then continue
    generating from it. It cannot be cropped or rolled back (assisted decoding is refused for that reason).
    """

    def __init__(self, config=None, num_hidden_layers: int | None = None):
        num_layers = num_hidden_layers if num_hidden_layers is not None else config.num_hidden_layers
        super().__init__(layers=[TitansLayerCache() for _ in range(num_layers)])
        self.seen_tokens: torch.Tensor | None = None  # (batch,) real tokens written per row
        self.num_positions = 0  # input columns consumed, pads included (what generate() slices by)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_positions

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.num_positions + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.seen_tokens is None else self.seen_tokens.shape[0]

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens is not None

    def _map_rows(self, fn):
        if self.seen_tokens is not None:
            self.seen_tokens = fn(self.seen_tokens)

    def reset(self):
        super().reset()
        self.seen_tokens = None
        self.num_positions = 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int):
        raise ValueError("TitansCache cannot be cropped: the neural memory has no way to forget a written token.")

    def activate_past_recording(self):
        raise ValueError(
            "TitansCache cannot record past states for rollback, so Titans models cannot serve as assistant models."
        )

    def memory_bytes(self) -> int:
        """Bytes held by all tensors of the cache (constant per row once the window or segment is full)."""
        seen = set()
        total = 0

        def count(t):
            nonlocal total
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
            return t

        for layer in self.layers:
            layer.map_rows(count)
        return total
