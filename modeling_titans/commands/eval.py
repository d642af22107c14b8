"""`titans eval`: how well a saved model answers a built-in long-context task, or how well it predicts a text.

    titans eval runs/passkey --task passkey --lengths 256,1024 --distances 64,512 --json results.json
    titans eval runs/passkey --task passkey --no-memory      # the same model with its memory frozen at M_0
    titans eval runs/passkey --lengths 65536 --forget-scale 0   # the memory forgets nothing at test time
    titans eval runs/passkey --lengths 16384,65536 --forget-scale length   # forgetting scaled to each length
    titans eval runs/book --text-file held_out.txt --lengths 512,2048   # bits per byte at each context length

Task mode: exact-match accuracy of greedy answers per context length and needle distance (see
`modeling_titans.evaluation.task_accuracy`). A context length is a full sequence `<s> prompt answer </s>` as
`titans train --seq-len` counts it; the needle distance is how far before the last prompt character the needle
ends; by default three distances per length, from the shortest to the longest the length allows. The tasks count
characters, which are tokens for the byte tokenizer; the table's `tokens` column is the mean distance in the
model's own tokens, and `/ window` divides that by the attention window.
Text mode (`--text-file`): bits per byte and perplexity, the text cut into sequences of each length, every
sequence scored from a fresh memory. `--no-memory` calls `model.set_memory_writes(False)`: the neural memory
stops learning at test time, which leaves only what attention sees (the ablation that shows what the memory adds).
`--forget-scale S` reads the memory's forgetting as S log(1 - alpha_t) (the config's `memory_forget_scale`): below
1 the memory keeps its writes longer than it learned to, for contexts longer than the training ones.
`--forget-scale length` sets S = (training length) / (context length), at most 1, for each length: the memory
then forgets over the whole context what it forgot over one training sequence. The training length is the longest
`--seq-len` of the model's `training_summary.json`, or `--trained-length N`.
`--max-norm R` bounds every memory weight matrix's Frobenius norm by R where a chunk closes (`memory_max_norm`).
"""

import json
import math
import os

