"""Training throughput, peak memory and decoding speed of every Titans variant next to a same-size Llama and
titans-pytorch's MAC.

Training: forward + backward at each sequence length with about `--tokens-per-step` tokens per step (batch =
tokens // length, at least 1; labels = inputs), tokens/s, the achieved GFLOP/s of the model's FLOPs (`flops.py`:
matmuls, 3x the forward pass) and the step's peak memory. Each (model, length) runs in a fresh process after one
warm-up step at the shortest length (`--train-steps N`: the median of N timed steps); the peak is the growth of
the process's peak resident set (CPU) or of `torch.cuda.max_memory_allocated` (CUDA) from before the warm-up, so
it counts activations and gradients, not the weights. titans-pytorch (optional: `pip install titans-pytorch`) is
timed in training only; its rows are skipped when it is not installed.
Decoding: prefill a random context of each length with the cache on, then time single-token forward passes
(greedy next token, no sampling or generate() overhead): ms/token, and the bytes the cache holds
(Titans: `TitansCache.memory_bytes()`; Llama: the key/value tensors of its DynamicCache).
Titans' cache is bounded (memory weights + one window or segment of keys), so its decode time should stay flat
as the context grows, while Llama's KV cache and per-token attention grow linearly.

    python benchmarks/speed.py                      # CPU, 1 thread, about half an hour
    python benchmarks/speed.py --device cuda --tokens-per-step 16384
"""

from __future__ import annotations

import statistics

import torch

from modeling_titans.configuration.configuration_titans import VARIANTS

from flops import forward_flops_per_token
from harness import (
    BACKBONE,
    SMOKE_BACKBONE,
    Stopwatch,
    build_model,
    count_parameters,
    new_figure,
    parse_args,
    peak_bytes,
    print_table,
    run_in_child,
    save_figure,
    titans_config,
    training_loss,
    write_results,
)

MODELS = (*VARIANTS, "llama", "titans-pytorch")
DECODING_MODELS = (*VARIANTS, "llama")  # titans-pytorch: training only


def add_arguments(parser):
    parser.add_argument("--train-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="batch = this // length (at least 1)")
    parser.add_argument(
        "--decode-contexts", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
        help="none: training only",
    )
    parser.add_argument(
        "--train-steps", type=int, default=1,
        help="timed training steps per cell (the median is reported; single steps vary on a shared machine)",
    )
    parser.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per context length")
    parser.add_argument(
        "--decode-modes", nargs="+", choices=["eager", "compiled"], default=["eager"],
        help="compiled: time the decoding steps of torch.compile(model)",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--scan-modes", nargs="+", choices=["eager", "compiled"], default=["eager"],
        help="compiled: train the Titans variants with model.set_memory_scan_compiled() (per-chunk steps compiled)",
    )
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="+", default=None,
        help="train the Titans variants at each of these memory chunk sizes (default: the config's)",
    )
    parser.add_argument(
        "--max-norm", type=float, default=None,
        help="train the Titans variants with memory_max_norm R (the weights bounded where a chunk closes)",
    )


