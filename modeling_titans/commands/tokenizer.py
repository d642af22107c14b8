"""`titans tokenizer`: train a byte-level BPE tokenizer on your own text files
(see `modeling_titans.tokenization.train_bpe`)."""

import sys

from . import CommandError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer on your text files",
        description="Train a byte-level BPE tokenizer (digits split one per token; <pad> <s> </s> at ids 0, 1, 2) "
        "and save it as tokenizer.json, loadable with AutoTokenizer.from_pretrained(OUTPUT_DIR). Without it, "
        "Titans models use the byte-level TitansByteTokenizer (vocab 259).",
    )
    parser.add_argument("--files", nargs="+", required=True, help="UTF-8 text files to learn the merges from")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, at least 259 (default 8192)")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="merge only pairs seen at least this often (default 2)"
    )
    parser.add_argument(
        "--output-dir", required=True, help="where to write tokenizer.json and tokenizer_config.json (not a model folder)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --output-dir")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..tokenization import train_byte_level_bpe

    try:
        tokenizer = train_byte_level_bpe(
            args.files,
            args.vocab_size,
            args.output_dir,
            min_frequency=args.min_frequency,
            show_progress=sys.stdout.isatty(),  # the progress bars print blank lines when piped
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:
        raise CommandError(error) from error
    print(
        f"Saved a byte-level BPE tokenizer with {len(tokenizer)} tokens to {args.output_dir}; "
        f"train a model on it with vocab_size={len(tokenizer)}."
    )
    return 0
