"""Long-context recall: accuracy by context length x needle depth for the Titans variants, a sliding-window model
and a full-attention Llama of the same size, all trained with the same budget on the project's own tasks.

Training (skipped for a model already saved in `--train-dir`): every model gets the same backbone (the `demo`
preset's width, depth, heads and byte vocabulary), the same data (`--tasks`, an even mix when there are several:
passkey, multi-query associative recall, bAbI-style world questions, from `modeling_titans.tasks`), the same
optimizer, schedule, steps and length curriculum (`train_on_tasks` of `titans demo`: 2000 steps of 16
sequences, 192 then 384 tokens). The models:
- `mag`, `mac`, `mal`, `lmm`: Titans, attention window / segment of 32 tokens (the preset's);
- `swa`: transformers' `MistralForCausalLM` with a 32-token sliding window (attention only, no memory);
- `llama`: transformers' `LlamaForCausalLM`, full causal attention (SDPA).
Every needle is at least 43 tokens before the question, beyond the 32-token windows: the windowed models can
only answer through a memory. All models see at most 384 tokens in training and are tested at 1K-16K.

Evaluation: for each task, length and needle depth, `--examples` test-split examples (keys and values never seen
in training), greedy answers, exact match (`titans eval`'s `evaluate_cell`). The needle distances are spread
evenly over the range each length allows; a heatmap column is the needle's depth in the prompt (0 = at the
start, 1 = next to the question). `--checkpoint name=path` adds any other saved model.

    python benchmarks/long_context_recall.py --train-only --models mag lmm swa llama   # train, in two processes
    python benchmarks/long_context_recall.py --train-only --models mac mal
    python benchmarks/long_context_recall.py                                             # score all six, plot
    python benchmarks/long_context_recall.py --tasks passkey recall babi --train-dir runs/mix   # the task mix
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from harness import new_figure, parse_args, print_table, save_figure, write_results

MODELS = ("mag", "mac", "mal", "lmm", "swa", "llama")
TRAINING_NAME = "training.json"
# Seconds-long smoke runs: the tiny preset, a couple of steps, one short length.
SMOKE = dict(preset="tiny", steps=2, batch_size=2, eval_examples=2, depths=2, examples=1)


def add_arguments(parser):
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="NAME=PATH", help="also score these models")
    parser.add_argument("--tasks", nargs="+", default=["passkey"], help="trained on (an even mix) and scored on")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--depths", type=int, default=4, help="needle distances per length")
    parser.add_argument("--examples", type=int, default=10, help="test examples per cell")
    parser.add_argument("--eval-batch-size", type=int, default=10)
    training = parser.add_argument_group("training (the same for every model)")
    training.add_argument("--train-dir", default=os.path.join("runs", "long_context_recall"))
    training.add_argument("--train-only", action="store_true", help="train the missing models, then stop")
    training.add_argument("--retrain", action="store_true", help="train even when a saved model exists")
    training.add_argument("--preset", default="demo", help="backbone and Titans sizes (a TitansConfig preset)")
    training.add_argument("--steps", type=int, default=2000)
    training.add_argument("--batch-size", type=int, default=16)
    training.add_argument("--learning-rate", type=float, default=3e-3)
    training.add_argument("--seq-lens", type=int, nargs="+", default=[192, 192, 192, 384], help="curriculum")
    training.add_argument("--eval-every", type=int, default=250, help="steps between validation losses")
    training.add_argument("--eval-examples", type=int, default=16, help="validation examples per task")
    training.add_argument("--seed", type=int, default=0)


def new_model(name: str, preset: str):
    """A fresh model: a Titans variant of `preset`, or a Mistral (sliding window) / Llama with its backbone."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from modeling_titans import TitansConfig, TitansForCausalLM

    if name not in ("swa", "llama"):
        return TitansForCausalLM(TitansConfig.from_preset(preset, variant=name))
    titans = TitansConfig.from_preset(preset)
    backbone = {
        key: getattr(titans, key)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")
    }
    if name == "swa":
        return MistralForCausalLM(MistralConfig(sliding_window=titans.sliding_window, attn_implementation="sdpa", **backbone))
    return LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **backbone))


def train_missing(args, tokenizer) -> dict:
    """Trains each of `--models` without a saved copy in `--train-dir`; returns {name: folder}."""
    from transformers import set_seed

    from modeling_titans.commands.demo import train_on_tasks

    folders = {}
    for name in args.models:
        folder = os.path.join(args.train_dir, name)
        folders[name] = folder
        if os.path.exists(os.path.join(folder, TRAINING_NAME)) and not args.retrain:
            print(f"{name}: using the model saved in {folder}")
            continue
        set_seed(args.seed)
        model = new_model(name, args.preset)
        history = train_on_tasks(model, tokenizer, args.tasks, args.seq_lens, args, label=name)
        model.config.use_cache = True
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        budget = {k: getattr(args, k) for k in ("preset", "tasks", "steps", "batch_size", "learning_rate", "seq_lens", "seed")}
        summary = {"model": name, "num_parameters": model.num_parameters(), "budget": budget, **history}
        with open(os.path.join(folder, TRAINING_NAME), "w") as f:  # written last: marks a finished model
            json.dump(summary, f, indent=2)
    return folders


