"""Training data as fixed-length token sequences: the user's own text, or the built-in long-context tasks.

- Your text: local `.txt` files (one document per file), `.jsonl` / `.json` files (one document per record, in a
  `text` field), a `datasets` Dataset saved with `save_to_disk`, or a Hub dataset name when online. Each document
  becomes `<s> tokens </s>`; the documents are concatenated and cut into sequences of exactly `seq_len` tokens
  (the tail shorter than one sequence is dropped), with the loss on every token. Both steps run through
  `datasets.map`, so they are cached next to the loaded data and a second run with the same files, tokenizer and
  length reuses them.
- A task (`modeling_titans.tasks`): `TaskDataset` generates example i on demand from (task, split, seed, i), so
  any number of training examples costs no memory and a resumed run sees the same examples at the same steps.
  A sequence is `<s> prompt answer </s>`, exactly `seq_len` tokens with the byte tokenizer (right-padded with
  others; `collate_without_trailing_padding` drops the columns a batch does not use). By default the loss
  is on the answer and the closing `</s>` only (`loss_on="answer"`): the prompt's filler is unpredictable by
  design, and a loss on it mostly teaches the filler's grammar, so recall is learned in fewer steps with the
  loss on the answer. `loss_on="all"` puts the loss on every token.
"""

import os

import torch
from transformers import default_data_collator

from .tasks import generate_example

IGNORE_INDEX = -100  # label of a token without loss (the value torch's cross-entropy ignores)
TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")
LOSS_ON = ("answer", "all")


class DataError(ValueError):
    """A problem with the user's data (a missing or empty file, a missing column, too little text)."""


