"""Tokenizers: the byte-level default (`TitansByteTokenizer`) and the BPE trained by `titans tokenizer`.

Expected ids are computed here from `str.encode("utf-8")` (byte b -> id b + 3), independently of the tokenizer.
"""

import ast
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from modeling_titans import TitansByteTokenizer, TitansConfig, TitansForCausalLM
from modeling_titans.cli import main as titans_cli
from modeling_titans.evaluation import tokens_after_needle
from modeling_titans.tasks import generate_examples

PAD, BOS, EOS = 0, 1, 2


def byte_ids(text: str) -> list[int]:
    return [byte + 3 for byte in text.encode("utf-8")]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings from random code points in every plane (no surrogates) and from random bytes read as UTF-8."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        ranges = [(0x20, 0x80), (0x80, 0xD800), (0xE000, 0x110000)]
        code_points = [rng.randrange(*rng.choice(ranges)) for _ in range(rng.randrange(1, 40))]
        texts.append("".join(map(chr, code_points)))
        texts.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))).decode("utf-8", errors="replace"))
    return texts


VARIED_TEXTS = [
    "Hello, world!",
    "",
    " leading and trailing spaces  \n\ttabs\r\n",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 😀 👩🏽‍🚀 🏳️‍🌈 family 👨‍👩‍👧‍👦",
    "RTL: שלום עולם and مرحبا بالعالم",
    "combining: e\u0301 a\u0308 Z\u0351\u0352\u0353a\u0354l\u0355g\u0356o",
    "control \x00\x01\x7f and U+FFFD \ufffd and max \U0010ffff",
    "literal special tokens: <s> </s> <pad> and HTML <s>struck</s>",
    "Ünïcödé ß ﬁ Ω ∑ √ ∞ ≠ ₿",
]


@pytest.fixture(scope="module")
def tokenizer():
    return TitansByteTokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return TitansForCausalLM(TitansConfig.from_preset("tiny")).eval()


# ----------------------------------------------------------------------------------------------- byte tokenizer


@pytest.mark.parametrize("text", VARIED_TEXTS + random_texts(20))
def test_byte_round_trip_and_ids(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids == [BOS] + byte_ids(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_invalid_utf8_from_generation_decodes_with_replacement(tokenizer):
    for raw in [b"\xff\xfe", b"\xe6\x97", b"ok \x80 ok", b"\xf0\x9f\x98", "é".encode()[:1] + b"x"]:
        ids = [byte + 3 for byte in raw]
        assert tokenizer.decode(ids) == raw.decode("utf-8", errors="replace")
    every_id = list(range(len(tokenizer)))
    assert isinstance(tokenizer.decode(every_id), str)


def test_special_tokens_and_vocab_match_the_presets(tokenizer):
    config = TitansConfig.from_preset("tiny")
    assert len(tokenizer) == tokenizer.vocab_size == config.vocab_size == 259
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD, BOS, EOS)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (PAD, BOS, EOS)
    assert tokenizer.unk_token_id is None  # every text is bytes: nothing is unknown
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3 + ord("A")]) == ["<pad>", "<s>", "</s>", "A"]
    assert tokenizer.decode([BOS, 3 + ord("h"), 3 + ord("i"), EOS]) == "<s>hi</s>"
    assert tokenizer.decode([BOS, 3 + ord("h"), 3 + ord("i"), EOS, PAD], skip_special_tokens=True) == "hi"
    assert tokenizer("hi", return_special_tokens_mask=True)["special_tokens_mask"] == [1, 0, 0]


def test_bos_eos_options_and_literal_special_token_text():
    assert TitansByteTokenizer(add_eos_token=True)("hi")["input_ids"] == [BOS] + byte_ids("hi") + [EOS]
    assert TitansByteTokenizer(add_bos_token=False)("hi")["input_ids"] == byte_ids("hi")
    text = "a<s>b</s>"
    assert TitansByteTokenizer()(text, add_special_tokens=False)["input_ids"] == byte_ids(text)
    parsed = TitansByteTokenizer(split_special_tokens=False)(text, add_special_tokens=False)["input_ids"]
    assert parsed == byte_ids("a") + [BOS] + byte_ids("b") + [EOS]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_side_and_attention_mask(padding_side):
    tokenizer = TitansByteTokenizer(padding_side=padding_side)
    texts = ["a", "é!", "xyz"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, 4)
    for row, text in enumerate(texts):
        real = [BOS] + byte_ids(text)
        pads = [PAD] * (4 - len(real))
        ids, mask = batch["input_ids"][row].tolist(), batch["attention_mask"][row].tolist()
        if padding_side == "left":
            assert ids == pads + real and mask == [0] * len(pads) + [1] * len(real)
        else:
            assert ids == real + pads and mask == [1] * len(real) + [0] * len(pads)


