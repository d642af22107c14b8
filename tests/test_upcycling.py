"""Titans from a pretrained Llama (`modeling_titans/upcycling.py`, `titans convert`): right after conversion the
Titans model gives the Llama's logits under a sliding-window mask (the reference is a `MistralForCausalLM` with the
Llama's weights and that window) and the full Llama's logits for inputs no longer than the window; greedy
generate() within the window gives the Llama's tokens; save / load, the command line, a .gguf source (float32 and
float16, with and without a tokenizer; the test writes the file with the `gguf` package), memory-only training,
the Hub export and every refusal."""

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from modeling_titans import TitansForCausalLM
from modeling_titans.cli import main
from modeling_titans.tokenization import train_byte_level_bpe
from modeling_titans.upcycling import (
    load_llama,
    memory_parameter_names,
    titans_config_from_llama,
    train_only_memory,
)

WINDOW = 8
VOCAB = 300
CONVERTIBLE = ("mag", "mal")
TEXT = "The memory keeps what scrolled out of the attention window; attention keeps the recent tokens precisely.\n"


def tiny_llama_config(**overrides) -> LlamaConfig:
    """GQA (4 query heads, 2 key/value heads), RoPE theta 5e5, 3 layers."""
    fields = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()
    with torch.no_grad():  # non-trivial norms, so that a misplaced norm weight shows
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


def windowed_llama(llama: LlamaForCausalLM, window: int) -> MistralForCausalLM:
    """The Llama's weights under a sliding-window mask of `window` tokens (each query sees itself and the
    window - 1 tokens before it), as Mistral applies it."""
    fields = {key: value for key, value in llama.config.to_dict().items() if key not in ("model_type", "architectures")}
    reference = MistralForCausalLM(MistralConfig(**{**fields, "sliding_window": window})).to(llama.dtype).eval()
    reference.load_state_dict(llama.state_dict())
    return reference


