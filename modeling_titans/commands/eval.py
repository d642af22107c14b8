"""`titans eval`: exact-match accuracy of a saved model on a built-in task, per context length and needle distance.

    titans eval runs/passkey --task passkey --lengths 256,1024 --distances 64,512 --json results.json
    titans eval runs/passkey --task passkey --no-memory      # the same model with its memory frozen at M_0

A context length is a full sequence `<s> prompt answer </s>` in tokens, as `titans train --seq-len` counts it.
The needle distance is how many tokens before the last prompt token the needle ends (`modeling_titans.tasks`);
by default three distances per length, from the shortest to the longest the length allows. Answers are decoded
greedily, in left-padded batches; an answer counts when the generated text starts with it (`answer_is_correct`).
`--no-memory` calls `model.set_memory_writes(False)`: the neural memory stops learning at test time, which
leaves only what attention sees (the ablation that shows what the memory adds).
"""

import json
import os

from ..cli import CommandError
from .train import DEFAULT_TASK, SUMMARY_NAME


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "eval", help="accuracy on a built-in long-context task", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model_dir", metavar="DIR", help="a folder written by `titans train` or save_pretrained")
    parser.add_argument("--task", help="passkey, recall or babi (default: the task the model was trained on)")
    parser.add_argument("--lengths", help="comma-separated context lengths in tokens (default: the training length)")
    parser.add_argument("--distances", help="comma-separated needle distances in tokens (default: 3 per length)")
    parser.add_argument("--num-examples", type=int, default=20, help="examples per length and distance")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="freeze the neural memory (no test-time writes)")
    parser.add_argument("--json", metavar="OUT", help="write the results (and every answer) to this JSON file")
    parser.set_defaults(run=run)


def run(args) -> int:
    from modeling_titans.tasks import TASKS, minimum_length, needle_distance_range

    from .generate import load_model_and_tokenizer

    trained = read_training_summary(args.model_dir)
    task = args.task or trained.get("data", {}).get("task") or DEFAULT_TASK
    if task not in TASKS:
        raise CommandError(f"Unknown task {task!r}; available: {', '.join(TASKS)}.")
    default_length = trained.get("training", {}).get("seq_len", 256)
    lengths = parse_ints("--lengths", args.lengths) if args.lengths else [default_length]
    distances = parse_ints("--distances", args.distances) if args.distances else None
    for flag in ("num_examples", "batch_size"):
        if getattr(args, flag) < 1:
            raise CommandError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1.")
    shortest = minimum_length(task) + 2
    cells = []
    for length in lengths:
        if length < shortest:
            raise CommandError(f"Length {length} is too short for the {task} task: use at least {shortest}.")
        lowest, highest = needle_distance_range(task, length - 2)
        for distance in distances or sorted({lowest, (lowest + highest) // 2, highest}):
            if not lowest <= distance <= highest:
                raise CommandError(f"Needle distance {distance} does not fit length {length}: use {lowest} to {highest}.")
            cells.append((length, distance))

    model, tokenizer = load_model_and_tokenizer(args.model_dir)
    if args.no_memory:
        if not hasattr(model, "set_memory_writes"):
            raise CommandError(f"--no-memory needs a Titans model; {args.model_dir} holds a {model.config.model_type}.")
        model.set_memory_writes(False)
    results = [evaluate_cell(model, tokenizer, task, length, distance, args) for length, distance in cells]
    print_table(results, task, args, attention_window(model.config))
    if args.json:
        report = {
            "model": args.model_dir,
            "task": task,
            "split": args.split,
            "memory": not args.no_memory,
            "seed": args.seed,
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"Wrote {args.json}")
    return 0


def read_training_summary(model_dir: str) -> dict:
    path = os.path.join(model_dir, SUMMARY_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def parse_ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise CommandError(f"{flag} {text!r}: expected comma-separated integers, e.g. 256,1024.") from error
    if not values:
        raise CommandError(f"{flag} {text!r}: expected at least one integer.")
    return values


def evaluate_cell(model, tokenizer, task: str, length: int, distance: int, args) -> dict:
    """Greedy answers to `num_examples` test examples of one length and needle distance."""
    import torch

    from modeling_titans.tasks import answer_is_correct, generate_examples

    examples = generate_examples(task, args.split, args.num_examples, length - 2, args.seed, distance)
    tokenizer.padding_side = "left"  # generation continues every row from the same last column
    answers = []
    for start in range(0, len(examples), args.batch_size):
        batch = examples[start : start + args.batch_size]
        inputs = tokenizer([example.prompt for example in batch], padding=True, return_tensors="pt")
        answer_tokens = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in batch)
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=answer_tokens + 1, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    records = [
        {"answer": example.answer, "generated": text, "correct": answer_is_correct(example, text)}
        for example, text in zip(examples, answers)
    ]
    correct = sum(record["correct"] for record in records)
    return {
        "length": length,
        "needle_distance": distance,
        "correct": correct,
        "total": len(records),
        "accuracy": correct / len(records),
        "examples": records,
    }


def attention_window(config) -> int | None:
    """Tokens the model's attention reaches back: the sliding window (MAG, MAL), the segment (MAC), none (LMM)."""
    return {"mag": config.sliding_window, "mal": config.sliding_window, "mac": config.segment_size}.get(
        getattr(config, "variant", None)
    )


def print_table(results: list[dict], task: str, args, window: int | None):
    memory = "off (--no-memory)" if args.no_memory else "on"
    print(f"\n{task} ({args.split} split), memory {memory}, {args.model_dir}")
    header = f"{'length':>8} {'distance':>9} {'/ window':>9} {'accuracy':>9}  correct"
    print(header)
    print("-" * len(header))
    for cell in results:
        ratio = f"{cell['needle_distance'] / window:.1f}x" if window else "-"
        print(
            f"{cell['length']:>8} {cell['needle_distance']:>9} {ratio:>9} {cell['accuracy']:>8.1%}  "
            f"{cell['correct']}/{cell['total']}"
        )
    correct, total = sum(c["correct"] for c in results), sum(c["total"] for c in results)
    print(f"{'all':>8} {'':>9} {'':>9} {correct / total:>8.1%}  {correct}/{total}")
