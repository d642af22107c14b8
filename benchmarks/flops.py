"""Model FLOPs of a forward pass, counted analytically from a config: Llama and every Titans token mixer.

Counted: the multiply-adds of matmuls, 2 FLOPs each (the convention of model-FLOPs utilisation), averaged over the
positions 0 .. T-1 of one unpadded sequence. Elementwise work (norms, activations, gates' sigmoids, rotary) is
left out, and attention counts only the keys a query may see (causal, window, segment), not what a kernel computes
and masks. A training step is then 3x the forward pass, the usual convention (backward = 2x forward); for the
neural memory it is an undercount, since its backward pass also differentiates the inner gradient (second-order
terms) and the checkpointed scan replays the forward pass, so an achieved GFLOP/s from it is conservative for
Titans.

    python benchmarks/flops.py --tokens 2048       # the benchmark sizes: FLOPs per token, per component
"""

from __future__ import annotations

import argparse
from itertools import pairwise

from modeling_titans.layers.token_mixers import TOKEN_MIXERS


def forward_flops_per_token(config, length: int) -> dict[str, float]:
    """FLOPs per token of one forward pass over a sequence of `length` tokens: {"dense": projections, MLPs and the
    output head, "attention": query-key scores and the weighted values, "memory": the neural memory op}.
    `config` is a LlamaConfig or a TitansConfig."""
    d, vocab = config.hidden_size, config.vocab_size
    head_dim = d // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention_projections = 2 * d * (2 * q_width + 2 * kv_width)
    mlp = 2 * 3 * d * config.intermediate_size
    counts = {"dense": 2 * d * vocab, "attention": 0.0, "memory": 0.0}
    for kind in getattr(config, "mixer_types", None) or ["llama"] * config.num_hidden_layers:
        counts["dense"] += mlp
        if kind == "llama":
            counts["dense"] += attention_projections
            counts["attention"] += 4 * q_width * (length + 1) / 2  # the mean of 1 .. T keys
            continue
        mixer = TOKEN_MIXERS[kind]
        if mixer.has_attention:
            persistent = config.num_persistent_tokens
            # The persistent tokens' keys and values are projected once per forward pass.
            counts["dense"] += attention_projections + 2 * 2 * d * kv_width * persistent / length
            if kind == "mac":  # each segment token also sees the memory tokens retrieved for the tokens up to it
                keys = [2 * (p % config.segment_size + 1) for p in range(length)]
            else:
                keys = [min(p + 1, config.sliding_window) for p in range(length)]
            counts["attention"] += 4 * q_width * (sum(keys) / length + persistent)
        if mixer.has_memory:
            counts["dense"] += _memory_layer_dense(config)
            counts["memory"] += _memory_op_per_token(config)
        if kind in ("mag", "mac"):
            counts["dense"] += 2 * d * d  # the output gate's projection
        if kind == "mac":  # retrieval: its query and output projections, the memory tokens' keys and values
            counts["dense"] += 2 * 2 * d * d + 2 * 2 * d * kv_width
            dims = memory_dims(config)
            read = sum(2 * d_in * d_out for d_in, d_out in pairwise(dims))
            counts["memory"] += config.memory_num_heads * read  # M*(q) from the segment's start, Eq. 21
    return counts


def memory_op_flops(length: int, chunk: int, dims: list[int], heads: int, batch: int = 1, momentum: bool = True,
                    gate_layers: int = 1, forget_channels: int = 1) -> int:
    """Forward matmul FLOPs of the chunked memory scan over `length` tokens (rounded up to whole chunks) for a
    network of widths `dims`; `gate_layers` gate sets with per-layer gates; `forget_channels` alphas per head
    (per-channel forgetting: the gate algebra runs per channel, and the reads weight each channel's scores
    elementwise instead of by a matmul).

    Per chunk of c tokens and head, for the weight matrices d_{l-1} x d_l (`chunk_update` in
    `modeling_titans/ops/neural_memory.py`): the gradient factors 2c d_{l-1} d_l (forward) + 2c d_l d_{l-1}
    (errors back, layers >= 2); the end state 2c d_{l-1} d_l per state (M, and S with momentum); the reads
    2c d_{l-1} d_l per state + 2c^2 (d_{l-1} + d_l) (scores against the chunk's keys, times its errors); with
    momentum, the gate algebra 2c^3 + 2c^2 per gate set.
    """
    states = 2 if momentum else 1
    per_chunk = gate_layers * forget_channels * (2 * chunk**3 + 2 * chunk**2) if momentum else 0
    for layer, (d_in, d_out) in enumerate(pairwise(dims)):
        per_chunk += 2 * chunk * d_in * d_out * (1 + (layer > 0))  # gradient factors
        per_chunk += 2 * chunk * d_in * d_out * states  # end state
        weighted_errors = d_out if forget_channels == 1 else 0  # (C * scores) @ g
        per_chunk += 2 * chunk * d_in * d_out * states + 2 * chunk * chunk * (d_in + weighted_errors)  # reads
    return per_chunk * heads * batch * -(-length // chunk)


def memory_dims(config) -> list[int]:
    """The widths of one head's memory network: head_dim -> (head_dim x expansion, depth - 1 times) -> head_dim."""
    width = config.memory_head_dim
    return [width] + [width * config.memory_expansion] * (config.memory_depth - 1) + [width]


def _memory_layer_dense(config) -> float:
    """The memory layer's projections: q, k, v, the output gate and output, and the input-dependent gates."""
    d = config.hidden_size
    gate_sets = 1 + config.use_forgetting + config.use_momentum  # theta, alpha, eta
    gate_layers = config.memory_depth if config.memory_per_layer_gates else 1
    logits_per_head = gate_sets * gate_layers + _forget_channels(config) - 1  # alpha per channel: head_dim logits
    gates = 2 * d * logits_per_head * config.memory_num_heads if config.memory_gates_from_input else 0
    return 2 * 5 * d * d + gates


def _forget_channels(config) -> int:
    return config.memory_head_dim if config.memory_forget_per_channel else 1


def _memory_op_per_token(config) -> float:
    chunk = config.memory_chunk_size
    gate_layers = config.memory_depth if config.memory_per_layer_gates else 1
    dims, heads = memory_dims(config), config.memory_num_heads
    return memory_op_flops(
        chunk, chunk, dims, heads, momentum=config.use_momentum, gate_layers=gate_layers,
        forget_channels=_forget_channels(config),
    ) / chunk


def main():
    from harness import BACKBONE, titans_config
    from transformers import LlamaConfig

    from modeling_titans.configuration.configuration_titans import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    args = parser.parse_args()
    configs = {"llama": LlamaConfig(**BACKBONE), **{v: titans_config(v, smoke=False) for v in VARIANTS}}
    print(f"{'model':<8}{'tokens':>8}{'dense':>10}{'attention':>11}{'memory':>10}{'total':>10}  MFLOP/token, forward")
    for length in args.tokens:
        for name, config in configs.items():
            counts = forward_flops_per_token(config, length)
            cells = "".join(f"{counts[k] / 1e6:>{w}.2f}" for k, w in (("dense", 10), ("attention", 11), ("memory", 10)))
            print(f"{name:<8}{length:>8}{cells}{sum(counts.values()) / 1e6:>10.2f}")


if __name__ == "__main__":
    main()
