"""Recall far beyond the training length: a passkey model trained by `titans demo`, fine-tuned on sequences of
growing length, then scored at long contexts with its forgetting as trained and scaled, and with its writes off.

Each phase is one `modeling_titans.training.train_on_tasks` call that continues the model of the phase before
(its own warm-up and schedule; the validation loss at the phase's length, at its start and end), and each phase's
model is saved. The final model is scored on `--split` examples at every `--eval-lengths` length, needles at the
three distances `titans eval` uses by default (nearest, middle, farthest), once per `--forget-scales` value
(`memory_forget_scale`, read at test time); and, as the control, with its memory's writes off at the first
length (attention alone, which cannot reach those needles).

    python benchmarks/passkey_curriculum.py                  # MAL: titans demo, then 4K, 16K, 16K; scored at 16K, 64K
    python benchmarks/passkey_curriculum.py --start runs/demo-mal/model --forget-scales 1 0.1
    python benchmarks/passkey_curriculum.py --variant mag --phases 4096:300:2:1e-3 16384:80:1:5e-4

A phase is LENGTH:STEPS:BATCH:LEARNING_RATE[:SEED], SEED the seed of its training examples (default --seed).
The default is the MAL recipe of benchmarks/README.md ("Recall at 16K-64K"): ~28 CPU-minutes of training with the
demo, ~35 with the scoring.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from harness import (
    Stopwatch,
    new_figure,
    parse_args,
    print_table,
    save_figure,
    write_results,
)

from modeling_titans.configuration.configuration_titans import VARIANTS

TASK = "passkey"
DEFAULT_PHASES = ("4096:300:2:1e-3", "16384:80:1:5e-4", "16384:80:1:5e-4:1")
# Seconds-long smoke runs: `titans demo --quick`, two short phases (the second with its own example seed), one
# short length, two examples per cell.
SMOKE = {"phases": ("176:2:1:1e-3", "176:1:2:5e-4:3"), "eval_lengths": [184], "eval_examples": 2}


@dataclass
class Phase:
    length: int
    steps: int
    batch_size: int
    learning_rate: float
    seed: int


def parse_phase(text: str, default_seed: int) -> Phase:
    """LENGTH:STEPS:BATCH:LEARNING_RATE[:SEED] -> Phase; ValueError naming the problem."""
    fields = text.split(":")
    if len(fields) not in (4, 5):
        raise ValueError(f"phase {text!r}: expected LENGTH:STEPS:BATCH:LEARNING_RATE[:SEED], e.g. 4096:300:2:1e-3")
    try:
        phase = Phase(int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3]),
                      int(fields[4]) if len(fields) == 5 else default_seed)
    except ValueError:
        message = f"phase {text!r}: LENGTH, STEPS, BATCH and SEED are integers, LEARNING_RATE a number"
        raise ValueError(message) from None
    if min(phase.length, phase.steps, phase.batch_size) < 1 or not phase.learning_rate > 0:
        raise ValueError(f"phase {text!r}: length, steps and batch must be at least 1, the learning rate positive")
    return phase


def add_arguments(parser):
    parser.add_argument("--variant", choices=VARIANTS, default="mal", help="the demo's variant (without --start)")
    parser.add_argument("--start", metavar="DIR", help="a saved model to fine-tune (default: train one with "
                        "`titans demo --variant VARIANT` into TRAIN_DIR/demo)")
    parser.add_argument("--phases", nargs="+", default=DEFAULT_PHASES, metavar="LEN:STEPS:BATCH:LR[:SEED]")
    parser.add_argument("--train-dir", default=os.path.join("runs", "passkey_curriculum"),
                        help="where the demo and each phase's model are saved; must be new or empty")
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--forget-scales", type=float, nargs="+", default=[1.0], help="memory_forget_scale values")
    parser.add_argument("--eval-examples", type=int, default=20, help="examples per length and needle distance")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--seed", type=int, default=0)


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.smoke:
        vars(args).update(SMOKE, train_dir=os.path.join(args.out, "models"))
    try:
        phases = [parse_phase(text, args.seed) for text in args.phases]
        check_settings(args, phases)
    except ValueError as error:
        raise SystemExit(f"passkey_curriculum: {error}") from None

    from modeling_titans.checkpoints import load_model_and_tokenizer

    start = args.start or train_demo(args)
    model, tokenizer = load_model_and_tokenizer(start, device=args.device)
    trained = [train_phase(model, tokenizer, phase, index, args) for index, phase in enumerate(phases)]
    model.eval()
    rows = []
    for length in args.eval_lengths:
        for scale in args.forget_scales:
            rows += score(model, tokenizer, length, scale, True, args)
    rows += score(model, tokenizer, args.eval_lengths[0], model.config.memory_forget_scale, False, args)
    print_table(trained, ["length", "steps", "batch_size", "learning_rate", "seed", "cpu_s"], title="Phases")
    table = [dict(row, memory_writes="on" if row["memory_writes"] else "off") for row in rows]
    print_table(table, ["length", "needle_distance", "forget_scale", "memory_writes", "correct", "total", "accuracy",
                        "digit_accuracy"], title=f"Passkey, {args.split} split")
    keys = ("variant", "start", "train_dir", "eval_lengths", "forget_scales", "eval_examples", "split", "seed")
    write_results(args, "passkey_curriculum", {k: getattr(args, k) for k in keys}, rows, phases=trained)
    plot(args, rows)


def check_settings(args, phases: list[Phase]):
    """ValueError for settings that cannot run, before any training."""
    from modeling_titans.evaluation import default_distances
    from modeling_titans.tasks import shortest_sequence

    shortest = shortest_sequence(TASK)
    for phase in phases:
        if phase.length < shortest:
            needed = f"a {TASK} training sequence needs at least {shortest} tokens"
            raise ValueError(f"phase length {phase.length}: {needed}")
    for length in args.eval_lengths:
        default_distances(TASK, length)
    if args.start is not None and not os.path.isdir(args.start):
        raise ValueError(f"--start {args.start}: no such folder")
    if not all(0 <= scale < float("inf") for scale in args.forget_scales):
        raise ValueError(f"--forget-scales {args.forget_scales}: each must be a finite number >= 0")
    if min(args.eval_examples, args.eval_batch_size) < 1:
        raise ValueError("--eval-examples and --eval-batch-size must be at least 1")
    if os.path.exists(args.train_dir) and os.listdir(args.train_dir):
        raise ValueError(f"--train-dir {args.train_dir} is not empty; choose another folder (nothing is replaced)")


def train_demo(args) -> str:
    """Trains the start model with `titans demo` (`--quick` in smoke runs); returns the saved model's folder."""
    from modeling_titans.cli import main as titans

    demo_dir = os.path.join(args.train_dir, "demo")
    quick = ["--quick"] if args.smoke else []
    if titans(["demo", "--variant", args.variant, "--seed", str(args.seed), "--output-dir", demo_dir, *quick]) != 0:
        raise SystemExit("passkey_curriculum: titans demo failed")
    return os.path.join(demo_dir, "model")


