"""Train a byte-level BPE tokenizer on your own text files (the `titans tokenizer` subcommand).

The result is a standard `tokenizer.json` + `tokenizer_config.json` that `AutoTokenizer.from_pretrained(DIR)`
loads as a fast tokenizer. It behaves like the default `TitansByteTokenizer` wherever it can:
- ids 0, 1, 2 are `<pad>`, `<s>`, `</s>`; the 256 bytes are always in the vocabulary, so any UTF-8 text
  round-trips and there is no unknown token;
- `<s>` is prepended to every text (no `</s>` appended), padding is on the left, and "<s>" inside a text is
  encoded as text, never as the special token;
- digits are split one per token before the merges are learned, so numbers are read digit by digit.

Usage: `titans tokenizer --files a.txt b.txt --vocab-size 8192 --output-dir DIR`, then train a model with
`vocab_size = len(AutoTokenizer.from_pretrained(DIR))`.
"""

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import TokenizersBackend

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2, as in TitansByteTokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the special tokens and every byte, before any merge


def train_byte_level_bpe(
    files: list[str],
    vocab_size: int,
    output_dir: str | None = None,
    min_frequency: int = 2,
    show_progress: bool = False,
    overwrite: bool = False,
) -> TokenizersBackend:
    """Learn byte-level BPE merges on `files` (UTF-8 text) up to `vocab_size` tokens; save to `output_dir`.

    The vocabulary can come out smaller than `vocab_size` when the files hold too few distinct pairs with at least
    `min_frequency` occurrences; use `len(tokenizer)` as the model's `vocab_size`.
    Raises `FileNotFoundError` / `ValueError` with a one-line message for missing, empty or non-UTF-8 files, for
    a `vocab_size` below the 259 tokens that the bytes and special tokens take, and for an `output_dir` that holds
    a model (whose embeddings fit its own tokenizer) or, unless `overwrite`, another tokenizer.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab size {vocab_size} is too small: the 256 bytes and {len(SPECIAL_TOKENS)} special tokens alone "
            f"take {MIN_VOCAB_SIZE}."
        )
    if not files:
        raise ValueError("no training files given.")
    for path in files:
        if not os.path.exists(path):
            raise FileNotFoundError(f"training file not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"training file is not a regular file: {path}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"training file is empty: {path}")
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()  # invalid UTF-8 from sampling decodes to U+FFFD, never raises
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    try:
        backend.train([str(path) for path in files], trainer)
    except Exception as error:  # tokenizers raises a bare Exception, e.g. for a file that is not UTF-8
        raise ValueError(f"training on {', '.join(map(str, files))} failed: {error}") from error

    tokenizer = TokenizersBackend(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,  # writes the `<s> $A` post-processor into tokenizer.json
        add_eos_token=False,
        split_special_tokens=True,
        padding_side="left",
    )
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def check_output_dir(output_dir: str, overwrite: bool):
    """Refuses a file, a model folder, and (unless `overwrite`) a folder that already holds a tokenizer."""
    if os.path.isfile(output_dir):
        raise ValueError(f"output directory {output_dir} is a file.")
    if not os.path.isdir(output_dir):
        return
    present = set(os.listdir(output_dir))
    model = sorted(present.intersection(MODEL_FILES))
    if model:
        raise ValueError(
            f"{output_dir} holds a model ({model[0]}); a new tokenizer there would no longer match its embeddings. "
            "Choose another --output-dir."
        )
    tokenizer = sorted(present.intersection(TOKENIZER_FILES))
    if tokenizer and not overwrite:
        raise ValueError(f"{output_dir} already holds a tokenizer ({tokenizer[0]}); pass --overwrite to replace it.")
