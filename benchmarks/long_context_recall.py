"""Long-context recall: accuracy by context length x needle depth for the Titans variants, a sliding-window model
and a full-attention Llama of the same size, all trained with the same budget on the project's own tasks.

Training (skipped for a model already saved in `--train-dir`): every model gets the same backbone (the `demo`
preset's width, depth, heads and byte vocabulary), the same optimizer, schedule, steps and length curriculum
(`modeling_titans.training.train_on_tasks`, the recipe of `titans demo`: 2000 steps of 16 sequences, 192 then 384 tokens) and the same data: by
default one model per task (passkey, multi-query associative recall, bAbI-style world questions, from
`modeling_titans.tasks`), scored on that task; with `--mix`, one model on an even mix of the tasks. The models:
- `mag`, `mac`, `mal`, `lmm`: Titans, attention window / segment of 32 tokens (the preset's);
- `swa`: transformers' `MistralForCausalLM` with a 32-token sliding window (attention only, no memory);
- `llama`: transformers' `LlamaForCausalLM`, full causal attention (SDPA).
The needles lie 43 tokens to 16K tokens before the question. One 32-token window cannot see them, but two stacked
layers of windows reach 62 tokens back, so the nearest depth column (43-56 tokens back) is within the
attention-only models' reach; every other column (at least ~320 tokens back) can only be answered through a
memory (or Llama's full attention). All models see at most 384 tokens in training; they are tested at 1K-16K
and, for reference, at 384.

Evaluation: for each task, length and needle depth, `--examples` test-split examples (keys and values never seen
in training), greedy answers, exact match (`modeling_titans.evaluation.task_accuracy`, as `titans eval`). The needle distances are spread
evenly over the range each length allows; a heatmap column is the needle's depth in the prompt (0 = at the
start, 1 = next to the question). `--checkpoint name=path` adds any other saved model (scored on every task).
The scores of the models trained here are saved cell by cell next to them (`scores.json`) and reused, so each
task can be scored in its own process, a last run collects everything into one table and plot, and a new length
costs only its own cells.

    python benchmarks/long_context_recall.py --train-only --tasks passkey     # train (e.g. one process per task)
    python benchmarks/long_context_recall.py --train-only --tasks recall
    python benchmarks/long_context_recall.py                                    # train what is missing, score, plot
    python benchmarks/long_context_recall.py --mix --tasks passkey recall babi  # one model per name on the mix
"""

from __future__ import annotations

import json
import os

from harness import new_figure, parse_args, print_table, save_figure, write_results

MODELS = ("mag", "mac", "mal", "lmm", "swa", "llama")
TRAINING_NAME = "training.json"
SCORES_NAME = "scores.json"
# What the attention-only baselines share with the Titans preset.
BACKBONE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")
# Seconds-long smoke runs: the tiny preset, a couple of steps, one short length.
SMOKE = dict(preset="tiny", steps=2, batch_size=2, eval_examples=2, depths=2, examples=1)


def add_arguments(parser):
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="NAME=PATH", help="also score these models")
    parser.add_argument("--tasks", nargs="+", default=["passkey", "recall", "babi"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[384, 1024, 2048, 4096, 8192, 16384],
                        help="context lengths in tokens (384: the longest training length, for reference)")
    parser.add_argument("--depths", type=int, default=4, help="needle distances per length")
    parser.add_argument("--examples", type=int, default=10, help="test examples per cell")
    parser.add_argument("--eval-batch-size", type=int, default=10)
    parser.add_argument("--rescore", action="store_true", help="score again even when a model's scores are saved")
    training = parser.add_argument_group("training (the same for every model)")
    training.add_argument("--train-dir", default=os.path.join("runs", "long_context_recall"))
    training.add_argument("--train-only", action="store_true", help="train the missing models, then stop")
    training.add_argument("--retrain", action="store_true", help="train even when a saved model exists")
    training.add_argument("--mix", action="store_true", help="one model per name on an even mix of the tasks "
                          "(default: one model per name and task, scored on its task)")
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
    backbone = {key: getattr(titans, key) for key in BACKBONE_FIELDS}
    if name == "swa":
        config = MistralConfig(sliding_window=titans.sliding_window, attn_implementation="sdpa", **backbone)
        return MistralForCausalLM(config)
    return LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **backbone))


def training_runs(args) -> list[tuple[list[str], str]]:
    """(tasks, folder) of each training run: one per task, or one on the mix of all tasks with `--mix`."""
    if args.mix:
        return [(args.tasks, os.path.join(args.train_dir, "mix"))]
    return [([task], os.path.join(args.train_dir, task)) for task in args.tasks]