def train_phase(model, tokenizer, phase: Phase, index: int, args) -> dict:
    """Continues training `model` in place for one phase and saves it; returns the phase, its time and losses."""
    from modeling_titans.training import train_on_tasks

    print(f"\nPhase {index + 1}: {phase.steps} steps of {phase.batch_size} x {phase.length} tokens, "
          f"learning rate {phase.learning_rate:g}, example seed {phase.seed}")
    with Stopwatch(args.device) as watch:
        history = train_on_tasks(
            model, tokenizer, [TASK], [phase.length], steps=phase.steps, batch_size=phase.batch_size,
            learning_rate=phase.learning_rate, eval_every=phase.steps, eval_examples=4, seed=phase.seed,
        )
    model_dir = os.path.join(args.train_dir, f"phase{index + 1}-{phase.length}")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {**asdict(phase), "cpu_s": round(watch.cpu, 1), "wall_s": round(watch.wall, 1),
            "validation_loss": history["validation_loss"], "model_dir": model_dir}


def score(model, tokenizer, length: int, forget_scale: float, memory_writes: bool, args) -> list[dict]:
    """One row per needle distance: exact and per-digit accuracy at `length` with the given memory setting."""
    from modeling_titans.demo import recall
    from modeling_titans.evaluation import default_distances

    as_trained = model.config.memory_forget_scale
    model.config.memory_forget_scale = forget_scale  # the memory layers read it at every call
    try:
        cells = recall(model, tokenizer, length, default_distances(TASK, length), args.eval_examples, args.seed,
                       memory_writes, split=args.split, batch_size=args.eval_batch_size)
    finally:
        model.config.memory_forget_scale = as_trained
    return [{"length": length, "forget_scale": forget_scale, "memory_writes": memory_writes, **cell} for cell in cells]


def plot(args, rows):
    """One panel per length: exact match against needle distance, one line per memory setting."""
    fig, axes = new_figure(ncols=len(args.eval_lengths), width=4.0, height=3.2)
    for ax, length in zip(axes, args.eval_lengths):
        settings = dict.fromkeys((r["forget_scale"], r["memory_writes"]) for r in rows if r["length"] == length)
        for scale, writes in settings:
            cells = [r for r in rows if (r["length"], r["forget_scale"], r["memory_writes"]) == (length, scale, writes)]
            label = f"forget scale {scale:g}" if writes else "memory writes off"
            ax.plot([r["needle_distance"] for r in cells], [r["accuracy"] for r in cells], marker="o", label=label)
        ax.set_title(f"{length:,} tokens", fontsize=9)
        ax.set_xlabel("needle distance (tokens back)", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("exact match", fontsize=8)
    save_figure(fig, args, "passkey_curriculum.png")


if __name__ == "__main__":
    main()
