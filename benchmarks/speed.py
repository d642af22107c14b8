"""Training throughput and decoding speed of every Titans variant next to a same-size Llama.

Training: forward + backward of one sequence (batch 1, labels = inputs), tokens/s at each length.
Decoding: prefill a random context of each length with the cache on, then time single-token forward passes
(greedy next token, no sampling or generate() overhead): ms/token, and the bytes the cache holds
(Titans: `TitansCache.memory_bytes()`; Llama: the key/value tensors of its DynamicCache).
Titans' cache is bounded (memory weights + one window or segment of keys), so its decode time should stay flat
as the context grows, while Llama's KV cache and per-token attention grow linearly.

    python benchmarks/speed.py                      # CPU, 1 thread, a few minutes
    python benchmarks/speed.py --device cuda --train-lengths 512 1024 4096 16384 --decode-contexts 1024 8192 65536
"""

from __future__ import annotations

import statistics

import torch

from harness import (
    VARIANTS,
    Stopwatch,
    build_model,
    count_parameters,
    new_figure,
    parse_args,
    print_table,
    save_figure,
    write_results,
)

MODELS = (*VARIANTS, "llama")


def add_arguments(parser):
    parser.add_argument("--train-lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per context length")
    parser.add_argument("--repeats", type=int, default=1, help="training steps timed per length (the fastest is kept)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))


def train_step_time(model, length: int, repeats: int, device: str) -> Stopwatch:
    """Best (lowest wall time) of `repeats` forward+backward passes over one sequence of `length` tokens."""
    vocab = model.config.vocab_size
    best = None
    for _ in range(repeats):
        ids = torch.randint(3, vocab, (1, length), device=device)
        model.zero_grad(set_to_none=True)
        with Stopwatch(device) as watch:
            model(input_ids=ids, labels=ids).loss.backward()
        if best is None or watch.wall < best.wall:
            best = watch
    return best


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache holds (TitansCache knows its own; a DynamicCache is keys + values)."""
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_times(model, name: str, context: int, steps: int, device: str):
    """Prefills `context` tokens, then times `steps` single-token steps. Returns (prefill watch, per-step ms, bytes)."""
    cache_argument = "past_key_values" if name == "llama" else "cache"
    ids = torch.randint(3, model.config.vocab_size, (1, context), device=device)
    with Stopwatch(device) as prefill:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values if name == "llama" else out.cache
    step_ms = []
    for _ in range(steps):
        next_token = out.logits[:, -1:].argmax(-1)
        with Stopwatch(device) as watch:
            out = model(input_ids=next_token, use_cache=True, **{cache_argument: cache})
        step_ms.append((watch.wall * 1e3, watch.cpu * 1e3))
    return prefill, step_ms, cache_bytes(cache)


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.smoke:
        args.train_lengths, args.decode_contexts, args.decode_steps, args.repeats = [32, 64], [16, 48], 3, 1
    train_rows, decode_rows, sizes = [], [], {}
    for name in args.models:
        model = build_model(name, args.smoke, args.device)
        sizes[name] = count_parameters(model)
        model.train()
        train_step_time(model, min(args.train_lengths), 1, args.device)  # warm-up: allocator, kernels
        for length in args.train_lengths:
            watch = train_step_time(model, length, args.repeats, args.device)
            row = {"model": name, "params_M": sizes[name] / 1e6, "tokens": length}
            row.update({"tok/s": length / watch.wall, "tok/s (cpu time)": length / watch.cpu, "step_s": watch.wall})
            if args.device == "cuda":
                row["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            train_rows.append(row)
            print_table([row], list(row), title=f"train {name} {length}")
        model.eval()
        model.zero_grad(set_to_none=True)
        for context in args.decode_contexts:
            prefill, step_ms, nbytes = decode_times(model, name, context, args.decode_steps, args.device)
            row = {"model": name, "context": context}
            row["ms/token"] = statistics.median(wall for wall, _ in step_ms)
            row["ms/token (cpu time)"] = statistics.median(cpu for _, cpu in step_ms)
            row["prefill tok/s"] = context / prefill.wall
            row["cache_MiB"] = nbytes / 2**20
            decode_rows.append(row)
            print_table([row], list(row), title=f"decode {name} {context}")
        del model

    print_table(train_rows, list(train_rows[0]), title="Training (forward + backward, batch 1)")
    print_table(decode_rows, list(decode_rows[0]), title="Decoding (one token after `context` tokens)")
    config = {
        "train_lengths": args.train_lengths,
        "decode_contexts": args.decode_contexts,
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
        "batch_size": 1,
        "dtype": "float32",
        "parameters": sizes,
        "titans": build_model("mag", args.smoke, "meta").config.to_dict() if "mag" in args.models else None,
    }
    write_results(args, "speed", config, train_rows, decode=decode_rows)
    plot(args, train_rows, decode_rows)


def plot(args, train_rows, decode_rows):
    fig, (train_ax, decode_ax, cache_ax) = new_figure(ncols=3, width=4.8)
    for name in args.models:
        train = [r for r in train_rows if r["model"] == name]
        decode = [r for r in decode_rows if r["model"] == name]
        style = dict(marker="o", linestyle="--" if name == "llama" else "-", label=name)
        train_ax.plot([r["tokens"] for r in train], [r["tok/s (cpu time)"] for r in train], **style)
        decode_ax.plot([r["context"] for r in decode], [r["ms/token (cpu time)"] for r in decode], **style)
        cache_ax.plot([r["context"] for r in decode], [r["cache_MiB"] for r in decode], **style)
    for ax, title, ylabel in (
        (train_ax, "training throughput", "tokens/s (fwd+bwd, CPU time)"),
        (decode_ax, "decoding", "ms/token (CPU time)"),
        (cache_ax, "cache size", "MiB"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length" if ax is train_ax else "context tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    cache_ax.set_yscale("log")
    train_ax.legend()
    save_figure(fig, args, "speed.png")


if __name__ == "__main__":
    main()
