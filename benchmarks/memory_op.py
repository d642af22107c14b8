"""The neural memory alone: chunked forward + backward tokens/s and achieved GFLOP/s against the machine's peak.

Rows:
- `op, checkpointed`: `checkpointed_memory_scan` (`modeling_titans/ops/chunk_scan.py`, what the layer runs) on
  ready-made q, k, v and gates (no projections).
- `op, autograd`: `neural_memory_scan` (`modeling_titans/ops/neural_memory.py`), the same chunked closed form
  differentiated by plain autograd, which keeps every chunk's state for backward: the op before the checkpointed
  scan, as the anchor of this table.
- `module`: our `TitansNeuralMemory` token mixer (projections, convolution, gates, op, output gate).
- `titans-pytorch` (optional, `pip install titans-pytorch`): its `NeuralMemory` at the same heads, head width,
  memory MLP (depth 2, expansion 4) and chunk size, once with its default `batch_size=None` (every gradient
  taken at the initial weights, the weights updated once at the end) and once with `batch_size=chunk_size`
  (the paper's semantics, which ours follows: gradients at the start of each chunk).

GFLOP/s counts only the matmuls of the op, analytically (`memory_op_flops`; backward = 2x forward), so it is
a lower bound on the work done (the checkpointed scan also replays the forward pass, not counted). The peaks are
a large fp32 matmul and a batched matmul of the op's own shapes.

    python benchmarks/memory_op.py                   # CPU, 1 thread, ~1 minute
    python benchmarks/memory_op.py --scan-modes eager compiled   # + the per-chunk steps through torch.compile
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from flops import memory_dims, memory_op_flops
from harness import (
    Stopwatch,
    build_model,
    new_figure,
    parse_args,
    print_table,
    save_figure,
    titans_config,
    titans_pytorch_memory_kwargs,
    write_results,
)


def add_arguments(parser):
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row (the fastest is kept)")
    parser.add_argument("--chunk-size", type=int, default=None, help="memory chunk (default: the config's, 16)")
    parser.add_argument(
        "--scan-modes", nargs="+", choices=["eager", "compiled"], default=["eager"],
        help="compiled: also time the checkpointed op and the module with their per-chunk steps compiled",
    )


def peak_gflops(device: str, shape: tuple[int, ...], repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of a (batched) matmul of `shape` = (batch, m, k, n)."""
    batch, m, k, n = shape
    a = torch.randn(batch, m, k, device=device)
    b = torch.randn(batch, k, n, device=device)
    inner = max(1, int(2e8 // (2 * batch * m * k * n)))  # ~0.2 GFLOP per timing
    best = float("inf")
    for _ in range(repeats):
        with Stopwatch(device) as watch:
            for _ in range(inner):
                torch.bmm(a, b)
        best = min(best, watch.cpu if device == "cpu" else watch.wall)
    return 2 * batch * m * k * n * inner / best / 1e9


def best_time(run, repeats: int, device: str) -> Stopwatch:
    run()  # warm-up
    watches = []
    for _ in range(repeats):
        with Stopwatch(device) as watch:
            run()
        watches.append(watch)
    return min(watches, key=lambda w: w.cpu)


def op_runner(config, memory, length, device, scan):
    """Forward + backward of a bare chunked scan on random, already normalised inputs."""
    from modeling_titans.ops.neural_memory import initial_state

    heads, d = config.memory_num_heads, config.memory_head_dim
    shape = (1, heads, length)

    def leaf(x):
        return x.detach().requires_grad_(True)

    q, k, v = (leaf(F.normalize(torch.randn(*shape, d, device=device), dim=-1)) for _ in range(3))
    log_retain = leaf(F.logsigmoid(torch.randn(shape, device=device) - 4))
    log_momentum = leaf(F.logsigmoid(torch.randn(shape, device=device) + 2))
    lr = leaf(0.1 * torch.sigmoid(torch.randn(shape, device=device)))
    projection = torch.randn(1, heads, length, d, device=device)

    def run():
        memory.zero_grad(set_to_none=True)
        state = initial_state(list(memory.network.initial_weights), 1)
        reads, _ = scan(memory.network, state, q, k, v, log_retain, log_momentum, lr, config.memory_chunk_size)
        (reads * projection).sum().backward()

    return run


def module_runner(memory, length, hidden, device, compiled_scan):
    from modeling_titans.layers.tokens import TokenInfo

    x = torch.randn(1, length, hidden, device=device, requires_grad=True)
    tokens = TokenInfo.unpadded(1, length, device)

    def run():
        memory.zero_grad(set_to_none=True)
        memory.compile_scan = compiled_scan
        out, _ = memory(x, tokens, None)
        out.sum().backward()

    return run


def titans_pytorch_runner(config, length, batch_size, device):
    from titans_pytorch import NeuralMemory

    memory = NeuralMemory(
        dim=config.hidden_size,
        chunk_size=config.memory_chunk_size,
        batch_size=batch_size,
        **titans_pytorch_memory_kwargs(config),
    ).to(device)
    x = torch.randn(1, length, config.hidden_size, device=device, requires_grad=True)

    def run():
        memory.zero_grad(set_to_none=True)
        out, _ = memory(x)
        out.sum().backward()

    return run


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.smoke:
        args.lengths, args.repeats = [16, 32], 1
    from modeling_titans.ops.chunk_scan import checkpointed_memory_scan
    from modeling_titans.ops.neural_memory import neural_memory_scan

    overrides = {} if args.chunk_size is None else {"memory_chunk_size": args.chunk_size}
    config = titans_config("lmm", args.smoke, **overrides)
    # initialised M_0 and gate biases
    memory = build_model("lmm", args.smoke, args.device, **overrides).model.layers[0].mixer.memory
    chunk, d = config.memory_chunk_size, config.memory_head_dim
    dims = memory_dims(config)
    size = 256 if args.smoke else 1024
    op_shape = f"bmm {config.memory_num_heads}x{chunk}x{d}x{dims[1]} (op shape)"
    peaks = {
        f"matmul {size}^3": peak_gflops(args.device, (1, size, size, size)),
        op_shape: peak_gflops(args.device, (config.memory_num_heads, chunk, d, dims[1])),
    }
    print_table([{"matmul": k, "GFLOP/s": v} for k, v in peaks.items()], ["matmul", "GFLOP/s"], "fp32 peaks")

    try:
        import titans_pytorch  # noqa: F401

        has_titans_pytorch = True
    except ImportError:
        has_titans_pytorch = False
        print("titans-pytorch is not installed: its rows are skipped (pip install titans-pytorch)")

    rows = []
    for length in args.lengths:
        flops = 3 * memory_op_flops(length, chunk, dims, config.memory_num_heads)
        runners = {"op, autograd (before)": op_runner(config, memory, length, args.device, neural_memory_scan)}
        for mode in args.scan_modes:
            compiled = mode == "compiled"
            suffix = ", compiled steps" if compiled else ""
            scan = functools.partial(checkpointed_memory_scan, compile_steps=compiled)
            runners[f"op, checkpointed (ours){suffix}"] = op_runner(config, memory, length, args.device, scan)
            runners[f"module (ours){suffix}"] = module_runner(memory, length, config.hidden_size, args.device, compiled)
        if has_titans_pytorch:
            runners["titans-pytorch default"] = titans_pytorch_runner(config, length, None, args.device)
            runners["titans-pytorch batch=chunk"] = titans_pytorch_runner(config, length, chunk, args.device)
        for name, run in runners.items():
            if name.endswith("compiled steps"):
                # Fresh graphs for each cell: every length and segment size brings its own strides, and past
                # dynamo's recompile limit the steps would fall back to eager in the timed runs.
                torch._dynamo.reset()
            watch = best_time(run, args.repeats, args.device)
            seconds = watch.cpu if args.device == "cpu" else watch.wall
            row = {"impl": name, "tokens": length, "tok/s": length / seconds, "ms": seconds * 1e3}
            is_op = name.startswith("op")
            row["op GFLOP/s"] = flops / seconds / 1e9 if is_op else None
            row["% of op-shape peak"] = 100 * row["op GFLOP/s"] / peaks[op_shape] if is_op else None
            rows.append(row)
            print_table([row], list(row))

    columns = ["impl", "tokens", "tok/s", "ms", "op GFLOP/s", "% of op-shape peak"]
    print_table(rows, columns, title="Neural memory forward + backward (batch 1; CPU time on CPU)")
    run_config = {
        "lengths": args.lengths,
        "heads": config.memory_num_heads,
        "head_dim": d,
        "memory_dims": dims,
        "chunk_size": chunk,
        "hidden_size": config.hidden_size,
        "op_matmul_flops_per_token": 3 * memory_op_flops(chunk, chunk, dims, config.memory_num_heads) / chunk,
    }
    write_results(args, "memory_op", run_config, rows, peaks_gflops=peaks)
    plot(args, rows, peaks)


def plot(args, rows, peaks):
    fig, (speed_ax, flops_ax) = new_figure(ncols=2, width=5.0)
    for name in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == name]
        speed_ax.plot([r["tokens"] for r in mine], [r["tok/s"] for r in mine], marker="o", label=name)
    for name in dict.fromkeys(r["impl"] for r in rows if r["op GFLOP/s"] is not None):
        op = [r for r in rows if r["impl"] == name]
        flops_ax.plot([r["tokens"] for r in op], [r["op GFLOP/s"] for r in op], marker="o", label=f"{name}, achieved")
    for (name, value), style in zip(peaks.items(), ("--", ":")):
        flops_ax.axhline(value, linestyle=style, color="gray", label=f"peak: {name}")
    for ax, ylabel in ((speed_ax, "tokens/s (fwd+bwd)"), (flops_ax, "matmul GFLOP/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, args, "memory_op.png")


if __name__ == "__main__":
    main()