def random_ids(batch_size: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch_size, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("variant", CONVERTIBLE)
@torch.no_grad()
def test_converted_model_gives_the_windowed_llama_logits(variant, tied):
    llama = tiny_llama(tied)
    titans = TitansForCausalLM.from_llama(llama, variant=variant, sliding_window=WINDOW, memory_chunk_size=4)
    assert titans.config.mixer_types == [variant] * 3 and titans.config.num_persistent_tokens == 0
    assert titans.config.tie_word_embeddings is tied

    long_ids = random_ids(2, 5 * WINDOW + 3)
    windowed = windowed_llama(llama, WINDOW)(long_ids).logits
    assert (windowed - llama(long_ids).logits).abs().max() > 1e-2, "the window must matter for this input"
    torch.testing.assert_close(titans(long_ids).logits, windowed, atol=1e-5, rtol=0)

    short_ids = random_ids(2, WINDOW, seed=2)
    torch.testing.assert_close(titans(short_ids).logits, llama(short_ids).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_layers_without_memory_are_sliding_window_attention():
    llama = tiny_llama()
    titans = TitansForCausalLM.from_llama(llama, variant="mag", sliding_window=WINDOW, memory_layers=[1])
    assert titans.config.mixer_types == ["swa", "mag", "swa"]
    assert {name.split(".")[2] for name in memory_parameter_names(titans)} == {"1"}
    ids = random_ids(1, 4 * WINDOW)
    torch.testing.assert_close(titans(ids).logits, windowed_llama(llama, WINDOW)(ids).logits, atol=1e-5, rtol=0)
    titans.set_memory_writes(False)  # skips the layers without a memory


@pytest.mark.parametrize("variant", CONVERTIBLE)
def test_greedy_generate_gives_the_llamas_tokens(variant):
    llama = tiny_llama(tied=True)
    titans = TitansForCausalLM.from_llama(llama, variant=variant, sliding_window=3 * WINDOW, memory_chunk_size=4)
    prompt = random_ids(2, 9)
    settings = {"max_new_tokens": 3 * WINDOW - 9, "do_sample": False, "pad_token_id": 0}  # fills the window exactly
    assert torch.equal(titans.generate(prompt, **settings), llama.generate(prompt, **settings))


@torch.no_grad()
def test_decoding_past_the_window_matches_the_windowed_llama():
    llama = tiny_llama()
    titans = TitansForCausalLM.from_llama(llama, variant="mal", sliding_window=WINDOW, memory_chunk_size=4)
    reference = windowed_llama(llama, WINDOW)
    settings = {"max_new_tokens": 4 * WINDOW, "do_sample": False, "pad_token_id": 0}
    prompt = random_ids(1, 5)
    assert torch.equal(titans.generate(prompt, **settings), reference.generate(prompt, **settings))


@torch.no_grad()
def test_save_and_reload_keep_the_model(tmp_path):
    llama = tiny_llama(tied=True)
    titans = TitansForCausalLM.from_llama(llama, variant="mag", sliding_window=WINDOW, memory_layers=[0, 2])
    titans.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.mixer_types == ["mag", "swa", "mag"] and not reloaded.config.gate_attention_norm
    ids = random_ids(2, 3 * WINDOW)
    torch.testing.assert_close(reloaded(ids).logits, titans(ids).logits, atol=0, rtol=0)


def test_training_the_memory_moves_the_model_from_the_llama():
    llama = tiny_llama()
    titans = TitansForCausalLM.from_llama(llama, variant="mag", sliding_window=WINDOW, memory_chunk_size=4)
    trainable = train_only_memory(titans)
    assert trainable == sorted(memory_parameter_names(titans))
    assert all(".mixer.memory." in name for name in trainable)
    assert {name for name, p in titans.named_parameters() if p.requires_grad} == set(trainable)
    frozen = {name: p.detach().clone() for name, p in titans.named_parameters() if not p.requires_grad}

    titans.train()
    titans.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in titans.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(2, 6 * WINDOW, seed=3)
    losses = []
    for _ in range(8):
        loss = titans(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[name]) for name, p in titans.named_parameters() if name in frozen)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"head_dim": 16}, "head_dim"),
        ({"rope_parameters": {"rope_type": "unknown", "rope_theta": 1e4}}, "rope_type"),
    ],
)
def test_unsupported_llamas_are_refused(change, field):
    with pytest.raises(ValueError, match=field) as error:
        titans_config_from_llama(tiny_llama_config(**change), "mag", WINDOW)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"variant": "mac"}, "variant='mac'"),
        ({"variant": "lmm"}, "variant='lmm'"),
        ({"num_persistent_tokens": 4}, "num_persistent_tokens"),
        ({"memory_layers": [3]}, "memory_layers"),
        ({"memory_layers": []}, "memory_layers"),
        ({"sliding_window": 0}, "sliding_window"),
    ],
)
def test_bad_conversions_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message) as error:
        TitansForCausalLM.from_llama(tiny_llama(), **{"sliding_window": WINDOW, **arguments})
    assert "\n" not in str(error.value)