def bos_and_eos(tokenizer) -> tuple[list[int], list[int]]:
    """`[<s>]` and `[</s>]`, each empty if the tokenizer has no such token."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


# ----------------------------------------------------------------------------------------------------------------
# The user's own text
# ----------------------------------------------------------------------------------------------------------------


def load_text_dataset(train_files=(), dataset: str | None = None, text_column: str = "text"):
    """One `datasets.Dataset` with a single column "text", from local files and/or a dataset (a folder written by
    `save_to_disk`, else a Hub dataset name; its "train" split). JSON records and datasets give `text_column`."""
    import datasets

    parts = []
    for path in train_files:
        if not os.path.isfile(path):
            raise DataError(f"No such file: {path}")
        if os.path.getsize(path) == 0:
            raise DataError(f"The file {path} is empty.")
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in TEXT_FILE_SUFFIXES:
            raise DataError(f"Cannot read {path}: training files must end in {', '.join(TEXT_FILE_SUFFIXES)}.")
        check_text_file(path, as_json_lines=suffix == ".jsonl")
        if suffix == ".txt":
            part = datasets.load_dataset("text", data_files=[path], sample_by="document", split="train")
            parts.append(select_text(part, "text", path))
        else:
            try:
                part = datasets.load_dataset("json", data_files=[path], split="train")
            except Exception as error:  # the json builder reports a bad record as a chain of library errors
                raise DataError(f"Cannot read {path} as JSON: {str(error).splitlines()[0]}") from error
            parts.append(select_text(part, text_column, path))
    if dataset is not None:
        parts.append(select_text(load_named_dataset(dataset), text_column, dataset))
    if not parts:
        raise DataError("No training text given: pass --train-file or --dataset.")
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def check_text_file(path: str, as_json_lines: bool):
    """DataError naming the file and line of the first byte sequence that is not UTF-8, or (JSON lines) of the
    first line that is not a JSON object; `datasets` would report either as a long chain of its own errors."""
    import json

    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path} line {number} is not UTF-8 text (byte {error.start} of the line).") from None
            if as_json_lines and text.strip():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {number} is not valid JSON: {error.msg}.") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path} line {number} is not a JSON object.")


def load_named_dataset(name: str):
    import datasets

    if os.path.isdir(name):
        try:
            loaded = datasets.load_from_disk(name)
        except FileNotFoundError as error:
            raise DataError(f"{name} holds no dataset saved with save_to_disk.") from error
    else:
        try:
            loaded = datasets.load_dataset(name)
        except Exception as error:  # offline, unknown name, gated... : one line, whatever the cause
            raise DataError(f"Cannot load the dataset {name!r}: {str(error).splitlines()[0]}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"The dataset {name} has no 'train' split (splits: {', '.join(loaded)}).")
        loaded = loaded["train"]
    return loaded


def select_text(dataset, text_column: str, source: str):
    if text_column not in dataset.column_names:
        raise DataError(
            f"{source} has no {text_column!r} field (fields: {', '.join(dataset.column_names)}); "
            "choose one with --text-column."
        )
    if len(dataset) == 0:
        raise DataError(f"{source} holds no records.")
    dataset = dataset.select_columns([text_column])
    return dataset.rename_column(text_column, "text") if text_column != "text" else dataset


def tokenize_documents(batch, tokenizer):
    bos, eos = bos_and_eos(tokenizer)
    ids = tokenizer([text or "" for text in batch["text"]], add_special_tokens=False)["input_ids"]
    return {"input_ids": [bos + row + eos for row in ids]}


def cut_into_sequences(batch, seq_len):
    """Concatenates a batch of documents and cuts it into rows of exactly `seq_len` tokens (drops the tail)."""
    stream = [token for row in batch["input_ids"] for token in row]
    rows = [stream[start : start + seq_len] for start in range(0, len(stream) - seq_len + 1, seq_len)]
    return {"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows], "labels": [list(r) for r in rows]}


def pack_dataset(dataset, tokenizer, seq_len: int):
    """The "text" column of `dataset` (from `load_text_dataset`) tokenized, concatenated and cut into sequences of
    `seq_len` tokens (`input_ids`, `attention_mask`, `labels`)."""
    tokenized = dataset.map(
        tokenize_documents,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=dataset.column_names,
        desc="Tokenizing",
    )
    packed = tokenized.map(cut_into_sequences, batched=True, fn_kwargs={"seq_len": seq_len}, desc="Packing")
    if len(packed) == 0:
        num_tokens = sum(len(row) for row in tokenized["input_ids"])
        raise DataError(
            f"The training text holds {num_tokens} tokens, fewer than one sequence of {seq_len}; "
            "add text or lower --seq-len."
        )
    return packed


def hold_out(packed, fraction: float, seed: int):
    """(train, validation): `fraction` of the sequences (at least one) held out for the eval loss."""
    if len(packed) < 2:
        raise DataError(
            "The training text makes only 1 sequence; one is held out for the eval loss, so add text or lower --seq-len."
        )
    split = packed.train_test_split(test_size=max(1, round(fraction * len(packed))), seed=seed)
    return split["train"], split["test"]


# ----------------------------------------------------------------------------------------------------------------
# The built-in tasks
# ----------------------------------------------------------------------------------------------------------------


def encode_example(example, tokenizer, seq_len: int, loss_on: str = "answer") -> dict:
    """`<s> prompt answer </s>` right-padded to `seq_len` tokens; labels on the answer and `</s>` (or on all
    tokens), IGNORE_INDEX elsewhere."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}; choose one of {', '.join(LOSS_ON)}.")
    bos, eos = bos_and_eos(tokenizer)
    prompt_ids = bos + tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + eos
    input_ids = prompt_ids + answer_ids
    if len(input_ids) > seq_len:
        raise DataError(f"A {example.task} example takes {len(input_ids)} tokens with this tokenizer, over {seq_len}.")
    labels = input_ids if loss_on == "all" else [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    padding = seq_len - len(input_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "input_ids": torch.tensor(input_ids + [pad_id] * padding),
        "attention_mask": torch.tensor([1] * len(input_ids) + [0] * padding),
        "labels": torch.tensor(labels + [IGNORE_INDEX] * padding),
    }


class TaskDataset(torch.utils.data.Dataset):
    """`num_examples` sequences of `seq_len` tokens from a built-in task, generated on demand.

    Texts are `seq_len - 2` characters (prompt + answer), so with the byte tokenizer `<s> text </s>` fills the
    sequence exactly; a tokenizer with multi-byte tokens gives shorter texts, right-padded. The examples are
    those of `tasks.generate_examples(task, split, num_examples, seq_len - 2, seed, needle_distance)`.
    """

    def __init__(
        self,
        task: str,
        split: str,
        num_examples: int,
        seq_len: int,
        tokenizer,
        seed: int = 0,
        needle_distance: int | None = None,
        loss_on: str = "answer",
        **task_options,
    ):
        self.task, self.split, self.num_examples, self.seq_len = task, split, num_examples, seq_len
        self.tokenizer, self.seed, self.needle_distance, self.loss_on = tokenizer, seed, needle_distance, loss_on
        self.task_options = task_options
        self[0]  # fails here, not inside the Trainer, on a length the task or the tokenizer cannot take

    def __len__(self) -> int:
        return self.num_examples

    def example(self, index: int):
        return generate_example(
            self.task, self.split, index, self.seq_len - 2, self.seed, self.needle_distance, **self.task_options
        )

    def __getitem__(self, index: int) -> dict:
        return encode_example(self.example(index), self.tokenizer, self.seq_len, self.loss_on)


def collate_without_trailing_padding(features) -> dict:
    """`default_data_collator`, then the columns at the right end that are padding in every row (attention mask 0,
    no loss) dropped. A task example is right-padded to `seq_len` tokens, and with a tokenizer of multi-byte
    tokens most of a row is padding (SmolLM2's tokens average ~4.5 characters, so a 2050-character passkey example
    fills ~460 of 2050 tokens); those columns would cost a full forward and backward and change nothing: the
    model is causal, so no real token sees them, and they carry no loss."""
    batch = default_data_collator(features)
    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    padding = (mask == 0) & (batch["labels"] == IGNORE_INDEX) if "labels" in batch else mask == 0
    kept_columns = (~padding.all(dim=0)).nonzero()
    if len(kept_columns) == 0:
        return batch
    length = int(kept_columns[-1]) + 1
    return {key: value[:, :length] if value.shape == mask.shape else value for key, value in batch.items()}


__all__ = [
    "DataError",
    "IGNORE_INDEX",
    "TaskDataset",
    "collate_without_trailing_padding",
    "encode_example",
    "hold_out",
    "load_text_dataset",
    "pack_dataset",
]
