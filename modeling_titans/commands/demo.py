"""`titans demo`: the main job in one command (see `modeling_titans/demo.py` for what it does).

    titans demo                                  # about 10 minutes on one CPU core, no internet
    titans demo --steps 3000 --seed 1            # longer training, another seed
    titans demo --train-baseline                 # also train a same-size model whose memory never learns
    titans demo --memory-depth 2                 # the paper's deep memory instead of a matrix memory
    titans demo --quick                          # seconds: a tiny model and a few steps (checks the plumbing)
"""

import argparse
import json
import os
import time

from . import CommandError

DEFAULT_OUTPUT_DIR = os.path.join("runs", "demo")

# --quick: the tiny preset and a handful of steps. It runs the whole pipeline in seconds; it does not learn recall.
QUICK = {"preset": "tiny", "steps": 4, "batch_size": 2, "seq_lens": "176", "eval_examples": 2, "eval_every": 2}


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="train a small Titans on CPU and watch it recall beyond its attention window (about 10 minutes)",
        description="Train a small Titans on CPU on the built-in passkey task, measure recall far beyond its "
        "attention window with and without its memory, and answer a prompt through pipeline().",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR", help="replaces an earlier demo there")
    parser.add_argument("--preset", default="demo", help="model size")
    parser.add_argument("--variant", help="mac, mag, mal or lmm (default: the preset's)")
    parser.add_argument(
        "--memory-depth", type=int,
        help="layers of the memory MLP (default: the preset's; the demo's is 1, a matrix memory); 2 or more is the "
        "paper's deep memory, trained with the larger inner step it needs",
    )
    parser.add_argument("--steps", type=int, default=2000, help="training steps in all phases")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--seq-lens",
        default="192,192,192,384",
        help="curriculum: training sequence length of each phase, in tokens; the steps are split evenly",
    )
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    parser.add_argument("--eval-examples", type=int, default=50, help="test examples per needle distance")
    parser.add_argument("--train-baseline", action="store_true", help="also train a model without test-time memory")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (this model's matmuls are too small to gain from more)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: the plumbing in seconds")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    seq_lens = check_arguments(args)
    check_output_dir(args.output_dir)

    import torch
    from transformers.utils import logging as transformers_logging

    from ..demo import RESULTS_NAME, demo_config, print_summary, run_demo
    from ..tokenization import TitansByteTokenizer

    torch.set_num_threads(args.threads)
    started = time.time()
    try:
        config = demo_config(args.preset, args.variant, args.memory_depth)
    except ValueError as error:
        raise CommandError(str(error)) from error
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bars between the demo's tables
    try:
        results = run_demo(
            config,
            TitansByteTokenizer(),
            args.output_dir,
            seq_lens,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            eval_every=args.eval_every,
            eval_examples=args.eval_examples,
            train_baseline=args.train_baseline,
            seed=args.seed,
        )
    finally:
        transformers_logging.enable_progress_bar()
    results["seconds"] = round(time.time() - started, 1)
    results["model"]["preset"] = args.preset
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, RESULTS_NAME)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2)
    print_summary(results, results_path)
    return 0


def check_arguments(args) -> list[int]:
    """The curriculum's sequence lengths; CommandError for values that cannot run."""
    from ..tasks import shortest_sequence

    for flag in ("steps", "batch_size", "eval_every", "eval_examples", "threads", "memory_depth"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CommandError(f"--{flag.replace('_', '-')} {value}: must be at least 1.")
    if args.learning_rate <= 0:
        raise CommandError(f"--learning-rate {args.learning_rate}: must be positive.")
    try:
        seq_lens = [int(item) for item in args.seq_lens.split(",") if item.strip()]
    except ValueError as error:
        raise CommandError(f"--seq-lens {args.seq_lens!r}: expected comma-separated integers, e.g. 192,384.") from error
    shortest = shortest_sequence("passkey")
    if not seq_lens or min(seq_lens) < shortest:
        raise CommandError(f"--seq-lens {args.seq_lens!r}: every length must be at least {shortest} for passkey.")
    if args.steps < len(seq_lens):
        raise CommandError(f"--steps {args.steps}: need at least one step per curriculum phase ({len(seq_lens)}).")
    return seq_lens


def check_output_dir(output_dir: str):
    """The demo replaces an earlier demo's output (`model/` and its results file), never anything else."""
    from ..demo import RESULTS_NAME

    others = set(os.listdir(output_dir)) - {"model", RESULTS_NAME} if os.path.isdir(output_dir) else set()
    if others:
        raise CommandError(
            f"{output_dir} holds files that no demo wrote (e.g. {sorted(others)[0]}); choose another --output-dir."
        )
