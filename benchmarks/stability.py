"""Long generation with a tiny model: the memory state stays bounded and finite, and time per token stays flat.

Samples `--tokens` tokens one at a time from a randomly initialised tiny model (each token is written into the
neural memory as it is generated) and records, every `--every` tokens, the Frobenius norm of every layer's
memory weights M_t and momentum S_t (largest over layers and heads), whether any cache tensor holds NaN or inf,
the cache size, and the median time per token of the last block.

    python benchmarks/stability.py                       # 100K tokens of MAG, ~10 minutes of CPU
    python benchmarks/stability.py --variants mac mag --tokens 20000
"""

from __future__ import annotations

import statistics

import torch

from modeling_titans.configuration.configuration_titans import VARIANTS

from harness import Stopwatch, new_figure, parse_args, print_table, save_figure, write_results


def add_arguments(parser):
    parser.add_argument("--variants", nargs="+", default=["mag"], choices=VARIANTS)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=2_000, help="tokens between two measurements")


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


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.smoke:
        args.tokens, args.every = 300, 100
    rows = [row for variant in args.variants for row in generate_and_watch(args, variant)]
    print_table(rows, list(rows[0]), title="Long generation (tiny preset, sampling; ms/token = median CPU time)")
    verdict = {
        "all_finite": all(r["finite"] for r in rows),
        "max_weight_norm": max(r["max |M|"] for r in rows),
        "max_momentum_norm": max(r["max |S|"] for r in rows),
    }
    print(verdict)
    write_results(args, "stability", {"variants": args.variants, "tokens": args.tokens, "every": args.every, "preset": "tiny"}, rows, summary=verdict)
    plot(args, rows)


def plot(args, rows):
    fig, (norm_ax, time_ax) = new_figure(ncols=2, width=5.0)
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        tokens = [r["tokens"] for r in mine]
        norm_ax.plot(tokens, [r["max |M|"] for r in mine], marker=".", label=f"{variant} |M_t|")
        norm_ax.plot(tokens, [r["max |S|"] for r in mine], marker=".", linestyle="--", label=f"{variant} |S_t|")
        time_ax.plot(tokens, [r["ms/token"] for r in mine], marker=".", label=variant)
    norm_ax.set_ylabel("largest Frobenius norm (layer, head)")
    time_ax.set_ylabel("ms/token (median of block)")
    time_ax.set_ylim(bottom=0)
    for ax in (norm_ax, time_ax):
        ax.set_xlabel("tokens generated")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, args, "stability.png")


if __name__ == "__main__":
    main()