def test_only_llamas_convert():
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        TitansForCausalLM.from_llama(torch.nn.Linear(2, 2), sliding_window=WINDOW)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A saved tiny Llama with a byte-level BPE tokenizer of its vocabulary size, and a text file to train on."""
    folder = tmp_path_factory.mktemp("llama")
    text_file = folder.parent / "text.txt"
    text_file.write_text(TEXT * 40)
    tokenizer = train_byte_level_bpe([str(text_file)], VOCAB, str(folder), show_progress=False)
    assert len(tokenizer) <= VOCAB
    tiny_llama(tied=True).save_pretrained(folder)
    return folder


def test_convert_command_writes_a_model_that_starts_as_the_llama(llama_folder, tmp_path, capsys):
    out = tmp_path / "titans"
    assert main(["convert", str(llama_folder), str(out), "--variant", "mal", "--window", str(WINDOW),
                 "--memory-layers", "0,2", "--memory-chunk-size", "4"]) == 0
    assert "memory in 2 of 3 layers" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    titans = AutoModelForCausalLM.from_pretrained(out)
    llama = LlamaForCausalLM.from_pretrained(llama_folder)
    assert titans.config.mixer_types == ["mal", "swa", "mal"] and titans.config.memory_chunk_size == 4
    ids = random_ids(1, WINDOW)
    with torch.no_grad():
        torch.testing.assert_close(titans(ids).logits, llama(ids).logits, atol=1e-5, rtol=0)

    assert main(["generate", str(out), "--prompt", "The memory", "--max-new-tokens", "3", "--device", "cpu"]) == 0

    assert main(["convert", str(llama_folder), str(out), "--window", str(WINDOW)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(llama_folder), str(out), "--window", str(WINDOW), "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--variant", "mac"], "variant='mac'"),
        (["--memory-layers", "a,b"], "--memory-layers"),
        (["--memory-layers", "7"], "memory_layers"),
    ],
)
def test_convert_command_refuses_bad_input_in_one_line(llama_folder, tmp_path, capsys, flags, message):
    assert main(["convert", str(llama_folder), str(tmp_path / "out"), "--window", str(WINDOW), *flags]) == 2
    error = capsys.readouterr().err
    last_line = error.strip().splitlines()[-1]  # above it, only the progress bar of reading the Llama
    assert last_line.startswith("titans convert: error:") and message in last_line


def test_convert_command_refuses_a_missing_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--window", str(WINDOW)]) == 2
    assert "neither a model folder nor a .gguf file" in capsys.readouterr().err


def test_train_only_memory_keeps_the_backbone(llama_folder, tmp_path):
    converted = tmp_path / "titans"
    assert main(["convert", str(llama_folder), str(converted), "--window", str(WINDOW), "--memory-chunk-size", "4"]) == 0
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT * 40)
    run = tmp_path / "run"
    assert main([
        "train", "--model-name-or-path", str(converted), "--train-only", "memory", "--train-file", str(text_file),
        "--seq-len", str(3 * WINDOW), "--max-steps", "3", "--per-device-train-batch-size", "2",
        "--activation-checkpointing", "--output-dir", str(run),
    ]) == 0
    before = dict(AutoModelForCausalLM.from_pretrained(converted).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(run).named_parameters())
    memory = set(memory_parameter_names(AutoModelForCausalLM.from_pretrained(run)))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed <= memory


# Loads an exported folder with trust_remote_code in an interpreter where modeling_titans cannot be imported.
NO_PACKAGE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    import torch

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] == "modeling_titans":
                raise ModuleNotFoundError(fullname)

    sys.meta_path.insert(0, Refuse())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
    """
)


def test_exported_conversion_loads_with_remote_code(llama_folder, tmp_path):
    converted, exported = tmp_path / "titans", tmp_path / "hub"
    assert main(["convert", str(llama_folder), str(converted), "--window", str(WINDOW)]) == 0
    assert main(["export", str(converted), str(exported)]) == 0
    ids = random_ids(1, 3 * WINDOW)
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", NO_PACKAGE_SCRIPT, str(exported), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path,
    )
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(converted)(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=0, rtol=0)


# Reading a Llama from a .gguf file (`llama_location`, `load_llama`). No real GGUF is downloaded: the tests write
# the tiny random Llama as one with the `gguf` package, the way llama.cpp's convert_hf_to_gguf.py lays it out.
GGUF_SKIP_REASON = "the GGUF tests write their .gguf file with the `gguf` package (pip install gguf)"


