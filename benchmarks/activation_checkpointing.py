"""Peak memory and time of one training step with and without activation checkpointing.

Each measurement runs in a fresh process, so that the peak it reports belongs to that step alone: on CPU the
growth of the process's peak resident set size (ru_maxrss) over the training step, on CUDA
`torch.cuda.max_memory_allocated`. Checkpointing recomputes each decoder layer in backward, so the activations
of only one layer (plus the layer inputs) are alive at a time; the loss and gradients are the same
(`tests/test_training.py` checks that).

    python benchmarks/activation_checkpointing.py                      # MAG, 1K-8K tokens
    python benchmarks/activation_checkpointing.py --variants mag mac --lengths 2048 16384 --device cuda
"""

from __future__ import annotations

import torch

from modeling_titans.configuration.configuration_titans import VARIANTS

from harness import (
    Stopwatch,
    build_model,
    new_figure,
    parse_args,
    peak_bytes,
    print_table,
    run_in_child,
    save_figure,
    titans_config,
    write_results,
)


def add_arguments(parser):
    parser.add_argument("--variants", nargs="+", default=["mag"], choices=VARIANTS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 8192])


def one_step(variant, length, checkpointing, smoke, device, threads, results):
    """Child process: builds the model, runs one forward + backward, reports the peak growth and the time."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(variant, smoke, device).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    input_ids = torch.randint(3, model.config.vocab_size, (1, length), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(device)
    with Stopwatch(device) as watch:
        model(input_ids, labels=input_ids).loss.backward()
    results.put({"peak MiB": (peak_bytes(device) - before) / 2**20, "step s (cpu)": watch.cpu, "step s (wall)": watch.wall})


def measure(args, variant, length, checkpointing) -> dict:
    row = run_in_child(one_step, variant, length, checkpointing, args.smoke, args.device, args.threads)
    return {"model": variant, "tokens": length, "checkpointing": checkpointing, **row}


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    lengths = [16, 32] if args.smoke else args.lengths
    rows = [
        measure(args, variant, length, checkpointing)
        for variant in args.variants
        for length in lengths
        for checkpointing in (False, True)
    ]
    print_table(rows, ["model", "tokens", "checkpointing", "peak MiB", "step s (cpu)", "step s (wall)"])
    config = titans_config(args.variants[0], args.smoke).to_dict()
    write_results(args, "activation_checkpointing", {"lengths": lengths, "model": config}, rows)

    fig, (axis,) = new_figure()
    for variant in args.variants:
        for checkpointing in (False, True):
            points = [r for r in rows if r["model"] == variant and r["checkpointing"] == checkpointing]
            axis.plot(
                [r["tokens"] for r in points],
                [r["peak MiB"] for r in points],
                marker="o",
                linestyle="-" if checkpointing else "--",
                label=f"{variant}, checkpointing {'on' if checkpointing else 'off'}",
            )
    axis.set(xlabel="sequence length (tokens)", ylabel="peak memory of one training step (MiB)", xscale="log")
    axis.legend()
    save_figure(fig, args, "activation_checkpointing.png")


if __name__ == "__main__":
    main()
