"""Long inputs through one cache: the memory state stays bounded and finite, and time per token stays flat.

Generation (default): samples `--tokens` tokens one at a time from a randomly initialised tiny model (each token is
written into the neural memory as it is generated) and records, every `--every` tokens, the Frobenius norm of every
layer's memory weights M_t and momentum S_t (largest over layers and heads), whether any cache tensor holds NaN or
inf, the cache size, and the median time per token of the last block.

A stream of task examples (`--task`): feeds `--examples` validation examples of a built-in task (prompt and answer,
`--length` tokens each) one after the other through one cache, as a long document of many questions would, and
records after each the same state summary and the loss on its answer, next to that example's loss read alone
with a fresh cache. A trained model (`--model DIR`) whose memory is stable answers every example of the stream as
well as alone.

    python benchmarks/stability.py                       # 100K tokens of MAG, ~10 minutes of CPU
    python benchmarks/stability.py --variants mac mag --tokens 20000
    python benchmarks/stability.py --model runs/demo/model --task passkey --length 384 --examples 20
    python benchmarks/stability.py --model runs/demo/model --task passkey --max-norm 300   # bounded weights
"""

from __future__ import annotations

import statistics

import torch

from modeling_titans.configuration.configuration_titans import VARIANTS
from modeling_titans.tasks import TASKS

from harness import Stopwatch, new_figure, parse_args, print_table, save_figure, write_results


def add_arguments(parser):
    parser.add_argument("--variants", nargs="+", default=["mag"], choices=VARIANTS)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=2_000, help="tokens between two measurements")
    parser.add_argument("--task", choices=TASKS, help="stream examples of this built-in task instead of generating")
    parser.add_argument("--model", help="a trained Titans folder for --task (default: a random tiny model)")
    parser.add_argument("--length", type=int, default=384, help="tokens per example (--task)")
    parser.add_argument("--examples", type=int, default=20, help="examples in the stream (--task)")
    parser.add_argument("--max-norm", type=float, help="bound each memory weight matrix's norm (memory_max_norm)")


def state_summary(cache) -> dict:
    """Largest weight and momentum norms over layers and heads, and whether every cache tensor is finite."""
    weight_norm = max(float(w.norm(dim=(-2, -1)).max()) for layer in cache.layers for w in layer.state.memory.weights)
    momentum = [s for layer in cache.layers for s in (layer.state.memory.momentum or ())]
    momentum_norm = max((float(s.norm(dim=(-2, -1)).max()) for s in momentum), default=0.0)
    finite = True

    def check(t):
        nonlocal finite
        if t.is_floating_point():
            finite = finite and bool(torch.isfinite(t).all())
        return t

    for layer in cache.layers:
        layer.map_rows(check)
    return {"max |M|": weight_norm, "max |S|": momentum_norm, "finite": finite, "cache_KiB": cache.memory_bytes() / 1024}


@torch.no_grad()
def generate_and_watch(args, variant: str) -> list[dict]:
    from modeling_titans import TitansCache, TitansConfig, TitansForCausalLM

    model = TitansForCausalLM(TitansConfig.from_preset("tiny", variant=variant)).to(args.device).eval()
    generator = torch.Generator(device=args.device).manual_seed(0)
    cache = TitansCache(model.config)
    token = torch.tensor([[model.config.bos_token_id]], device=args.device)
    rows, block_ms = [], []
    for step in range(1, args.tokens + 1):
        with Stopwatch(args.device) as watch:
            logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        block_ms.append(watch.cpu * 1e3 if args.device == "cpu" else watch.wall * 1e3)
        if step % args.every == 0 or step == args.tokens:
            row = {"variant": variant, "tokens": step, "ms/token": statistics.median(block_ms)}
            row.update(state_summary(cache))
            rows.append(row)
            print_table([row], list(row))
            block_ms = []
    return rows