def permute_for_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (its `LlamaModel.permute`: RoPE on interleaved pairs), which transformers'
    GGUF loader undoes (`LlamaTensorProcessor._reverse_permute_weights`)."""
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(llama: LlamaForCausalLM, path, tokenizer=None, matrix_dtype=np.float32):
    """Writes `llama` to the GGUF file `path`: the "llama" metadata transformers reads into a LlamaConfig
    (GGUF_CONFIG_MAPPING["llama"]), the tensors under llama.cpp's names (no `output.weight` when tied), q/k rows
    permuted, matrices in `matrix_dtype` (float32 or float16) and norms in float32. With `tokenizer` (a byte-level
    BPE), also its vocabulary and merges as a "gpt2" tokenizer that adds BOS; the pre-tokenizer becomes GPT-2's
    (no digit splitting). Returns `path`."""
    import gguf

    config = llama.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if tokenizer is not None:
        tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
        assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokens))))  # ids 0 .. n-1, no gap
        merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        special = set(tokenizer.all_special_tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
        writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
        writer.add_bos_token_id(tokenizer.bos_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_pad_token_id(tokenizer.pad_token_id)
        writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in llama.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = permute_for_gguf(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = permute_for_gguf(array, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight",
                          array.astype(matrix_dtype if array.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("variant", CONVERTIBLE)
@torch.no_grad()
def test_gguf_file_converts_to_the_llamas_logits(tmp_path, variant, tied):
    pytest.importorskip("gguf", reason=GGUF_SKIP_REASON)
    llama = tiny_llama(tied)
    path = write_llama_gguf(llama, tmp_path / "llama.gguf")
    titans = TitansForCausalLM.from_llama(path, variant=variant, sliding_window=WINDOW, memory_chunk_size=4)
    assert titans.config.mixer_types == [variant] * 3 and titans.config.tie_word_embeddings is tied
    short_ids = random_ids(2, WINDOW)
    torch.testing.assert_close(titans(short_ids).logits, llama(short_ids).logits, atol=1e-5, rtol=0)
    long_ids = random_ids(1, 4 * WINDOW + 3)
    windowed = windowed_llama(llama, WINDOW)(long_ids).logits
    torch.testing.assert_close(titans(long_ids).logits, windowed, atol=1e-5, rtol=0)
    assert load_llama(str(path))[1] is None  # no tokenizer section: the model alone


@torch.no_grad()
def test_f16_gguf_file_converts_to_the_rounded_llamas_logits(tmp_path):
    pytest.importorskip("gguf", reason=GGUF_SKIP_REASON)
    llama = tiny_llama()
    path = write_llama_gguf(llama, tmp_path / "llama-f16.gguf", matrix_dtype=np.float16)
    rounded = copy.deepcopy(llama)
    for parameter in rounded.parameters():
        if parameter.ndim == 2:
            parameter.copy_(parameter.half().float())
    titans = TitansForCausalLM.from_llama(path, variant="mal", sliding_window=WINDOW)
    assert titans.dtype == torch.float32  # transformers dequantizes to float32
    ids = random_ids(2, WINDOW)
    expected = rounded(ids).logits
    assert (expected - llama(ids).logits).abs().max() > 1e-5, "the float16 rounding must show in the logits"
    torch.testing.assert_close(titans(ids).logits, expected, atol=1e-5, rtol=0)


def test_convert_command_reads_a_gguf_file_with_its_tokenizer(tmp_path, capsys):
    pytest.importorskip("gguf", reason=GGUF_SKIP_REASON)
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT * 40)
    tokenizer = train_byte_level_bpe([str(text_file)], VOCAB, show_progress=False)
    llama = tiny_llama(tied=True)
    path = write_llama_gguf(llama, tmp_path / "llama.gguf", tokenizer)
    out = tmp_path / "titans"
    assert main(["convert", str(path), str(out), "--variant", "mag", "--window", str(WINDOW)]) == 0
    assert "Titans MAG, memory in 3 of 3 layers" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    titans = TitansForCausalLM.from_pretrained(out)
    ids = random_ids(1, WINDOW)
    with torch.no_grad():
        torch.testing.assert_close(titans(ids).logits, llama(ids).logits, atol=1e-5, rtol=0)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert (saved.bos_token_id, saved.eos_token_id, saved.pad_token_id) == (1, 2, 0)
