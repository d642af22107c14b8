"""`TitansCache`: the state that lets `generate()` keep writing every new token into the neural memory.

Each decoder layer has one slot, a `TitansLayerCache`, whose `state` belongs to that layer's token mixer
(`layers/token_mixers.py`): the mixer alone reads and replaces it. Depending on the mixer it holds the memory
(current weights M_t, momentum S_t, the chunk-start weights M_{t'} where gradients are taken, and for MAC the
weights at the start of the current segment), the tail of the causal convolution, and the attention keys and
values still visible (after a multi-token pass the last `sliding_window - 1` tokens, or the current MAC segment;
while decoding a buffer of one window, or of one segment's retrieved and input tokens, each row writing a new key
over one it no longer sees). All of it is bounded, so the cache has the same size after 100 tokens and after
100,000.

Per row the cache also counts the real tokens written so far: chunk and segment boundaries count from each
row's own first real token, so a left-padded batch gives, row by row, what each prompt gives alone.

A cache records the config fields that shape its state (`CACHE_CONFIG_FIELDS`) and is refused by a model that
differs in any of them.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache


def map_tensors(value, fn):
    """`value` with `fn` applied to every tensor inside it (dataclasses, tuples, lists and plain objects whose
    attributes hold tensors); None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, fn) for item in value)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(
            value, **{field.name: map_tensors(getattr(value, field.name), fn) for field in dataclasses.fields(value)}
        )
    copy = object.__new__(type(value))
    copy.__dict__.update({name: map_tensors(item, fn) for name, item in vars(value).items()})
    return copy


# The config fields that decide the layout and the meaning of a cache's state: the layers and their mixers, the
# sizes of the memory, the convolution and the attention keys, and the chunk, segment and window boundaries.
CACHE_CONFIG_FIELDS = (
    "num_hidden_layers",
    "mixer_types",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "memory_num_heads",
    "memory_depth",
    "memory_expansion",
    "memory_chunk_size",
    "segment_size",
    "sliding_window",
    "use_conv",
    "conv_kernel_size",
    "use_momentum",
)


def cache_layout(config) -> dict:
    """The values of `CACHE_CONFIG_FIELDS` in `config` (lists copied, so later edits of the config do not move
    them)."""
    return {
        field: list(value) if isinstance(value, list) else value
        for field, value in ((field, getattr(config, field)) for field in CACHE_CONFIG_FIELDS)
    }


class TitansLayerCache:
    """One decoder layer's slot; its token mixer fills `state` on the first forward."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self):
        self.state = None

    def map_rows(self, fn):
        self.state = map_tensors(self.state, fn)

    def reset(self):
        self.state = None

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
    """Cache of a `TitansForCausalLM`: each layer's mixer state (see the module docstring).

    `generate()` makes one by itself; pass one in (`cache=TitansCache(model.config)`) to keep it, then continue
    generating from it. It cannot be cropped or rolled back (assisted decoding is refused for that reason).
    """

    def __init__(self, config):
        super().__init__(layers=[TitansLayerCache() for _ in range(config.num_hidden_layers)])
        self.layout = cache_layout(config)  # what the cache was built for (`check_model`)
        self.seen_tokens: torch.Tensor | None = None  # (batch,) real tokens written per row
        self.num_positions = 0  # input columns consumed, pads included (what generate() slices by)

    def check_model(self, config):
        """Raises a ValueError naming the differences if `config` is not a model this cache was built for."""
        model_layout = cache_layout(config)
        differences = [field for field in CACHE_CONFIG_FIELDS if self.layout[field] != model_layout[field]]
        if differences:
            built_for = ", ".join(f"{field}={self.layout[field]!r}" for field in differences)
            model = ", ".join(f"{field}={model_layout[field]!r}" for field in differences)
            raise ValueError(
                f"This TitansCache was built for a different model ({built_for}) than this one ({model}); "
                "create one with TitansCache(model.config)."
            )

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

    def activate_past_recording(self, **kwargs):
        # Assisted generation (an assistant model, prompt lookup) asks every cache to record its past so that
        # rejected draft tokens can be rolled back; a memory that has learned from a token cannot unlearn it.
        raise ValueError(
            "TitansCache cannot record past states for rollback, so Titans models cannot take part in assisted "
            "generation (as the model or as its assistant)."
        )

    def memory_bytes(self) -> int:
        """Bytes held by all tensors of the cache (constant per row once the window or segment is full)."""
        seen = set()
        total = 0

        def count(t):
            nonlocal total
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
            return t

        for layer in self.layers:
            map_tensors(layer.state, count)
        return total
