"""Shared plumbing of the benchmark scripts: command line, model sizes, timing, machine info, results and tables.

Every script in this folder is run as `python benchmarks/<name>.py [--device cpu|cuda] [--smoke] [--threads N]`;
it prints a table, writes `<out>/<name>.json` (machine, library versions, config, rows) and draws `<out>/<name>*.png`.
`--smoke` shrinks everything to seconds: it checks that the script works, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import time
from importlib import metadata

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The benchmark model: ~5-8M parameters, a small Llama (d=256, 4 layers, vocab 4096,
# tied embeddings: 5.3M). Titans adds its memory (4 heads of 64 channels, depth 2, expansion 4) to each block.
BACKBONE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)
TITANS_FIELDS = dict(
    memory_num_heads=4,
    memory_depth=2,
    memory_expansion=4,
    memory_chunk_size=16,
    sliding_window=512,
    segment_size=512,
    num_persistent_tokens=16,
)
# Seconds-long smoke runs use the byte-level tiny sizes.
SMOKE_BACKBONE = dict(BACKBONE, vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SMOKE_TITANS_FIELDS = dict(TITANS_FIELDS, memory_num_heads=2, memory_expansion=2, memory_chunk_size=4, sliding_window=8, segment_size=8, num_persistent_tokens=2)


def parse_args(description: str, add_arguments=None) -> argparse.Namespace:
    """The common flags plus the script's own (`add_arguments(parser)`); sets the torch threads and the seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks the script runs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for the JSON and PNG results")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    return args


def titans_config(variant: str, smoke: bool, **overrides):
    from modeling_titans import TitansConfig

    fields = dict(SMOKE_BACKBONE if smoke else BACKBONE, **(SMOKE_TITANS_FIELDS if smoke else TITANS_FIELDS))
    return TitansConfig(variant=variant, **dict(fields, **overrides))


def build_model(name: str, smoke: bool, device: str, **overrides):
    """`name` is a Titans variant, "llama" (transformers' LlamaForCausalLM, SDPA, same width/depth/vocab) or
    "titans-pytorch" (that package's MemoryAsContextTransformer at the same sizes; training only). `overrides`
    change TitansConfig fields of a Titans variant (e.g. memory_chunk_size)."""
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(attn_implementation="sdpa", **(SMOKE_BACKBONE if smoke else BACKBONE))
        model = LlamaForCausalLM(config)
    elif name == "titans-pytorch":
        model = titans_pytorch_mac(smoke)
    else:
        from modeling_titans import TitansForCausalLM

        model = TitansForCausalLM(titans_config(name, smoke, **overrides))
    return model.to(device)


def titans_pytorch_mac(smoke: bool):
    """titans-pytorch's MAC with the sizes of our MAC: width, depth, heads, vocab, feed-forward width, a memory in
    every layer with the same heads, head width, MLP depth/expansion and chunk, the same segment and persistent
    tokens; plain residuals (num_residual_streams=1) like ours, its other defaults (e.g. 16 long-term memory
    tokens per segment, gradients at the segment start: batch_size=None)."""
    from titans_pytorch import MemoryAsContextTransformer

    config = titans_config("mac", smoke)
    return MemoryAsContextTransformer(
        num_tokens=config.vocab_size,
        dim=config.hidden_size,
        depth=config.num_hidden_layers,
        heads=config.num_attention_heads,
        dim_head=config.head_dim,
        ff_mult=config.intermediate_size // config.hidden_size,
        segment_len=config.segment_size,
        neural_memory_segment_len=config.memory_chunk_size,
        num_persist_mem_tokens=config.num_persistent_tokens,
        num_longterm_mem_tokens=config.num_persistent_tokens,
        num_residual_streams=1,
        neural_memory_layers=tuple(range(1, config.num_hidden_layers + 1)),
        neural_memory_kwargs=titans_pytorch_memory_kwargs(config),
    )


def titans_pytorch_memory_kwargs(config) -> dict:
    """titans-pytorch `NeuralMemory` arguments for the memory of a TitansConfig: heads, head width, MLP shape."""
    return dict(
        heads=config.memory_num_heads,
        dim_head=config.memory_head_dim,
        default_model_kwargs=dict(depth=config.memory_depth, expansion_factor=float(config.memory_expansion)),
    )


def training_loss(model, name: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of `input_ids` (labels = inputs) for any model `build_model` makes."""
    if name == "titans-pytorch":
        return model(input_ids, return_loss=True)
    return model(input_ids=input_ids, labels=input_ids).loss


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_bytes(device: str) -> int:
    """The peak memory so far: CUDA allocations, or on CPU this process's peak resident set size."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_in_child(function, *args) -> dict:
    """Runs `function(*args, queue)` in a fresh process (so a peak it measures is its own) and returns the dict it
    puts on the queue, or {"error": ...} when the process died (e.g. killed for lack of memory)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=function, args=(*args, results))
    child.start()
    child.join()
    if child.exitcode == -9:  # SIGKILL: on Linux almost always the kernel's out-of-memory killer
        return {"error": "killed (SIGKILL), most likely out of memory"}
    if child.exitcode != 0:
        return {"error": f"child process exited with code {child.exitcode}"}
    return results.get()


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Wall time and this process's CPU time of a block.

    On a shared machine the wall time includes waiting for other processes; with one torch thread the CPU time
    is close to what the wall time would be on an idle machine, so the tables report both.
    """

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def machine_info(args) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def library_versions() -> dict:
    versions = {}
    for package in ("torch", "transformers", "modeling-titans", "titans-pytorch", "matplotlib", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def write_results(args, name: str, config: dict, rows: list[dict], **extra) -> str:
    """Writes `<out>/<name>.json` and returns its path."""
    payload = {
        "benchmark": name,
        "smoke": args.smoke,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(args),
        "versions": library_versions(),
        "config": config,
        "rows": rows,
        **extra,
    }
    path = os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")
    return path


def print_table(rows: list[dict], columns: list[str], title: str = ""):
    """A plain fixed-width table of `columns` (missing values print as '-')."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0, nrows: int | None = None):
    """A figure of panels of `width` x `height` inches: one row of `ncols` (the axes as a list), or with `nrows`
    a grid (the axes indexed [row][column])."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = nrows or 1
    fig, axes = plt.subplots(rows, ncols, figsize=(width * ncols, height * rows), squeeze=False)
    return fig, (axes if nrows else axes[0])


def save_figure(fig, args, filename: str):
    path = os.path.join(args.out, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {path}")