def test_default_padding_is_left_for_generation(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer(["a", "abc"], padding=True)["input_ids"][0] == [PAD, PAD, BOS, 3 + ord("a")]


def test_batch_encode_truncation_and_max_length_padding(tokenizer):
    texts = VARIED_TEXTS[:5]
    batch = tokenizer(texts)
    assert batch["input_ids"] == [tokenizer(text)["input_ids"] for text in texts]
    truncated = tokenizer(["abcdefgh", "ab"], truncation=True, max_length=4, padding="max_length")
    assert truncated["input_ids"] == [[BOS] + byte_ids("abc"), [PAD, BOS] + byte_ids("ab")]
    assert truncated["attention_mask"] == [[1, 1, 1, 1], [0, 1, 1, 1]]


def test_save_and_load_through_auto_tokenizer(tmp_path):
    TitansByteTokenizer(add_eos_token=True, padding_side="right").save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is TitansByteTokenizer
    assert (loaded.add_bos_token, loaded.add_eos_token, loaded.padding_side) == (True, True, "right")
    assert loaded(["hi", "é"], padding=True)["input_ids"] == [
        [BOS] + byte_ids("hi") + [EOS],
        [BOS] + byte_ids("é") + [EOS],
    ]
    overridden = AutoTokenizer.from_pretrained(tmp_path, add_bos_token=False)  # an explicit flag wins
    assert (overridden.add_bos_token, overridden.add_eos_token) == (False, True)
    assert overridden("hi")["input_ids"] == byte_ids("hi") + [EOS]


def test_auto_tokenizer_on_a_model_directory_without_tokenizer_files(tmp_path):
    TitansConfig.from_preset("tiny").save_pretrained(tmp_path)  # AutoTokenizer falls back on the config's type
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is TitansByteTokenizer and loaded("é")["input_ids"] == [BOS] + byte_ids("é")


def test_byte_tokenizer_file_imports_only_transformers_and_stdlib():
    """The file is copied flat into Hub repositories (trust_remote_code): no relative or package imports."""
    import modeling_titans.tokenization.tokenization_titans as module

    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots = [node.module.split(".")[0]]
        elif isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        else:
            continue
        assert all(root == "transformers" or root in sys.stdlib_module_names for root in roots), roots


# ------------------------------------------------------------------------------------------ with the model


def test_generate_and_pipeline_with_byte_tokenizer(tokenizer, tiny_model, tmp_path):
    prompts = ["Hi", "Hello, 世界"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    generated = tiny_model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 5)
    for row, prompt in enumerate(prompts):  # left padding: each row generates what its prompt gives alone
        alone = tiny_model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=5, do_sample=False)
        assert generated[row, -5:].tolist() == alone[0, -5:].tolist()
        assert tokenizer.decode(generated[row], skip_special_tokens=True).startswith(prompt)

    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    assert type(generator.tokenizer) is TitansByteTokenizer
    outputs = generator("Hello, 世界", max_new_tokens=4, do_sample=False)
    assert isinstance(outputs[0]["generated_text"], str) and outputs[0]["generated_text"].startswith("Hello, 世界")
    in_memory = pipeline("text-generation", model=tiny_model, tokenizer=tokenizer)
    assert in_memory("Hello, 世界", max_new_tokens=4, do_sample=False) == outputs


# --------------------------------------------------------------------------------------------- trained BPE

CORPUS = (
    "The quick brown fox jumps over the lazy dog. In 2024 there were 366 days; 1234567890.\n"
    "Der schnelle braune Fuchs springt über den faulen Hund. 日本語の文章です。\n"
    "the theory of the thermal theme: there, then, these, those.\n"
)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """Train through the command line, as a user would."""
    root = tmp_path_factory.mktemp("bpe")
    (root / "a.txt").write_text(CORPUS * 20, encoding="utf-8")
    (root / "b.txt").write_text("Numbers 31415 and 27182 and words words words.\n" * 20, encoding="utf-8")
    output_dir = root / "tokenizer"
    argv = ["tokenizer", "--files", str(root / "a.txt"), str(root / "b.txt"), "--vocab-size", "320"]
    assert titans_cli([*argv, "--output-dir", str(output_dir)]) == 0
    return output_dir