from ..tasks import TASKS
from . import CommandError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "eval", help="accuracy on a built-in task, or bits per byte on a text", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model_dir", metavar="DIR", help="a folder written by `titans train` or save_pretrained")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", help=f"{', '.join(TASKS)} (default: the task the model was trained on)")
    source.add_argument("--text-file", metavar="FILE", help="score this UTF-8 text (.txt, or .jsonl with a text field)")
    parser.add_argument("--lengths", help="comma-separated context lengths in tokens (default: the training length)")
    parser.add_argument("--distances", help="task: comma-separated needle distances in tokens (default: 3 per length)")
    parser.add_argument("--num-examples", type=int, default=20, help="task: examples per length and distance (default 20)")
    parser.add_argument("--max-sequences", type=int, help="text: score at most this many sequences per length")
    parser.add_argument("--split", choices=("test", "validation"), default="test", help="task examples' split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="freeze the neural memory (no test-time writes)")
    parser.add_argument(
        "--forget-scale", metavar="S",
        help="multiply the memory's log(1 - alpha_t) by S (memory_forget_scale; 0: no forgetting; default: as saved), "
        "or `length`: S = training length / context length, at most 1, for each length",
    )
    parser.add_argument(
        "--trained-length", type=int, metavar="N",
        help="the longest training sequence, for --forget-scale length (default: from training_summary.json)",
    )
    parser.add_argument(
        "--max-norm", type=float, metavar="R",
        help="bound each memory weight matrix's norm by R where a chunk closes (memory_max_norm; default: as saved)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--json", metavar="OUT", help="write the results (and every answer) to this JSON file")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..checkpoints import load_model_and_tokenizer
    from ..evaluation import MAX_EVAL_LENGTH, check_task_cell, default_distances

    trained = read_training_summary(args.model_dir)
    for flag in ("num_examples", "batch_size", "max_sequences"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CommandError(f"--{flag.replace('_', '-')} {value}: must be at least 1.")
    trained_length = trained.get("training", {}).get("seq_len")
    trained_length = max(trained_length) if isinstance(trained_length, list) else trained_length
    lengths = parse_ints("--lengths", args.lengths) if args.lengths else [trained_length or 256]
    text = None
    if args.text_file:
        if args.distances:
            raise CommandError("--distances is for tasks; a text is scored at each of --lengths.")
        text = read_texts(args.text_file)
        for length in lengths:
            if not 2 <= length <= MAX_EVAL_LENGTH:
                raise CommandError(f"Length {length}: use 2 to {MAX_EVAL_LENGTH:,} tokens.")
        cells = lengths
    else:
        task = args.task or trained.get("data", {}).get("task") or "passkey"
        if task not in TASKS:
            raise CommandError(f"Unknown task {task!r}; available: {', '.join(TASKS)}.")
        distances = parse_ints("--distances", args.distances) if args.distances else None
        cells = []
        for length in lengths:
            try:
                for distance in distances or default_distances(task, length):
                    check_task_cell(task, length, distance)
                    cells.append((length, distance))
            except ValueError as error:
                raise CommandError(str(error)) from None

    forget_scale = parse_forget_scale(args.forget_scale)
    forget_scales = forget_scale_per_length(forget_scale, lengths, args.trained_length, trained_length, args.model_dir)
    if args.max_norm is not None and not 0.0 < args.max_norm < math.inf:
        raise CommandError(f"--max-norm {args.max_norm}: must be a finite number > 0.")

    model, tokenizer = load_model_and_tokenizer(args.model_dir, device=args.device)
    is_titans = model.config.model_type == "titans"
    for flag, given in (("--no-memory", args.no_memory), ("--forget-scale", args.forget_scale is not None),
                        ("--max-norm", args.max_norm is not None)):
        if given and not is_titans:
            raise CommandError(f"{flag} needs a Titans model; {args.model_dir} holds a {model.config.model_type}.")
    if args.no_memory:
        model.set_memory_writes(False)
    if args.max_norm is not None:
        model.config.memory_max_norm = args.max_norm
    memory = {"memory": not args.no_memory}
    if is_titans:
        memory["memory_forget_scale"] = model.config.memory_forget_scale if forget_scale is None else forget_scale
        memory["memory_max_norm"] = model.config.memory_max_norm
    if forget_scale == "length":
        memory["memory_forget_scale_per_length"] = forget_scales
    if text is not None:
        results = score_text(model, tokenizer, text, cells, args, forget_scales)
        report = {"model": args.model_dir, "text_file": args.text_file, **memory, "results": results}
    else:
        results = answer_task(model, tokenizer, task, cells, args, forget_scales)
        report = {"model": args.model_dir, "task": task, "split": args.split, **memory, "seed": args.seed,
                  "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"Wrote {args.json}")
    return 0


def read_training_summary(model_dir: str) -> dict:
    from ..training import SUMMARY_NAME

    path = os.path.join(model_dir, SUMMARY_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def parse_forget_scale(text: str | None) -> float | str | None:
    """`--forget-scale`: None (as saved), a finite number >= 0, or "length"."""
    if text is None or text == "length":
        return text
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not 0.0 <= scale < math.inf:
        raise CommandError(f"--forget-scale {text}: must be a finite number >= 0, or `length`.")
    return scale


def forget_scale_per_length(forget_scale, lengths: list[int], given_length, saved_length, model_dir: str):
    """{context length: memory_forget_scale}, or None to keep the saved scale. For "length", N / length (at most 1),
    N the training length (`--trained-length`, else the summary's): over a context of T tokens the memory then
    keeps (1 - alpha)^(s T), what it kept over one training sequence, the length its forget rates were learned at."""
    if given_length is not None and forget_scale != "length":
        raise CommandError("--trained-length is for --forget-scale length.")
    if given_length is not None and given_length < 1:
        raise CommandError(f"--trained-length {given_length}: must be at least 1.")
    if forget_scale != "length":
        return None if forget_scale is None else dict.fromkeys(lengths, forget_scale)
    trained_length = saved_length if given_length is None else given_length
    if trained_length is None:
        raise CommandError(
            f"--forget-scale length needs the training length: {model_dir} has no training_summary.json with it; "
            "pass --trained-length N."
        )
    return {length: min(1.0, trained_length / length) for length in lengths}


def set_forget_scale(model, forget_scales: dict | None, length: int):
    """Reads the forgetting of every memory at `length` tokens as `--forget-scale` asked (no-op without it)."""
    if forget_scales is not None:
        model.config.memory_forget_scale = forget_scales[length]  # the memory layers read it at every call


def read_texts(path: str) -> list[str]:
    from ..data import load_text_dataset

    return list(load_text_dataset([path])["text"])


def memory_label(args, forget_scales: dict | None) -> str:
    """How the memory ran, for the printed tables."""
    label = "off (--no-memory)" if args.no_memory else "on"
    if forget_scales is not None and len(set(forget_scales.values())) == 1:
        label += f", forget scale {next(iter(forget_scales.values())):g}"
    elif forget_scales is not None:
        label += ", forget scale " + ", ".join(f"{scale:.3g} at {length}" for length, scale in forget_scales.items())
    return label if args.max_norm is None else f"{label}, max norm {args.max_norm:g}"


def parse_ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise CommandError(f"{flag} {text!r}: expected comma-separated integers, e.g. 256,1024.") from error
    if not values:
        raise CommandError(f"{flag} {text!r}: expected at least one integer.")
    return values


def answer_task(model, tokenizer, task: str, cells, args, forget_scales: dict | None) -> list[dict]:
    from tqdm.auto import tqdm

    from ..evaluation import task_accuracy
    from ..layers.token_mixers import attention_reach

    results = []
    with tqdm(total=len(cells) * args.num_examples, desc="answering", unit="example") as bar:
        for length, distance in cells:
            set_forget_scale(model, forget_scales, length)
            results.append(
                task_accuracy(
                    model, tokenizer, task, length, distance, args.num_examples, args.split, args.seed,
                    args.batch_size, progress=bar.update,
                )
            )
    window = attention_reach(model.config) if getattr(model.config, "model_type", None) == "titans" else None
    print(f"\n{task} ({args.split} split), memory {memory_label(args, forget_scales)}, {args.model_dir}")
    header = f"{'length':>8} {'distance':>9} {'tokens':>8} {'/ window':>9} {'accuracy':>9}  correct"
    print(header)
    print("-" * len(header))
    for cell in results:
        tokens = cell["needle_distance_tokens"]
        ratio = f"{tokens / window:.1f}x" if window else "-"
        print(
            f"{cell['length']:>8} {cell['needle_distance']:>9} {tokens:>8.0f} {ratio:>9} {cell['accuracy']:>8.1%}  "
            f"{cell['correct']}/{cell['total']}"
        )
    correct, total = sum(c["correct"] for c in results), sum(c["total"] for c in results)
    print(f"{'all':>8} {'':>9} {'':>8} {'':>9} {correct / total:>8.1%}  {correct}/{total}")
    return results


def score_text(model, tokenizer, texts: list[str], lengths: list[int], args, forget_scales: dict | None) -> list[dict]:
    from tqdm.auto import tqdm

    from ..evaluation import text_bits_per_byte

    results = []
    for length in lengths:
        set_forget_scale(model, forget_scales, length)
        with tqdm(desc=f"scoring {length}-token sequences", unit="sequence") as bar:
            try:
                results.append(
                    text_bits_per_byte(model, tokenizer, texts, length, args.batch_size, args.max_sequences, bar.update)
                )
            except ValueError as error:
                raise CommandError(f"{args.text_file}: {error}") from None
    print(f"\n{args.text_file}, memory {memory_label(args, forget_scales)}, {args.model_dir}")
    header = f"{'length':>8} {'sequences':>10} {'bits/byte':>10} {'perplexity':>11}"
    print(header)
    print("-" * len(header))
    for cell in results:
        print(f"{cell['seq_len']:>8} {cell['sequences']:>10} {cell['bits_per_byte']:>10.4f} {cell['perplexity']:>11.3f}")
    return results