def needle_distances(task: str, text_length: int, count: int) -> list[int]:
    """`count` distances spread evenly over what `text_length` allows, farthest (deepest needle) first."""
    from modeling_titans.tasks import needle_distance_range

    lowest, highest = needle_distance_range(task, text_length)
    if count == 1:
        return [highest]
    return [round(highest - i * (highest - lowest) / (count - 1)) for i in range(count)]


def evaluate(name: str, folder: str, tokenizer, args) -> list[dict]:
    """One row per task x length x needle distance: exact-match accuracy of greedy answers on the test split."""
    from transformers import AutoModelForCausalLM

    import modeling_titans  # noqa: F401 (registers the Titans Auto classes)
    from modeling_titans.commands.eval import evaluate_cell

    model = AutoModelForCausalLM.from_pretrained(folder).to(args.device).eval()
    settings = argparse.Namespace(split="test", num_examples=args.examples, seed=0, batch_size=args.eval_batch_size)
    rows = []
    for task in args.tasks:
        for length in args.lengths:
            for distance in needle_distances(task, length - 2, args.depths):  # length counts <s> and </s>
                cell = evaluate_cell(model, tokenizer, task, length, distance, settings)
                depth = 1 - distance / (length - 2)
                row = {"model": name, "task": task, "length": length, "needle_distance": distance,
                       "depth": round(depth, 2), "accuracy": cell["accuracy"]}
                rows.append(row)
                print_table([row], list(row))
    return rows


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    from modeling_titans import TitansByteTokenizer
    from modeling_titans.tasks import minimum_length

    if args.smoke:
        vars(args).update(SMOKE, train_dir=os.path.join(args.out, "models"), retrain=True)
        shortest = max(minimum_length(task) for task in args.tasks) + 2
        args.seq_lens, args.lengths = [shortest], [shortest + 8]
    tokenizer = TitansByteTokenizer()
    folders = train_missing(args, tokenizer)
    if args.train_only:
        return
    folders.update(item.split("=", 1) for item in args.checkpoint)
    rows, training = [], {}
    for name, folder in folders.items():
        rows += evaluate(name, folder, tokenizer, args)
        if os.path.exists(os.path.join(folder, TRAINING_NAME)):
            with open(os.path.join(folder, TRAINING_NAME)) as f:
                summary = json.load(f)
            training[name] = {k: summary[k] for k in ("num_parameters", "budget", "seconds", "validation_loss")}
    summary_rows = summarize(rows, args)
    print_table(rows, list(rows[0]), title="Recall accuracy by cell")
    print_table(summary_rows, list(summary_rows[0]), title="Recall accuracy by length (mean over needle depths)")
    config = {k: getattr(args, k) for k in ("models", "checkpoint", "tasks", "lengths", "depths", "examples", "train_dir")}
    write_results(args, "long_context_recall", config, rows, summary=summary_rows, training=training)
    plot(args, rows)


def summarize(rows: list[dict], args) -> list[dict]:
    """Per model and task: accuracy at each length, averaged over the needle depths."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for task in args.tasks:
            row = {"model": model, "task": task}
            for length in args.lengths:
                cells = [r["accuracy"] for r in rows if (r["model"], r["task"], r["length"]) == (model, task, length)]
                row[str(length)] = sum(cells) / len(cells)
            table.append(row)
    return table


def plot(args, rows):
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure(ncols=len(models), nrows=len(args.tasks), width=2.6, height=2.4)
    for i, task in enumerate(args.tasks):
        for j, model in enumerate(models):
            ax = axes[i][j]
            cells = [r for r in rows if r["model"] == model and r["task"] == task]
            grid = torch.tensor([[r["accuracy"] for r in cells if r["length"] == n] for n in args.lengths])
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (y, x), value in zip(torch.cartesian_prod(torch.arange(grid.shape[0]), torch.arange(grid.shape[1])).tolist(), grid.flatten().tolist()):
                ax.text(x, y, f"{value:.0%}", ha="center", va="center", fontsize=6, color="white" if value < 0.5 else "black")
            # Column i: the i-th of `--depths` distances spread over each length's allowed range (0 = deepest).
            ax.set_xticks(range(args.depths), [f"{k / max(args.depths - 1, 1):.1f}" for k in range(args.depths)], fontsize=6)
            ax.set_yticks(range(len(args.lengths)), args.lengths, fontsize=6)
            if i == len(args.tasks) - 1:
                ax.set_xlabel("needle depth (0 = start)", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{task}\ncontext tokens", fontsize=7)
            if i == 0:
                ax.set_title(model, fontsize=9)
    save_figure(fig, args, "long_context_recall.png")


if __name__ == "__main__":
    main()
