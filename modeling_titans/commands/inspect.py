"""`titans inspect`: see the neural memory work on one sequence (see `modeling_titans/inspection.py`).

    titans inspect runs/demo/model --task passkey --length 2048          # a test example, needle and question marked
    titans inspect runs/book --text-file held_out.txt --max-tokens 1024   # the start of a text

Writes `memory_trace.png` (per layer and memory head: the inner learning rate, the momentum, the forgetting, the
surprise and the memory's weight norm along the sequence), `memory_trace.json` (the numbers) and
`memory_trace.html` (the figure and the means over the needle, the question and the rest) into `--output-dir`.
"""

import os

from ..tasks import TASKS
from . import CommandError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "inspect", help="plot the memory's gates, surprise and size along a sequence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model_dir", metavar="DIR", help="a folder written by `titans train` or save_pretrained")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", help=f"a built-in task example ({', '.join(TASKS)}; default passkey)")
    source.add_argument("--text-file", metavar="FILE", help="the start of this UTF-8 text instead")
    parser.add_argument("--length", type=int, default=1024, help="task: example length in tokens (default 1024)")
    parser.add_argument("--needle-distance", type=int, help="task: needle distance in tokens (default: random)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="text: tokens to feed (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="task: which test example")
    parser.add_argument("--output-dir", metavar="OUT", default="inspect", help="where to write the report (default: ./inspect)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.set_defaults(run=run)


def run(args) -> int:
    import torch

    from ..checkpoints import load_model_and_tokenizer
    from ..evaluation import check_task_cell
    from ..inspection import trace_memory, write_report
    from ..tasks import generate_examples

    if args.max_tokens < 2:
        raise CommandError(f"--max-tokens {args.max_tokens}: must be at least 2.")
    task = None if args.text_file else args.task or "passkey"
    if task is not None:
        if task not in TASKS:
            raise CommandError(f"Unknown task {task!r}; available: {', '.join(TASKS)}.")
        try:
            check_task_cell(task, args.length, args.needle_distance)
        except ValueError as error:
            raise CommandError(str(error)) from None
    model, tokenizer = load_model_and_tokenizer(args.model_dir, device=args.device)
    if getattr(model.config, "model_type", None) != "titans":
        raise CommandError(f"{args.model_dir} holds a {model.config.model_type} model, which has no neural memory.")

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if task is not None:
        example = generate_examples(task, "test", 1, args.length - 2, args.seed, args.needle_distance)[0]
        prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        # Marks in token positions: <s> comes first; the byte tokenizer maps characters to tokens one to one.
        start, end = (len(bos) + len(tokenizer(example.prompt[:i], add_special_tokens=False)["input_ids"])
                      for i in (example.needle_start, example.needle_end))
        question = len(bos) + len(tokenizer(example.prompt.rsplit("\n", 1)[0], add_special_tokens=False)["input_ids"])
        marks = {"needle": (start, end), "question": (question, len(bos) + len(prompt_ids))}
        ids = bos + prompt_ids
        needle_back = len(bos) + len(prompt_ids) - end  # tokens after the needle
        title = f"{args.model_dir}: {task}, {len(ids)} tokens, needle {needle_back} tokens before the end"
    else:
        from ..data import load_text_dataset

        texts = list(load_text_dataset([args.text_file])["text"])
        ids = (bos + tokenizer(texts[0], add_special_tokens=False)["input_ids"])[: args.max_tokens]
        marks = {}
        title = f"{args.model_dir}: the first {len(ids)} tokens of {os.path.basename(args.text_file)}"
    print(f"Feeding {len(ids)} tokens one at a time...")
    trace = trace_memory(model, torch.tensor([ids]), tokenizer, marks)
    paths = write_report(trace, args.output_dir, title)
    for row in trace.region_means():
        if row["region"] in ("needle", "rest"):
            values = ", ".join(f"{name} {row[name]:.3g}" for name in ("surprise", "inner_lr") if name in row)
            print(f"layer {row['layer']} {row['region']:>8} ({row['tokens']} tokens): {values}")
    print(f"Wrote {', '.join(paths.values())}")
    return 0
