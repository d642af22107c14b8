"""Training data: the user's text packed into fixed-length sequences (cached), and task examples turned into
sequences with the loss on the answer. Expected token ids are written out from the byte tokenizer's definition
(byte b -> id b + 3, <s> = 1, </s> = 2), not taken from the code under test."""

import json

import pytest
import torch
from helpers import tiny_model

from modeling_titans.data import (
    IGNORE_INDEX,
    DataError,
    TaskDataset,
    collate_without_trailing_padding,
    encode_example,
    hold_out,
    load_text_dataset,
    pack_dataset,
)
from modeling_titans.tasks import generate_example, generate_examples
from modeling_titans.tokenization import TitansByteTokenizer
from modeling_titans.training import TaskMix

BOS, EOS, PAD = 1, 2, 0


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def tokenizer():
    return TitansByteTokenizer()


@pytest.fixture
def text_files(tmp_path):
    book = "Il était une fois un mémoire.\nSecond line.\n\nA new paragraph, still the same document.\n" * 3
    (tmp_path / "book.txt").write_text(book, encoding="utf-8")
    records = ["first record", "second, longer record with ünïcode", ""]
    (tmp_path / "notes.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(records)))
    return tmp_path / "book.txt", tmp_path / "notes.jsonl", [book] + records


def test_files_are_packed_into_sequences_of_the_same_documents(tokenizer, text_files):
    book, notes, documents = text_files
    seq_len = 16
    texts = load_text_dataset([str(book), str(notes)])
    assert list(texts["text"]) == documents  # a .txt file is one document, exactly as written
    packed = pack_dataset(texts, tokenizer, seq_len)
    stream = [token for document in documents for token in [BOS] + byte_ids(document) + [EOS]]
    expected_rows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    assert list(packed["input_ids"]) == expected_rows
    assert list(packed["labels"]) == expected_rows  # the loss on every token of your own text
    assert all(mask == [1] * seq_len for mask in packed["attention_mask"])


def test_packing_is_cached(tokenizer, text_files):
    book, _, _ = text_files
    first = pack_dataset(load_text_dataset([str(book)]), tokenizer, 16)
    assert first.cache_files, "map results are written to the datasets cache"
    again = pack_dataset(load_text_dataset([str(book)]), TitansByteTokenizer(), 16)
    assert again.cache_files == first.cache_files  # same files, tokenizer and length: the cache is reused
    other_length = pack_dataset(load_text_dataset([str(book)]), tokenizer, 32)
    assert other_length.cache_files != first.cache_files


def test_datasets_from_disk_and_text_column(tokenizer, tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["abc", "defgh"]})}).save_to_disk(str(saved))
    texts = load_text_dataset(dataset=str(saved), text_column="body")
    assert texts.column_names == ["text"] and list(texts["text"]) == ["abc", "defgh"]
    packed = pack_dataset(texts, tokenizer, 4)
    stream = [BOS] + byte_ids("abc") + [EOS, BOS] + byte_ids("defgh") + [EOS]
    assert list(packed["input_ids"]) == [stream[0:4], stream[4:8], stream[8:12]]

    with pytest.raises(DataError, match="has no 'text' field \\(fields: body\\)"):
        load_text_dataset(dataset=str(saved))
    only_test = tmp_path / "only_test"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(only_test))
    with pytest.raises(DataError, match="no 'train' split \\(splits: test\\)"):
        load_text_dataset(dataset=str(only_test))


