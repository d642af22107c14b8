"""`titans demo`: the main job in one command. Trains a small Titans (MAG) on CPU on the built-in passkey task,
shows it recalling codes placed far beyond its attention window, and generates one answer through
`pipeline("text-generation")`.

    titans demo                                  # about 10 minutes on one CPU core, no internet
    titans demo --steps 3000 --seed 1            # longer training, another seed
    titans demo --train-baseline                 # also train a same-size model whose memory never learns
    titans demo --quick                          # seconds: a tiny model and a few steps (checks the plumbing)

What it does:
1. Trains the `demo` preset (`configuration/presets/demo.json`) on `passkey` examples (`modeling_titans.tasks`),
   loss on the answer. The needle always lies beyond the attention window (the question alone is longer than the
   window), so attention alone cannot answer. Training runs a length curriculum: short sequences first (few
   filler tokens write into the memory, so the signal that teaches the memory to store the code is strong),
   then longer ones. Most steps go to the short phases: they are cheap (a 192-token step costs about half of a
   384-token one). The preset's memory uses momentum (Eq. 14, eta_0 = 0.9) with a small inner learning rate
   (theta <= memory_lr_max = 0.02): without momentum the same recipe ends near validation loss 0.9 and no exact
   recall; with it the loss falls below 0.05 within about 1000 steps. The inner step stays stable: a chunk of
   c = 16 tokens moves the weights by about theta * sum_s (1 - eta^s) / (1 - eta) ~ 86 theta < 2
   gradients. The validation loss (answer tokens, validation split) is printed as it goes down.
2. Saves the model and tokenizer to `DIR/model` (loadable with the Auto classes).
3. Measures exact-match recall on the test split with needles at 8x and 16x the attention window, twice: as
   trained, and with the memory's test-time writes switched off (`model.set_memory_writes(False)`), which leaves
   attention alone with the needle out of its reach. With `--train-baseline`, a third row: a model of the same
   size trained the same way with its memory writes off throughout (sliding-window attention plus a fixed M_0).
4. Reloads the saved model with `AutoModelForCausalLM` and answers one test prompt through
   `pipeline("text-generation")`.
Everything is also written to `DIR/demo_results.json`.
"""

import argparse
import json
import math
import os
import time

from ..cli import CommandError

DEFAULT_OUTPUT_DIR = os.path.join("runs", "demo")
TASK = "passkey"
WINDOW_MULTIPLES = (8, 16)  # test needle distances, in attention windows
RESULTS_NAME = "demo_results.json"

# --quick: the tiny preset and a handful of steps. It runs the whole pipeline in seconds; it does not learn recall.
QUICK = {
    "preset": "tiny",
    "steps": 4,
    "batch_size": 2,
    "seq_lens": "176",
    "eval_examples": 2,
    "eval_every": 2,
}


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="train a small Titans on CPU and watch it recall beyond its attention window (about 10 minutes)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        metavar="DIR",
        help="default: runs/demo",
    )
    parser.add_argument("--preset", default="demo", help="model size (default: demo)")
    parser.add_argument("--variant", help="mac, mag, mal or lmm (default: the preset's, mag)")
    parser.add_argument(
        "--steps",
        type=int,
        default=2000,
        help="training steps in all phases (default: 2000)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--seq-lens",
        default="192,192,192,384",
        help="curriculum: training sequence length of each phase, in tokens; the steps are split evenly "
        "(default: 192,192,192,384)",
    )
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    parser.add_argument(
        "--eval-examples",
        type=int,
        default=50,
        help="test examples per needle distance",
    )
    parser.add_argument(
        "--train-baseline",
        action="store_true",
        help="also train a model without test-time memory",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: this model's matmuls are too small to gain from more)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, few steps: the plumbing in seconds",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    seq_lens = check_arguments(args)

    import torch
    from transformers.utils import logging as transformers_logging

    from modeling_titans import TitansConfig

    from .train import load_tokenizer

    torch.set_num_threads(args.threads)
    started = time.time()
    tokenizer = load_tokenizer(None)
    try:
        config = TitansConfig.from_preset(args.preset, **({"variant": args.variant} if args.variant else {}))
    except ValueError as error:
        raise CommandError(str(error)) from error
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bars between the demo's tables
    try:
        results = run_demo(config, tokenizer, seq_lens, args)
    finally:
        transformers_logging.enable_progress_bar()
    results["seconds"] = round(time.time() - started, 1)
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, RESULTS_NAME)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2)
    print_summary(results, results_path)
    return 0


