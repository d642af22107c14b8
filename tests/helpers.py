"""Shared pieces of the model-level tests: tiny models, incremental decoding, a streamer."""

import torch
from transformers.generation.streamers import BaseStreamer

from modeling_titans import TitansCache, TitansConfig, TitansForCausalLM
from modeling_titans.configuration.configuration_titans import VARIANTS  # noqa: F401 (shared by the tests)

# Tiny preset: chunk 4, segment 8 (MAC), window 8 (MAG / MAL), vocab 259 with bytes at 3..258.
CHUNK, SEGMENT, WINDOW = 4, 8, 8
FIRST_BYTE_ID = 3


def tiny_config(variant: str, **overrides) -> TitansConfig:
    """The tiny preset with its default init (initializer_range 0.02). There, fp32 rounding moves the logits by
    ~1e-6 while the memory's writes move them by ~0.3, so a 1e-4 tolerance separates the two. Larger weights
    amplify fp32 rounding through the memory recurrence (init 0.06: up to 3e-3), not through any inexactness:
    in float64 the cache matches the full forward to ~1e-13."""
    return TitansConfig.from_preset("tiny", variant=variant, **overrides)


def tiny_model(variant: str, seed: int = 0, **overrides) -> TitansForCausalLM:
    """A randomly initialised tiny model in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return TitansForCausalLM(tiny_config(variant, **overrides)).eval()


def random_ids(batch_size: int, length: int, seed: int = 1) -> torch.Tensor:
    """Byte token ids (no special tokens), reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_BYTE_ID, 259, (batch_size, length), generator=generator)


@torch.no_grad()
def prefill_then_decode(model, input_ids, prefill_length: int, cache=None) -> torch.Tensor:
    """Logits of `input_ids` computed as a prefill of `prefill_length` tokens followed by one token per call."""
    cache = cache if cache is not None else TitansCache(model.config)
    logits = [model(input_ids[:, :prefill_length], cache=cache, use_cache=True).logits]
    for t in range(prefill_length, input_ids.shape[1]):
        logits.append(model(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


@torch.no_grad()
def full_logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    return model(input_ids, attention_mask=attention_mask, use_cache=False).logits


class CollectingStreamer(BaseStreamer):
    """Records every chunk of token ids generate() streams (the prompt first, then one token per step)."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.detach().clone().view(-1))

    def end(self):
        self.ended = True