def test_bad_files_give_clear_errors(tokenizer, tmp_path):
    with pytest.raises(DataError, match="No such file: .*missing.txt"):
        load_text_dataset([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        load_text_dataset([str(tmp_path / "empty.txt")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="must end in .txt, .jsonl, .json"):
        load_text_dataset([str(tmp_path / "data.csv")])
    (tmp_path / "no_text.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        load_text_dataset([str(tmp_path / "no_text.jsonl")])
    (tmp_path / "broken.jsonl").write_text('{"text": "x"\n')
    with pytest.raises(DataError, match="broken.jsonl line 1 is not valid JSON"):
        load_text_dataset([str(tmp_path / "broken.jsonl")])
    with pytest.raises(DataError, match="No training text given"):
        load_text_dataset([])
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match="holds 6 tokens, fewer than one sequence of 64"):
        pack_dataset(load_text_dataset([str(tmp_path / "short.txt")]), tokenizer, 64)
    with pytest.raises(DataError, match="Cannot load the dataset 'no-such/dataset-anywhere'"):
        load_text_dataset(dataset="no-such/dataset-anywhere")  # offline in the tests, unknown anyway


def test_hold_out_keeps_sequences_apart(tokenizer, text_files):
    book, _, _ = text_files
    packed = pack_dataset(load_text_dataset([str(book)]), tokenizer, 8)
    train, validation = hold_out(packed, 0.1, seed=0)
    assert len(validation) == round(0.1 * len(packed)) and len(train) + len(validation) == len(packed)
    assert sorted(map(tuple, list(train["input_ids"]) + list(validation["input_ids"]))) == sorted(map(tuple, packed["input_ids"]))
    with pytest.raises(DataError, match="only 1 sequence"):
        hold_out(packed.select([0]), 0.1, seed=0)


@pytest.mark.parametrize("task", ["passkey", "recall", "mqar", "babi"])
def test_task_examples_have_the_loss_on_the_answer(tokenizer, task):
    seq_len = 300
    example = generate_examples(task, "train", 1, seq_len - 2)[0]
    encoded = encode_example(example, tokenizer, seq_len)
    expected = [BOS] + byte_ids(example.prompt) + byte_ids(example.answer) + [EOS]
    assert encoded["input_ids"].tolist() == expected  # the byte tokenizer fills the sequence exactly
    assert encoded["attention_mask"].tolist() == [1] * seq_len
    labels = encoded["labels"].tolist()
    answer_start = 1 + len(example.prompt)
    assert labels[:answer_start] == [IGNORE_INDEX] * answer_start
    assert labels[answer_start:] == byte_ids(example.answer) + [EOS]
    assert encode_example(example, tokenizer, seq_len, loss_on="all")["labels"].tolist() == expected


def test_short_examples_are_right_padded_and_long_ones_refused(tokenizer):
    example = generate_examples("passkey", "train", 1, 200)[0]
    encoded = encode_example(example, tokenizer, 210)
    assert encoded["input_ids"][-8:].tolist() == [PAD] * 8
    assert encoded["attention_mask"].sum() == 202
    assert encoded["labels"][-8:].tolist() == [IGNORE_INDEX] * 8
    with pytest.raises(DataError, match="takes 202 tokens with this tokenizer, over 201"):
        encode_example(example, tokenizer, 201)


def test_task_dataset_generates_example_i_on_demand(tokenizer):
    dataset = TaskDataset("babi", "train", 1000, 260, tokenizer, seed=7, needle_distance=100)
    assert len(dataset) == 1000
    for index in (0, 999):
        example = generate_example("babi", "train", index, 258, seed=7, needle_distance=100)
        assert torch.equal(dataset[index]["input_ids"], encode_example(example, tokenizer, 260)["input_ids"])
    with pytest.raises(ValueError, match="too short for the babi task"):
        TaskDataset("babi", "train", 10, 100, tokenizer)


def test_task_mix_packs_consecutive_examples_each_with_its_answer_loss(tokenizer):
    # Sequence i of a 2-per-sequence mix is examples 2i and 2i + 1 of the task at half the length, one after the
    # other, each generated from its own index (the same as the independent generator gives) and scored on its answer.
    packed = TaskMix(["passkey", "recall"], "train", 3, 400, tokenizer, seed=5, examples_per_sequence=2)
    assert len(packed) == 3
    for index in range(3):
        sequence = packed[index]
        assert sequence["input_ids"].shape == (400,)
        parts = []
        for position in (2 * index, 2 * index + 1):
            task = ("passkey", "recall")[position % 2]
            example = generate_example(task, "train", position // 2, 198, seed=5)
            parts.append(encode_example(example, tokenizer, 200))
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(sequence[key], torch.cat([part[key] for part in parts])), key
        answers = [tokens for tokens in sequence["labels"].tolist() if tokens != IGNORE_INDEX]
        assert answers.count(EOS) == 2  # both answers keep their loss
    one_each = TaskMix(["passkey"], "train", 2, 200, tokenizer, seed=5)
    single = TaskDataset("passkey", "train", 2, 200, tokenizer, seed=5)
    assert torch.equal(one_each[1]["input_ids"], single[1]["input_ids"])
    with pytest.raises(ValueError, match="examples_per_sequence=3 must be at least 1 and divide the sequence length"):
        TaskMix(["passkey"], "train", 1, 400, tokenizer, seed=0, examples_per_sequence=3)


def test_task_mix_alternates_counts_of_examples_per_sequence(tokenizer):
    # Counts (1, 2): even sequences hold one example of 400 tokens, odd ones two of 200; each count draws its examples
    # in order from its own seed (seed * 2 + its position), so no code repeats between the two.
    mixed = TaskMix(["passkey"], "train", 4, 400, tokenizer, seed=5, examples_per_sequence=(1, 2))
    expected = {0: [(0, 400, 10)], 1: [(0, 200, 11), (1, 200, 11)], 2: [(1, 400, 10)], 3: [(2, 200, 11), (3, 200, 11)]}
    for index, examples in expected.items():
        parts = [
            encode_example(generate_example("passkey", "train", position, length - 2, seed=seed), tokenizer, length)
            for position, length, seed in examples
        ]
        sequence = mixed[index]
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(sequence[key], torch.cat([part[key] for part in parts])), (index, key)
    answers = [generate_example("passkey", "train", index, 398, seed=10).answer for index in range(2)]
    answers += [generate_example("passkey", "train", index, 198, seed=11).answer for index in range(4)]
    assert len(set(answers)) == len(answers)
    with pytest.raises(ValueError, match="examples_per_sequence=3 must be at least 1"):
        TaskMix(["passkey"], "train", 1, 400, tokenizer, seed=0, examples_per_sequence=(2, 3))
    with pytest.raises(ValueError, match="examples_per_sequence=0 must be at least 1"):
        TaskMix(["passkey"], "train", 1, 400, tokenizer, seed=0, examples_per_sequence=())


@pytest.mark.parametrize("variant", ["mag", "mac"])
def test_the_collator_drops_columns_that_are_padding_in_every_row_and_keeps_the_loss(tokenizer, variant):
    # Two examples shorter than the sequence (as with a tokenizer of multi-byte tokens): the batch keeps the
    # columns up to the longer one's last token, and the model's loss is the same as on the fully padded batch.
    examples = [generate_examples("passkey", "train", 2, length, seed=3)[0] for length in (170, 210)]
    features = [encode_example(example, tokenizer, 260) for example in examples]
    collated = collate_without_trailing_padding(features)
    assert {key: tuple(value.shape) for key, value in collated.items()} == {
        key: (2, 212) for key in ("input_ids", "attention_mask", "labels")
    }
    assert collated["attention_mask"].sum(dim=1).tolist() == [172, 212]
    padded = {key: torch.stack([feature[key] for feature in features]) for key in features[0]}
    model = tiny_model(variant).double()
    assert torch.allclose(model(**collated).loss, model(**padded).loss, rtol=1e-12, atol=0)
    assert collate_without_trailing_padding(features[1:])["input_ids"].shape == (1, 212)
    full = [encode_example(example, tokenizer, length + 2) for example, length in zip(examples, (170, 210))]
    assert collate_without_trailing_padding(full[1:])["input_ids"].shape == (1, 212)  # nothing to drop