def train_missing(args, tokenizer, tasks: list[str], root: str) -> dict:
    """Trains each of `--models` on `tasks` unless `root/<name>` holds a finished one; returns {name: folder}."""
    from transformers import set_seed

    from modeling_titans.training import train_on_tasks

    folders = {}
    for name in args.models:
        folder = os.path.join(root, name)
        folders[name] = folder
        if os.path.exists(os.path.join(folder, TRAINING_NAME)) and not args.retrain:
            print(f"{name}: using the model saved in {folder}")
            continue
        set_seed(args.seed)
        model = new_model(name, args.preset)
        print(f"\nTraining {name} on {', '.join(tasks)}: {model.num_parameters():,} parameters.")
        recipe = {k: getattr(args, k) for k in ("steps", "batch_size", "learning_rate", "eval_every", "eval_examples", "seed")}
        history = train_on_tasks(model, tokenizer, tasks, args.seq_lens, **recipe)
        model.config.use_cache = True
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        budget = {k: getattr(args, k) for k in ("preset", "steps", "batch_size", "learning_rate", "seq_lens", "seed")}
        summary = {"model": name, "tasks": tasks, "num_parameters": model.num_parameters(), "budget": budget, **history}
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


def evaluate(name: str, folder: str, tokenizer, tasks: list[str], args, keep_scores: bool) -> list[dict]:
    """One row per task x length x needle distance: exact-match accuracy of greedy answers on the test split.
    With `keep_scores` every cell is kept in `folder/scores.json` and reused (unless `--rescore`), so that models
    can be scored in parallel processes, collected by a final run, and extended with new lengths."""
    from transformers import AutoModelForCausalLM

    import modeling_titans  # noqa: F401 (registers the Titans Auto classes)
    from modeling_titans.evaluation import task_accuracy

    scores_path = os.path.join(folder, SCORES_NAME)
    saved = {}
    if keep_scores and os.path.exists(scores_path) and not args.rescore:
        with open(scores_path) as f:
            saved = {cell_key(cell): cell for cell in json.load(f)}
    model = None
    rows = []
    for task in tasks:
        for length in args.lengths:
            for distance in needle_distances(task, length - 2, args.depths):  # length counts <s> and </s>
                row = {"model": name, "task": task, "length": length, "needle_distance": distance,
                       "depth": round(1 - distance / (length - 2), 2), "examples": args.examples}
                if cell_key(row) in saved:
                    row["accuracy"] = saved[cell_key(row)]["accuracy"]
                else:
                    if model is None:
                        model = AutoModelForCausalLM.from_pretrained(folder).to(args.device).eval()
                    row["accuracy"] = task_accuracy(
                        model, tokenizer, task, length, distance, args.examples, "test", 0, args.eval_batch_size
                    )["accuracy"]
                    saved[cell_key(row)] = row
                    print_table([row], list(row))
                rows.append(row)
    if keep_scores:
        with open(scores_path, "w") as f:
            json.dump(list(saved.values()), f, indent=1)
    return rows


def cell_key(cell: dict) -> tuple:
    return cell["task"], cell["length"], cell["needle_distance"], cell["examples"]


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    from modeling_titans import TitansByteTokenizer
    from modeling_titans.tasks import shortest_sequence

    if args.smoke:
        vars(args).update(SMOKE, train_dir=os.path.join(args.out, "models"), retrain=True, rescore=True)
        shortest = max(shortest_sequence(task) for task in args.tasks)
        args.seq_lens, args.lengths = [shortest], [shortest + 8]
    tokenizer = TitansByteTokenizer()
    trained = [(tasks, train_missing(args, tokenizer, tasks, root)) for tasks, root in training_runs(args)]
    if args.train_only:
        return
    given = [(args.tasks, dict([item.split("=", 1)])) for item in args.checkpoint]
    rows, training = [], {}
    for (tasks, folders), keep_scores in [(run, True) for run in trained] + [(run, False) for run in given]:
        for name, folder in folders.items():
            rows += evaluate(name, folder, tokenizer, tasks, args, keep_scores)
            if os.path.exists(os.path.join(folder, TRAINING_NAME)):
                with open(os.path.join(folder, TRAINING_NAME)) as f:
                    summary = json.load(f)
                keys = ("tasks", "num_parameters", "budget", "seconds", "validation_loss")
                training[f"{name} on {'+'.join(tasks)}"] = {k: summary[k] for k in keys}
    summary_rows = summarize(rows, args)
    print_table(rows, list(rows[0]), title="Recall accuracy by cell")
    print_table(summary_rows, list(summary_rows[0]), title="Recall accuracy by length (mean over needle depths)")
    keys = ("models", "checkpoint", "tasks", "mix", "lengths", "depths", "examples", "train_dir")
    config = {k: getattr(args, k) for k in keys}
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
    """One heatmap per task (row) and model (column): context length x needle depth, exact-match accuracy."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure(ncols=len(models), nrows=len(args.tasks), width=2.6, height=2.4)
    for i, task in enumerate(args.tasks):
        for j, model in enumerate(models):
            ax = axes[i][j]
            cells = [[r for r in rows if (r["model"], r["task"], r["length"]) == (model, task, n)] for n in args.lengths]
            ax.imshow([[r["accuracy"] for r in line] for line in cells], vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for y, line in enumerate(cells):
                for x, r in enumerate(line):
                    color = "white" if r["accuracy"] < 0.5 else "black"
                    ax.text(x, y, f"{r['accuracy']:.0%}", ha="center", va="center", fontsize=6, color=color)
            # Column k holds the k-th distance of every length; its depth varies a little with the length.
            depths = [sum(line[k]["depth"] for line in cells) / len(cells) for k in range(len(cells[0]))]
            ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=6)
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
