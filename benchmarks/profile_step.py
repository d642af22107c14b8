"""Where the time goes: one training step and a few decode steps of MAG and MAC under torch.profiler and cProfile.

torch.profiler gives the aten ops that take the time (self time, call counts); cProfile gives the Python
functions of `modeling_titans` that spend it (cumulative time includes the ops they launch). Together they show
whether a path is bound by a few big kernels or by thousands of small launches from a Python loop.

    python benchmarks/profile_step.py                    # CPU, 1 thread, 1K-token step, ~1 minute
    python benchmarks/profile_step.py --trace            # also write Chrome traces (chrome://tracing, Perfetto)
"""

from __future__ import annotations

import cProfile
import os
import pstats
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from modeling_titans.configuration.configuration_titans import VARIANTS

from harness import Stopwatch, build_model, new_figure, parse_args, print_table, save_figure, write_results

PACKAGE_DIR = os.path.join("modeling_titans", "")


def add_arguments(parser):
    parser.add_argument("--variants", nargs="+", default=["mag", "mac"], choices=VARIANTS)
    parser.add_argument("--train-length", type=int, default=1024)
    parser.add_argument("--decode-context", type=int, default=1024)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=12, help="rows of each table")
    parser.add_argument("--trace", action="store_true", help="write a Chrome trace per profiled phase")


def training_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def decode_steps(model, ids, steps):
    """Prefills `ids` now (setup, not profiled) and returns a function that decodes `steps` single tokens, without
    autograd, as `generate()` does."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.cache

    @torch.no_grad()
    def run():
        nonlocal out
        for _ in range(steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)

    return run


def profile_phase(args, label, run):
    """Runs `run` once under torch.profiler and once under cProfile; returns (op rows, python rows, seconds)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    if args.trace:
        prof.export_chrome_trace(os.path.join(args.out, f"trace_{label}.json"))
    sort_key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, sort_key), reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    op_rows = [
        {
            "op": e.key[:60],
            "calls": e.count,
            "self_ms": e.self_cpu_time_total / 1e3,
            "self_%": 100.0 * e.self_cpu_time_total / total,
            "us/call": e.self_cpu_time_total / max(e.count, 1),
        }
        for e in events[: args.top]
    ]
    launches = sum(e.count for e in events if e.key.startswith("aten::"))

    profiler = cProfile.Profile()
    with Stopwatch(args.device) as watch:
        profiler.runcall(run)
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, ncalls, tottime, cumtime, callers)}
    python_rows = [
        {
            "function": f"{os.path.basename(file)}:{line} {function}",
            "calls": ncalls,
            "own_ms": tottime * 1e3,
            "cumulative_ms": cumtime * 1e3,
        }
        for (file, line, function), (_, ncalls, tottime, cumtime, _) in stats.items()
        if PACKAGE_DIR in file
    ]
    python_rows.sort(key=lambda r: r["cumulative_ms"], reverse=True)
    return op_rows, python_rows[: args.top], watch, launches


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.smoke:
        args.train_length, args.decode_context, args.decode_steps, args.top = 32, 16, 2, 10
    phases = {}
    for variant in args.variants:
        model = build_model(variant, args.smoke, args.device)
        ids = torch.randint(3, model.config.vocab_size, (1, args.train_length), device=args.device)
        model.train()
        training_step(model, ids)  # warm-up
        phases[f"{variant}_train"] = profile_phase(args, f"{variant}_train", partial(training_step, model, ids))
        model.eval()
        context = torch.randint(3, model.config.vocab_size, (1, args.decode_context), device=args.device)
        phases[f"{variant}_decode"] = profile_phase(args, f"{variant}_decode", decode_steps(model, context, args.decode_steps))

    summary = []
    for label, (op_rows, python_rows, watch, launches) in phases.items():
        print_table(op_rows, list(op_rows[0]), title=f"{label}: top aten ops by self time (torch.profiler)")
        print_table(python_rows, list(python_rows[0]), title=f"{label}: modeling_titans functions (cProfile)")
        tokens = args.train_length if label.endswith("train") else args.decode_steps
        summary.append(
            {"phase": label, "tokens": tokens, "wall_s": watch.wall, "cpu_s": watch.cpu, "aten_calls": launches,
             "aten_calls/token": launches / tokens}
        )
    print_table(summary, list(summary[0]), title="Summary (cProfile run; profilers add overhead)")
    config = {k: getattr(args, k) for k in ("variants", "train_length", "decode_context", "decode_steps")}
    details = {label: {"ops": ops, "python": py} for label, (ops, py, _, _) in phases.items()}
    write_results(args, "profile_step", config, summary, phases=details)
    plot(args, phases)


def plot(args, phases):
    fig, axes = new_figure(ncols=len(phases), width=4.5, height=4.0)
    for ax, (label, (op_rows, _, _, _)) in zip(axes, phases.items()):
        names = [r["op"].replace("aten::", "")[:28] for r in op_rows][::-1]
        ax.barh(names, [r["self_%"] for r in op_rows][::-1])
        ax.set_xlabel("% of self time")
        ax.set_title(label)
        ax.tick_params(axis="y", labelsize=7)
    save_figure(fig, args, "profile_step.png")


if __name__ == "__main__":
    main()