def train_step(
    name, length, batch_size, warmup_length, smoke, device, threads, overrides, compiled_scan, timed_steps, results
):
    """Child process: one warm-up step at `warmup_length`, then `timed_steps` timed forward + backward passes of
    `batch_size` sequences of `length` tokens; puts tok/s and the step time (medians) and the peak memory growth on
    `results`. With `compiled_scan` the warm-up step has the timed step's shape (it compiles for that shape)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(name, smoke, device, **overrides).train()
    if compiled_scan:
        model.set_memory_scan_compiled(True)
    vocab = (SMOKE_BACKBONE if smoke else BACKBONE)["vocab_size"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(device)
    warmup_shape = (batch_size, length) if compiled_scan else (1, warmup_length)
    warmup = torch.randint(3, vocab, warmup_shape, device=device)
    training_loss(model, name, warmup).backward()  # allocator, kernels
    input_ids = torch.randint(3, vocab, (batch_size, length), device=device)
    walls, cpus = [], []
    for _ in range(timed_steps):
        model.zero_grad(set_to_none=True)
        with Stopwatch(device) as watch:
            training_loss(model, name, input_ids).backward()
        walls.append(watch.wall)
        cpus.append(watch.cpu)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    tokens = batch_size * length
    row = {
        "tok/s": tokens / wall,
        "tok/s (cpu time)": tokens / cpu,
        "step_s": wall,
        "peak_MiB": (peak_bytes(device) - before) / 2**20,
    }
    if name != "titans-pytorch":  # model FLOPs of a training step: 3x the forward pass's (`flops.py`)
        flops_per_token = 3 * sum(forward_flops_per_token(model.config, length).values())
        row["train MFLOP/token"] = flops_per_token / 1e6
        row["GFLOP/s (cpu time)"] = flops_per_token * tokens / cpu / 1e9
    results.put(row)


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache holds (TitansCache knows its own; a DynamicCache is keys + values)."""
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_times(model, name: str, context: int, steps: int, device: str, step=None, warmup: int = 0):
    """Prefills `context` tokens with `model`, then runs `warmup` untimed and `steps` timed single-token steps of
    `step` (default: the model; a compiled model compiles in the warm-up). Returns (prefill watch, per-step ms,
    bytes)."""
    step = model if step is None else step
    cache_argument = "past_key_values" if name == "llama" else "cache"
    ids = torch.randint(3, model.config.vocab_size, (1, context), device=device)
    with Stopwatch(device) as prefill:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values if name == "llama" else out.cache
    step_ms = []
    for index in range(warmup + steps):
        next_token = out.logits[:, -1:].argmax(-1)
        with Stopwatch(device) as watch:
            out = step(input_ids=next_token, use_cache=True, **{cache_argument: cache})
        if index >= warmup:
            step_ms.append((watch.wall * 1e3, watch.cpu * 1e3))
    return prefill, step_ms, cache_bytes(cache)


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.smoke:
        args.train_lengths, args.tokens_per_step, args.decode_steps = [32, 64], 64, 3
        args.decode_contexts = [16, 48] if args.decode_contexts else []  # keeps a training-only run training-only
    models = [name for name in args.models if name != "titans-pytorch" or has_titans_pytorch()]
    train_rows, decode_rows, sizes = [], [], {}
    default_chunk = titans_config("mag", args.smoke).memory_chunk_size
    for name in models:
        sizes[name] = count_parameters(build_model(name, args.smoke, "cpu"))  # "meta" would untie embeddings
        chunks = args.chunk_sizes if name in VARIANTS and args.chunk_sizes else [default_chunk]
        scan_modes = args.scan_modes if name in VARIANTS else ["eager"]
        cells = ((chunk, mode, length) for chunk in chunks for mode in scan_modes for length in args.train_lengths)
        for chunk, mode, length in cells:
            batch_size = max(1, args.tokens_per_step // length)
            row = {"model": name, "params_M": sizes[name] / 1e6, "tokens": length, "batch": batch_size}
            if name in VARIANTS:
                row.update(chunk=chunk, scan=mode)
            overrides = {"memory_chunk_size": chunk, "memory_max_norm": args.max_norm} if name in VARIANTS else {}
            step = (name, length, batch_size, min(args.train_lengths), args.smoke, args.device, args.threads)
            row.update(run_in_child(train_step, *step, overrides, mode == "compiled", args.train_steps))
            train_rows.append(row)
            print_table([row], list(row), title=f"train {name} {length}")
    for name, mode in ((name, mode) for name in models if name in DECODING_MODELS for mode in args.decode_modes):
        model = build_model(name, args.smoke, args.device).eval()
        # Compiled: torch.compile of the whole model, traced by the first warm-up steps (dynamic shapes where
        # they change from step to step: Llama's growing KV cache, Titans' token counters).
        step, warmup = (torch.compile(model), 4) if mode == "compiled" else (model, 0)
        for context in args.decode_contexts:
            prefill, step_ms, nbytes = decode_times(
                model, name, context, args.decode_steps, args.device, step=step, warmup=warmup
            )
            row = {"model": name, "decode": mode, "context": context}
            row["ms/token"] = statistics.median(wall for wall, _ in step_ms)
            row["ms/token (cpu time)"] = statistics.median(cpu for _, cpu in step_ms)
            row["prefill tok/s"] = context / prefill.wall
            row["cache_MiB"] = nbytes / 2**20
            decode_rows.append(row)
            print_table([row], list(row), title=f"decode {name} {context}")
        del model

    train_columns = [
        "model", "chunk", "scan", "params_M", "tokens", "batch", "tok/s", "tok/s (cpu time)", "train MFLOP/token",
        "GFLOP/s (cpu time)", "step_s", "peak_MiB", "error",
    ]
    print_table(train_rows, train_columns, title="Training (forward + backward)")
    if decode_rows:
        print_table(decode_rows, list(decode_rows[0]), title="Decoding (one token after `context` tokens)")
    config = {
        "train_lengths": args.train_lengths,
        "tokens_per_step": args.tokens_per_step,
        "train_steps": args.train_steps,
        "decode_contexts": args.decode_contexts,
        "decode_steps": args.decode_steps,
        "decode_modes": args.decode_modes,
        "scan_modes": args.scan_modes,
        "max_norm": args.max_norm,
        "dtype": "float32",
        "parameters": sizes,
        "titans": titans_config("mag", args.smoke).to_dict(),
    }
    write_results(args, "speed", config, train_rows, decode=decode_rows)
    plot(args, models, train_rows, decode_rows)


def has_titans_pytorch() -> bool:
    try:
        import titans_pytorch  # noqa: F401
    except ImportError:
        print("titans-pytorch is not installed: its rows are skipped (pip install titans-pytorch)")
        return False
    return True


def plot(args, models, train_rows, decode_rows):
    fig, (train_ax, peak_ax, decode_ax, cache_ax) = new_figure(ncols=4, width=4.4)
    for name in models:
        style = dict(marker="o", linestyle="-" if name in VARIANTS else "--")
        for chunk, scan in dict.fromkeys((r.get("chunk"), r.get("scan")) for r in train_rows if r["model"] == name):
            train = [
                r for r in train_rows
                if r["model"] == name and (r.get("chunk"), r.get("scan")) == (chunk, scan) and "error" not in r
            ]
            label = name if args.chunk_sizes is None or chunk is None else f"{name}, chunk {chunk}"
            label += f", {scan} scan" if scan and args.scan_modes != ["eager"] else ""
            train_ax.plot([r["tokens"] for r in train], [r["tok/s (cpu time)"] for r in train], label=label, **style)
            peak_ax.plot([r["tokens"] for r in train], [r["peak_MiB"] for r in train], label=label, **style)
        for mode in args.decode_modes:
            decode = [r for r in decode_rows if r["model"] == name and r["decode"] == mode]
            label = name if args.decode_modes == ["eager"] else f"{name}, {mode}"
            mode_style = dict(style, marker="o" if mode == "eager" else "s")
            times = [r["ms/token (cpu time)"] for r in decode]
            decode_ax.plot([r["context"] for r in decode], times, label=label, **mode_style)
            if mode == args.decode_modes[0]:
                cache_ax.plot([r["context"] for r in decode], [r["cache_MiB"] for r in decode], label=name, **style)
    for ax, title, ylabel in (
        (train_ax, f"training, ~{args.tokens_per_step} tokens/step", "tokens/s (fwd+bwd, CPU time)"),
        (peak_ax, "training peak memory", "MiB (activations + gradients)"),
        (decode_ax, "decoding", "ms/token (CPU time)"),
        (cache_ax, "cache size", "MiB"),
    ):
        if not (train_rows if ax in (train_ax, peak_ax) else decode_rows):
            ax.set_visible(False)  # a training-only run (no --decode-contexts) has nothing to show there
            continue
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length" if ax in (train_ax, peak_ax) else "context tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in (peak_ax, cache_ax):
        if ax.get_visible():
            ax.set_yscale("log")
    train_ax.legend()
    if len(args.decode_modes) > 1:
        decode_ax.legend(fontsize="small")
    save_figure(fig, args, "speed.png")


if __name__ == "__main__":
    main()