def run_demo(config, tokenizer, seq_lens: list[int], args) -> dict:
    """Train, save, measure recall with and without the memory, reload and generate: the results as a dict."""
    from transformers import set_seed

    from .generate import load_model_and_tokenizer

    window = attention_window(config)
    distances = [multiple * window for multiple in WINDOW_MULTIPLES]
    eval_length = sequence_length_for(max(distances))
    print(
        f"Titans demo: {config.variant.upper()} model ({args.preset} preset), attention window {window} tokens, "
        f"task {TASK}; test needles at {', '.join(f'{d} tokens ({m}x)' for d, m in zip(distances, WINDOW_MULTIPLES))}."
    )
    set_seed(args.seed)
    model, history = train(config, tokenizer, seq_lens, args, memory_writes=True)
    model_dir = os.path.join(args.output_dir, "model")
    model.config.use_cache = True
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rows = {"Titans (memory on)": recall(model, tokenizer, eval_length, distances, args, memory_writes=True)}
    rows["same model, memory writes off"] = recall(model, tokenizer, eval_length, distances, args, memory_writes=False)
    baseline_history = None
    if args.train_baseline:
        set_seed(args.seed)
        baseline, baseline_history = train(config, tokenizer, seq_lens, args, memory_writes=False)
        rows["baseline trained without memory"] = recall(
            baseline, tokenizer, eval_length, distances, args, memory_writes=False
        )

    reloaded, reloaded_tokenizer = load_model_and_tokenizer(model_dir)
    generation = generate_answer(reloaded, reloaded_tokenizer, eval_length, max(distances), args.seed)
    return {
        "task": TASK,
        "model": {
            "preset": args.preset,
            "variant": config.variant,
            "num_parameters": model.num_parameters(),
            "attention_window": window,
            "model_dir": model_dir,
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "seq_lens": seq_lens,
            "seed": args.seed,
            **history,
        },
        "baseline_training": baseline_history,
        "recall": {
            "eval_length": eval_length,
            "distances": distances,
            "window_multiples": list(WINDOW_MULTIPLES),
            "examples_per_distance": args.eval_examples,
            "split": "test",
            "rows": rows,
        },
        "generation": generation,
    }