def test_bpe_loads_as_fast_tokenizer_with_special_tokens(bpe_dir):
    bpe = AutoTokenizer.from_pretrained(bpe_dir)
    assert bpe.is_fast and len(bpe) == 320
    assert (bpe.pad_token_id, bpe.bos_token_id, bpe.eos_token_id) == (PAD, BOS, EOS)
    assert bpe.convert_ids_to_tokens([PAD, BOS, EOS]) == ["<pad>", "<s>", "</s>"]
    assert bpe.padding_side == "left"
    ids = bpe("the theory")["input_ids"]
    assert ids[0] == BOS and EOS not in ids
    assert len(ids) - 1 < len("the theory".encode())  # merges were learned: fewer tokens than bytes


@pytest.mark.parametrize("text", VARIED_TEXTS + random_texts(10, seed=1))
def test_bpe_round_trip(bpe_dir, text):
    bpe = AutoTokenizer.from_pretrained(bpe_dir)
    assert bpe.decode(bpe(text)["input_ids"], skip_special_tokens=True) == text


def test_bpe_splits_digits_one_per_token(bpe_dir):
    bpe = AutoTokenizer.from_pretrained(bpe_dir)
    text = "In 2024 there were 366 days; 31415, 1234567890 and x9y."  # numbers the corpus repeats often
    tokens = bpe.convert_ids_to_tokens(bpe(text, add_special_tokens=False)["input_ids"])
    digit_tokens = [token for token in tokens if any(char.isdigit() for char in token)]
    assert digit_tokens == [char for char in text if char.isdigit()]


@pytest.mark.parametrize("task", ["passkey", "babi"])
def test_needle_distance_in_tokens(bpe_dir, tokenizer, task):
    """The tasks count characters; `titans eval` reports how many of the model's tokens follow the needle: with
    BPE, the tokens whose characters end after the needle's end (from the whole prompt's offsets)."""
    bpe = AutoTokenizer.from_pretrained(bpe_dir)
    for example in generate_examples(task, "test", 3, 400, needle_distance=150):
        offsets = bpe(example.prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        after_needle = sum(end > example.needle_end for _, end in offsets)
        assert tokens_after_needle(bpe, example) == after_needle < example.needle_distance
        assert tokens_after_needle(tokenizer, example) == example.needle_distance  # one byte, one token


def test_bpe_tokenizer_with_matching_model(bpe_dir):
    bpe = AutoTokenizer.from_pretrained(bpe_dir)
    config = TitansConfig.from_preset(
        "tiny",
        vocab_size=len(bpe),
        pad_token_id=bpe.pad_token_id,
        bos_token_id=bpe.bos_token_id,
        eos_token_id=bpe.eos_token_id,
    )
    torch.manual_seed(0)
    model = TitansForCausalLM(config).eval()
    batch = bpe(["the quick brown fox", "über 2024"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        output = model(**batch, labels=labels)
    assert output.logits.shape[-1] == len(bpe) and torch.isfinite(output.loss)
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3
    assert all(isinstance(text, str) for text in bpe.batch_decode(generated, skip_special_tokens=True))


# ---------------------------------------------------------------------------------------------- bad input


def test_tokenizer_command_reports_bad_input(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text(CORPUS, encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    output = str(tmp_path / "out")
    cases = [
        (["--files", str(tmp_path / "missing.txt")], "not found"),
        (["--files", str(empty)], "empty"),
        (["--files", str(tmp_path)], "not a regular file"),
        (["--files", str(latin1)], "UTF-8"),
        (["--files", str(good), "--vocab-size", "100"], "too small"),
    ]
    for arguments, message in cases:
        assert titans_cli(["tokenizer", *arguments, "--output-dir", output]) == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith("titans tokenizer: error:") and message in stderr and "Traceback" not in stderr
    assert titans_cli(["tokenizer", "--files", str(good), "--output-dir", str(good)]) == 2
    assert "is a file" in capsys.readouterr().err
