"""Long-context recall: accuracy by context length x needle depth on the project's own tasks (passkey, recall, babi).

For each model, task, length and needle distance it generates `--examples` test examples
(`modeling_titans.tasks`), greedy-decodes the answer with the byte tokenizer and scores it with
`answer_is_correct`. The needle distances are spread over the range each length allows; the heatmap's columns
are the needle's depth in the prompt (0 = at the start, 1 = next to the question).

Models are checkpoints trained with the same budget (`--checkpoint name=path`, e.g. a Titans variant, a
sliding-window model and a full-attention Llama, all byte-level); without checkpoints it scores randomly
initialised models of the `small` preset and a same-size Llama, which only checks the plumbing (accuracy ~0).

    python benchmarks/long_context_recall.py --checkpoint mag=runs/mag mac=runs/mac llama=runs/llama \
        --lengths 1024 2048 4096 8192 16384 --examples 20
"""

from __future__ import annotations

import torch

from harness import new_figure, parse_args, print_table, save_figure, write_results


def add_arguments(parser):
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="NAME=PATH", help="models to score")
    parser.add_argument("--tasks", nargs="+", default=["passkey", "recall", "babi"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--depths", type=int, default=4, help="needle distances per length")
    parser.add_argument("--examples", type=int, default=10, help="examples per cell")


def load_models(args) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from modeling_titans import TitansConfig, TitansForCausalLM

    if args.checkpoint:
        pairs = (item.split("=", 1) for item in args.checkpoint)
        return {name: AutoModelForCausalLM.from_pretrained(path).to(args.device).eval() for name, path in pairs}
    preset = "tiny" if args.smoke else "small"
    titans = TitansConfig.from_preset(preset, variant="mag")
    llama = LlamaConfig(**{k: getattr(titans, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "num_attention_heads",
                                                          "num_key_value_heads", "tie_word_embeddings",
                                                          "pad_token_id", "bos_token_id", "eos_token_id")})
    return {
        "mag (untrained)": TitansForCausalLM(titans).to(args.device).eval(),
        "llama (untrained)": LlamaForCausalLM(llama).to(args.device).eval(),
    }


def needle_distances(task: str, length: int, count: int) -> list[int]:
    """`count` distances spread evenly over what `length` allows, farthest (deepest needle) first."""
    from modeling_titans.tasks import needle_distance_range

    lowest, highest = needle_distance_range(task, length)
    if count == 1:
        return [highest]
    return [round(highest - i * (highest - lowest) / (count - 1)) for i in range(count)]


@torch.no_grad()
def accuracy(model, tokenizer, examples, device) -> float:
    from modeling_titans.tasks import answer_is_correct

    correct = 0
    for example in examples:
        ids = tokenizer(example.prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, max_new_tokens=len(example.answer) + 1, do_sample=False, pad_token_id=0)
        correct += answer_is_correct(example, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return correct / len(examples)


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    from modeling_titans import TitansByteTokenizer
    from modeling_titans.tasks import generate_examples, minimum_length

    if args.smoke:
        args.lengths, args.depths, args.examples = [max(minimum_length(t) for t in args.tasks) + 8], 2, 1
    tokenizer = TitansByteTokenizer()
    rows = []
    for name, model in load_models(args).items():
        for task in args.tasks:
            for length in args.lengths:
                for distance in needle_distances(task, length, args.depths):
                    examples = generate_examples(task, "test", args.examples, length, seed=0, needle_distance=distance)
                    depth = 1 - (distance + len(examples[0].answer)) / length
                    row = {"model": name, "task": task, "length": length, "needle_distance": distance,
                           "depth": round(depth, 2), "accuracy": accuracy(model, tokenizer, examples, args.device)}
                    rows.append(row)
                    print_table([row], list(row))
    print_table(rows, list(rows[0]), title="Recall accuracy")
    config = {k: getattr(args, k) for k in ("checkpoint", "tasks", "lengths", "depths", "examples")}
    write_results(args, "long_context_recall", config, rows)
    plot(args, rows)


def plot(args, rows):
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure(ncols=len(models) * len(args.tasks), width=3.2, height=3.0)
    for ax, (model, task) in zip(axes, [(m, t) for m in models for t in args.tasks]):
        cells = [r for r in rows if r["model"] == model and r["task"] == task]
        grid = torch.tensor([[r["accuracy"] for r in cells if r["length"] == n] for n in args.lengths])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        # Column i: the i-th of `--depths` distances spread over each length's allowed range (0 = deepest).
        ax.set_xticks(range(args.depths), [f"{i / max(args.depths - 1, 1):.2f}" for i in range(args.depths)], fontsize=7)
        ax.set_yticks(range(len(args.lengths)), args.lengths, fontsize=7)
        ax.set_xlabel("needle: deepest (0) -> nearest (1)")
        ax.set_ylabel("length")
        ax.set_title(f"{model}\n{task}", fontsize=8)
    save_figure(fig, args, "long_context_recall.png")


if __name__ == "__main__":
    main()