@torch.no_grad()
def stream_and_watch(args) -> list[dict]:
    """The examples of `args.task` one after the other through one cache (teacher-forced, batch 1): per example
    its answer loss in the stream and alone, and the state summary after it."""
    from modeling_titans import TitansCache, TitansConfig, TitansForCausalLM
    from modeling_titans.checkpoints import load_model_and_tokenizer
    from modeling_titans.tokenization import TitansByteTokenizer
    from modeling_titans.training import TaskMix

    if args.model:
        model, tokenizer = load_model_and_tokenizer(args.model)
    else:
        config = TitansConfig.from_preset("tiny", variant=args.variants[0])
        model, tokenizer = TitansForCausalLM(config), TitansByteTokenizer()
    if args.max_norm is not None:  # else as saved
        model.config.memory_max_norm = args.max_norm
    model = model.to(args.device).eval()
    examples = TaskMix([args.task], "validation", args.examples, args.length, tokenizer, seed=0)
    cache = TitansCache(model.config)
    rows = []
    for index in range(args.examples):
        example = {key: examples[index][key][None].to(args.device) for key in ("input_ids", "labels")}
        alone = model(**example).loss
        streamed = model(**example, cache=cache, use_cache=True).loss
        row = {"example": index + 1, "tokens": (index + 1) * args.length, "loss alone": float(alone),
               "loss in stream": float(streamed)}
        row.update(state_summary(cache))
        rows.append(row)
        print_table([row], list(row))
    return rows


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.model and not args.task:
        raise SystemExit("stability.py: --model streams task examples; add --task (e.g. --task passkey).")
    if args.max_norm is not None and not (args.task and 0 < args.max_norm < float("inf")):
        raise SystemExit("stability.py: --max-norm takes a finite number > 0 and applies to --task streams.")
    if args.smoke:
        args.tokens, args.every, args.examples = 300, 100, 3
        args.length = min(args.length, 192)
    if args.task:
        try:
            rows = stream_and_watch(args)
        except (OSError, ValueError) as error:  # no model there, or a length the task cannot fill
            raise SystemExit(f"stability.py: {error}") from None
        name, source = "stability_stream", args.model or "random tiny model"
        title = f"A stream of {args.task} examples through one cache ({source}; loss on each answer)"
        config = {"task": args.task, "model": source, "length": args.length, "examples": args.examples,
                  "max_norm": args.max_norm}
    else:
        rows = [row for variant in args.variants for row in generate_and_watch(args, variant)]
        name, title = "stability", "Long generation (tiny preset, sampling; ms/token = median CPU time)"
        config = {"variants": args.variants, "tokens": args.tokens, "every": args.every, "preset": "tiny"}
    print_table(rows, list(rows[0]), title=title)
    verdict = {
        "all_finite": all(r["finite"] for r in rows),
        "max_weight_norm": max(r["max |M|"] for r in rows),
        "max_momentum_norm": max(r["max |S|"] for r in rows),
    }
    print(verdict)
    write_results(args, name, config, rows, summary=verdict)
    plot(args, rows, name)


def plot(args, rows, name: str):
    """Norms along the input (left); time per token, or each example's loss alone and in the stream (right)."""
    fig, (norm_ax, right_ax) = new_figure(ncols=2, width=5.0)
    series = {row.get("variant", args.task): [] for row in rows}
    for row in rows:
        series[row.get("variant", args.task)].append(row)
    for label, mine in series.items():
        tokens = [r["tokens"] for r in mine]
        norm_ax.plot(tokens, [r["max |M|"] for r in mine], marker=".", label=f"{label} |M_t|")
        norm_ax.plot(tokens, [r["max |S|"] for r in mine], marker=".", linestyle="--", label=f"{label} |S_t|")
        if args.task:
            right_ax.plot(tokens, [r["loss alone"] for r in mine], marker=".", label="alone (fresh cache)")
            right_ax.plot(tokens, [r["loss in stream"] for r in mine], marker=".", label="in the stream")
        else:
            right_ax.plot(tokens, [r["ms/token"] for r in mine], marker=".", label=label)
    norm_ax.set_ylabel("largest Frobenius norm (layer, head)")
    norm_ax.set_yscale("log")
    right_ax.set_ylabel("loss on the answer" if args.task else "ms/token (median of block)")
    right_ax.set_ylim(bottom=0)
    for ax in (norm_ax, right_ax):
        ax.set_xlabel("tokens read" if args.task else "tokens generated")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, args, f"{name}.png")


if __name__ == "__main__":
    main()
