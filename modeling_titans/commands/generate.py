"""`titans generate`: continue a prompt with a saved model, streaming the new tokens to the terminal.

    titans generate runs/passkey --prompt "The secret code for Kalomir is 48213. What is"
    titans generate runs/book --prompt-file start.txt --do-sample --temperature 0.8 --top-p 0.95

The model and tokenizer load with `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR)` and generate
through `pipeline("text-generation")`; a `TextStreamer` prints each token as it comes. Greedy by default.
"""

import os

from . import CommandError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "generate", help="generate text from a prompt with a saved model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model_dir", metavar="DIR", help="a folder written by `titans train` or save_pretrained")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file (long contexts)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1.")
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
        raise CommandError("Sampling needs --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0.")
    prompt = args.prompt if args.prompt is not None else read_prompt(args.prompt_file)

    from transformers import TextStreamer, pipeline, set_seed

    from ..checkpoints import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model_dir, device=args.device)
    set_seed(args.seed)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.do_sample else {}
    generator(
        prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        return_full_text=False,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    return 0


def read_prompt(path: str) -> str:
    if not os.path.isfile(path):
        raise CommandError(f"No such prompt file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            prompt = f.read()
    except UnicodeDecodeError as error:
        raise CommandError(f"The prompt file {path} is not UTF-8 text (byte {error.start}).") from None
    if not prompt:
        raise CommandError(f"The prompt file {path} is empty.")
    return prompt