def check_arguments(args) -> list[int]:
    """The curriculum's sequence lengths; CommandError for values that cannot run."""
    from modeling_titans.tasks import minimum_length

    for flag in ("steps", "batch_size", "eval_every", "eval_examples", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CommandError(f"--{flag.replace('_', '-')} {value}: must be at least 1.")
    if args.learning_rate <= 0:
        raise CommandError(f"--learning-rate {args.learning_rate}: must be positive.")
    try:
        seq_lens = [int(item) for item in args.seq_lens.split(",") if item.strip()]
    except ValueError as error:
        raise CommandError(f"--seq-lens {args.seq_lens!r}: expected comma-separated integers, e.g. 192,384.") from error
    shortest = minimum_length(TASK) + 2  # + <s> and </s>
    if not seq_lens or min(seq_lens) < shortest:
        raise CommandError(f"--seq-lens {args.seq_lens!r}: every length must be at least {shortest} for {TASK}.")
    if args.steps < len(seq_lens):
        raise CommandError(f"--steps {args.steps}: need at least one step per curriculum phase ({len(seq_lens)}).")
    return seq_lens


def attention_window(config) -> int:
    """How far attention reaches back: the sliding window (MAG, MAL), the segment (MAC); LMM has no attention,
    so its test distances use the sliding_window field as the yardstick."""
    return config.segment_size if config.variant == "mac" else config.sliding_window


def sequence_length_for(distance: int) -> int:
    """The shortest sequence (tokens, with <s> and </s>) whose passkey examples can put the needle at `distance`."""
    from modeling_titans.tasks import minimum_length, needle_distance_range

    probe = minimum_length(TASK)
    room_before_needle = probe - needle_distance_range(TASK, probe)[1]
    return max(probe, distance + room_before_needle) + 2


def phase_steps(total: int, phases: int) -> list[int]:
    """`total` steps split as evenly as possible over the curriculum phases."""
    return [total // phases + (i < total % phases) for i in range(phases)]


def train(config, tokenizer, seq_lens: list[int], args, memory_writes: bool):
    """Trains a fresh Titans model on the demo task; returns the model and its loss history.
    `memory_writes=False` trains the memory-less baseline (memory frozen at M_0)."""
    from modeling_titans import TitansForCausalLM

    model = TitansForCausalLM(config)
    model.set_memory_writes(memory_writes)
    label = "Titans" if memory_writes else "baseline (no memory writes)"
    history = train_on_tasks(model, tokenizer, [TASK], seq_lens, args, label)
    model.set_memory_writes(True)
    return model.eval(), history


def train_on_tasks(model, tokenizer, tasks: list[str], seq_lens: list[int], args, label: str) -> dict:
    """Trains any causal LM in place with AdamW (warmup, cosine decay, clipping) over the length curriculum on an
    even mix of the built-in `tasks` (loss on the answer); returns the loss history. Reads `steps`, `batch_size`,
    `learning_rate`, `eval_every`, `eval_examples` and `seed` from `args`."""
    import torch

    from modeling_titans.data import TaskDataset

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def learning_rate_factor(step):  # linear warmup, then cosine down to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    # The validation loss is always measured on the longest training length, so the curve is comparable across
    # phases.
    validation = torch.utils.data.ConcatDataset(
        [TaskDataset(task, "validation", args.eval_examples, max(seq_lens), tokenizer, seed=args.seed) for task in tasks]
    )
    validation_batch = collate([validation[i] for i in range(len(validation))])
    history = {"train_loss": [], "validation_loss": [], "seconds": None}
    started, step, running = time.time(), 0, None
    print(f"\nTraining {label}: {model.num_parameters():,} parameters, {args.steps} steps, batch {args.batch_size}.")
    print(f"{'step':>6} {'seq len':>8} {'train loss':>11} {'val loss':>9} {'time':>7}")
    record_validation(model, validation_batch, history, step, seq_lens[0], running, started)
    for phase, (seq_len, steps) in enumerate(zip(seq_lens, phase_steps(args.steps, len(seq_lens)))):
        # A seed per phase: example i of a task is drawn from (seed, i), so phases with one seed would repeat codes.
        phase_seed = args.seed * len(seq_lens) + phase
        data = torch.utils.data.ConcatDataset(
            [
                TaskDataset(task, "train", count, seq_len, tokenizer, seed=phase_seed)
                for task, count in zip(tasks, phase_steps(steps * args.batch_size, len(tasks)))
            ]
        )
        # Several tasks: shuffled, so that every batch mixes them. One task: in order (the demo's recorded curve).
        order = torch.Generator().manual_seed(phase_seed)
        loader = torch.utils.data.DataLoader(
            data, batch_size=args.batch_size, collate_fn=collate, shuffle=len(tasks) > 1, generator=order
        )
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            history["train_loss"].append([step, round(loss.item(), 4)])
            if step % args.eval_every == 0 or step == args.steps:
                record_validation(model, validation_batch, history, step, seq_len, running, started)
    history["seconds"] = round(time.time() - started, 1)
    return history


def collate(items: list[dict]) -> dict:
    import torch

    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def record_validation(model, batch, history, step, seq_len, running, started):
    """Answer loss on the validation examples, printed as one row of the training table."""
    import torch

    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    history["validation_loss"].append([step, round(loss, 4)])
    train_loss = f"{running:.3f}" if running is not None else "-"
    print(
        f"{step:>6} {seq_len:>8} {train_loss:>11} {loss:>9.3f} {time.time() - started:>6.0f}s",
        flush=True,
    )


def recall(model, tokenizer, length: int, distances: list[int], args, memory_writes: bool) -> list[dict]:
    """Exact-match accuracy of greedy answers on the test split, one cell per needle distance (`titans eval`)."""
    from .eval import evaluate_cell

    settings = argparse.Namespace(split="test", num_examples=args.eval_examples, seed=args.seed, batch_size=25)
    model.set_memory_writes(memory_writes)
    try:
        cells = [evaluate_cell(model, tokenizer, TASK, length, distance, settings) for distance in distances]
    finally:
        model.set_memory_writes(True)
    return [
        {
            **{key: cell[key] for key in ("needle_distance", "correct", "total", "accuracy")},
            "digit_accuracy": sum(digits_right(r["answer"], r["generated"]) for r in cell["examples"]) / cell["total"],
        }
        for cell in cells
    ]


def digits_right(answer: str, generated: str) -> float:
    """Fraction of the code's digits generated at their place (chance: 10%); shows partial recall that exact
    match hides."""
    generated = generated.lstrip()
    return sum(a == g for a, g in zip(answer, generated)) / len(answer)


def generate_answer(model, tokenizer, length: int, distance: int, seed: int) -> dict:
    """One test prompt answered through `pipeline("text-generation")` (greedy)."""
    from transformers import pipeline

    from modeling_titans.tasks import answer_is_correct, generate_examples

    example = generate_examples(TASK, "test", 1, length - 2, seed=seed + 1, needle_distance=distance)[0]
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    answer_tokens = len(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
    output = generator(
        example.prompt,
        max_new_tokens=answer_tokens + 1,
        do_sample=False,
        return_full_text=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = output[0]["generated_text"]
    return {
        "needle": example.prompt[example.needle_start : example.needle_end],
        "needle_distance": example.needle_distance,
        "question": example.prompt.rsplit("\n", 1)[-1],
        "expected": example.answer,
        "generated": text,
        "correct": answer_is_correct(example, text),
    }


def print_summary(results: dict, results_path: str):
    recall_results, window = results["recall"], results["model"]["attention_window"]
    distances = recall_results["distances"]
    print(
        f"\nRecall on the {TASK} test split ({recall_results['examples_per_distance']} examples per distance, "
        f"sequences of {recall_results['eval_length']} tokens, attention window {window}):"
    )
    header = f"{'':<34}" + "".join(f"{f'needle {d} tokens back ({d // window}x)':>34}" for d in distances)
    print(header)
    print(f"{'model':<34}" + f"{'exact match':>20}{'digits right':>14}" * len(distances))
    print("-" * len(header))
    for name, cells in recall_results["rows"].items():
        print(f"{name:<34}" + "".join(f"{cell['accuracy']:>20.0%}{cell['digit_accuracy']:>14.0%}" for cell in cells))
    print("(chance: 0% exact match, 10% digits right)")
    validation = results["training"]["validation_loss"]
    print(
        f"\nValidation loss: {validation[0][1]:.3f} at step 0 -> {validation[-1][1]:.3f} at step "
        f"{validation[-1][0]} (chance: {math.log(10) * 5 / 6:.3f}, five random digits and </s>)."
    )
    generation = results["generation"]
    print(f"\npipeline('text-generation') on a test prompt, needle {generation['needle_distance']} tokens back:")
    print(f"  needle:    {generation['needle']}")
    print(f"  question:  {generation['question']}")
    print(
        f"  generated: {generation['generated']!r}  (expected {generation['expected']!r}: "
        f"{'correct' if generation['correct'] else 'wrong'})"
    )
    print(f"\nModel: {results['model']['model_dir']}  Results: {results_path}  Total time: {results['seconds']:.0f}s")
