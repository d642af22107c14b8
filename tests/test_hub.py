"""Hub round trip: `titans export`, `titans push`, and loading an exported folder without our package.

The central test loads every exported variant in a fresh Python process in which `modeling_titans` cannot be
imported, with `trust_remote_code=True`, and checks that its logits and greedy `generate()` tokens are identical
to the package model's. Nothing here touches the network: push failures go to a closed local port.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_titans import TitansByteTokenizer, TitansForCausalLM
from modeling_titans.cli import main
from modeling_titans.configuration.configuration_titans import TITANS_FORMAT_VERSION
from modeling_titans.hub_upload.remote_code import RemoteCodeError, package_imports, write_remote_code
from modeling_titans.tokenization import train_byte_level_bpe

from helpers import VARIANTS, tiny_model

PROMPT = "Titans remember: the passkey is 4071."
NEW_TOKENS = 12  # with the prompt's 38 tokens, decoding crosses chunk (4), window (8) and segment (8) boundaries
SHARDED_VARIANT = "mac"  # exported with a small --max-shard-size, so its weights come in several shards
SUMMARY_VARIANT = "mag"  # its checkpoint carries a training_summary.json
# The layout `titans train` writes (model, data, training, metrics, loss_curve), abridged.
TRAINING_SUMMARY = {
    "model": {"preset": "tiny", "config_file": None, "variant": "mag"},
    "data": {"task": "passkey", "train_examples": 64},
    "training": {"steps": 5, "learning_rate": 0.003},
    "metrics": {"final_train_loss": 4.51234, "final_eval_loss": 3.25},
    "loss_curve": {"train": [[step, 5.0 - 0.1 * step] for step in range(1, 11)], "eval": [[5, 3.25]]},
}
# Exports live at ROOT/someone/tiny-<name>: the card's usage snippet loads "someone/tiny-<name>", which
# from_pretrained resolves as a local folder when run from ROOT.
REPO_OWNER = "someone"

# Run in a fresh interpreter: refuse every import of modeling_titans, then load each folder given on the command
# line with the Auto classes and trust_remote_code=True, and save what it computes for the parent to compare.
NO_PACKAGE_SCRIPT = textwrap.dedent(
    """
    import contextlib, importlib.abc, io, json, sys

    class RefuseModelingTitans(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "modeling_titans" or fullname.startswith("modeling_titans."):
                raise ModuleNotFoundError(f"No module named {fullname!r} (refused by the test)", name=fullname)
            return None

    sys.meta_path.insert(0, RefuseModelingTitans())

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    job = json.load(open(sys.argv[1]))
    results = {"package_importable": True, "models": {}, "config_errors": {}}
    try:
        import modeling_titans  # noqa: F401
    except ImportError:
        results["package_importable"] = False

    for name, folder in job["folders"].items():
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        inputs = tokenizer([job["prompt"]], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        generated = model.generate(
            **inputs, max_new_tokens=job["new_tokens"], do_sample=False, return_dict_in_generate=True
        )
        results["models"][name] = {
            "classes": [type(obj).__module__ + "." + type(obj).__name__ for obj in (config, tokenizer, model)],
            "cache": type(generated.past_key_values).__name__,
            "input_ids": inputs["input_ids"],
            "logits": logits,
            "tokens": generated.sequences,
        }
    for name, folder in job["bad_config_folders"].items():
        try:
            AutoConfig.from_pretrained(folder, trust_remote_code=True)
            results["config_errors"][name] = None
        except ValueError as error:
            results["config_errors"][name] = str(error)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(job["snippet"], {})
    results["snippet_output"] = printed.getvalue()
    results["modules_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] == "modeling_titans")
    torch.save(results, job["results"])
    """
)


def make_checkpoint(path, variant, tokenizer=None, summary=None):
    """What `titans train` leaves behind: config, safetensors weights, tokenizer (and maybe a training summary)."""
    tiny_model(variant).save_pretrained(path)
    (tokenizer or TitansByteTokenizer()).save_pretrained(path)
    if summary is not None:
        (path / "training_summary.json").write_text(json.dumps(summary))
    return path


def export(checkpoint, out_dir, *flags) -> int:
    return main(["export", str(checkpoint), str(out_dir), *flags])


def folder_digest(folder) -> dict[str, str]:
    digests = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def fenced_python(markdown: str) -> str:
    return re.search(r"```python\n(.*?)```", markdown, re.DOTALL).group(1)


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    """Exports of a tiny model of every variant (byte-level tokenizer) and of one with a BPE tokenizer."""
    root = tmp_path_factory.mktemp("hub")
    checkpoints = {}
    for variant in VARIANTS:
        summary = TRAINING_SUMMARY if variant == SUMMARY_VARIANT else None
        checkpoints[variant] = make_checkpoint(root / f"ckpt-{variant}", variant, summary=summary)
    text_file = root / "corpus.txt"
    text_file.write_text("the passkey is 4071, remember the passkey. " * 20)
    bpe = train_byte_level_bpe([str(text_file)], vocab_size=259)  # bytes and special tokens only: the tiny vocab
    checkpoints["mag-bpe"] = make_checkpoint(root / "ckpt-mag-bpe", "mag", tokenizer=bpe)

    for name, checkpoint in checkpoints.items():
        flags = ["--repo-id", f"{REPO_OWNER}/tiny-{name}"]
        if name == SHARDED_VARIANT:
            flags += ["--max-shard-size", "64KB", "--license", "mit"]
        assert export(checkpoint, root / REPO_OWNER / f"tiny-{name}", *flags) == 0
    return root


def exported(hub_root, name):
    return hub_root / REPO_OWNER / f"tiny-{name}"


@pytest.fixture(scope="module")
def package_results(hub_root):
    """What the package model computes on each exported folder, loaded with no trust_remote_code."""
    results = {}
    for name in (*VARIANTS, "mag-bpe"):
        model = AutoModelForCausalLM.from_pretrained(exported(hub_root, name)).eval()
        tokenizer = AutoTokenizer.from_pretrained(exported(hub_root, name))
        inputs = tokenizer([PROMPT], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        results[name] = dict(model=model, tokenizer=tokenizer, inputs=inputs, logits=logits, tokens=tokens)
    return results


@pytest.fixture(scope="module")
def no_package_results(hub_root, tmp_path_factory):
    """Runs NO_PACKAGE_SCRIPT in a fresh interpreter (cwd = hub_root, module cache in a temp dir)."""
    work = tmp_path_factory.mktemp("no-package")
    bad_config_folders = {}
    bad_fields = {
        "unknown-variant": ("variant", "mamba"),
        "newer-format": ("titans_format_version", TITANS_FORMAT_VERSION + 1),
    }
    for name, (field, value) in bad_fields.items():
        folder = work / name
        shutil.copytree(exported(hub_root, "mag"), folder)
        config = json.loads((folder / "config.json").read_text())
        config[field] = value
        (folder / "config.json").write_text(json.dumps(config))
        bad_config_folders[name] = str(folder)
    job = {
        "folders": {name: str(exported(hub_root, name)) for name in (*VARIANTS, "mag-bpe")},
        "bad_config_folders": bad_config_folders,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "snippet": fenced_python((exported(hub_root, "mag") / "README.md").read_text()),
        "results": str(work / "results.pt"),
    }
    (work / "job.json").write_text(json.dumps(job))
    (work / "script.py").write_text(NO_PACKAGE_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_HOME=str(work / "hf-home"), HF_MODULES_CACHE=str(work / "hf-modules"))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, str(work / "script.py"), str(work / "job.json")]
    completed = subprocess.run(command, cwd=hub_root, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(job["results"], weights_only=False)


def test_exported_folder_holds_a_complete_repository(hub_root):
    folder = exported(hub_root, "mag")
    files = set(os.listdir(folder))
    code = {"configuration_titans.py", "modeling_titans.py", "cache_titans.py", "tokenization_titans.py"}
    code |= {"token_mixers.py", "attention.py", "memory_layer.py", "basics.py", "tokens.py"}  # layers/
    code |= {"memory_network.py", "neural_memory.py", "chunk_scan.py"}  # ops/
    code.add("upcycling.py")  # TitansForCausalLM.from_llama
    data = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"}
    data.add("training_summary.json")
    assert files == code | data
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_titans.TitansConfig",
        "AutoModel": "modeling_titans.TitansModel",
        "AutoModelForCausalLM": "modeling_titans.TitansForCausalLM",
        "AutoTokenizer": ["tokenization_titans.TitansByteTokenizer", None],
    }
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"] == {"AutoTokenizer": ["tokenization_titans.TitansByteTokenizer", None]}
    generation_config = json.loads((folder / "generation_config.json").read_text())
    special_ids = [generation_config[f"{token}_token_id"] for token in ("bos", "eos", "pad")]
    assert special_ids == [1, 2, 0]


def test_bpe_tokenizer_needs_no_remote_code(hub_root):
    folder = exported(hub_root, "mag-bpe")
    assert "tokenizer.json" in os.listdir(folder)
    assert "tokenization_titans.py" not in os.listdir(folder)
    assert "AutoTokenizer" not in json.loads((folder / "config.json").read_text())["auto_map"]
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())


def test_remote_code_is_the_package_source_with_flat_imports(hub_root):
    """Each flat file is its package module, line for line, but for a two-line header and rewritten imports."""
    import modeling_titans.cache_titans
    import modeling_titans.configuration.configuration_titans
    import modeling_titans.layers.attention
    import modeling_titans.layers.basics
    import modeling_titans.layers.memory_layer
    import modeling_titans.layers.token_mixers
    import modeling_titans.layers.tokens
    import modeling_titans.modeling
    import modeling_titans.ops.chunk_scan
    import modeling_titans.ops.memory_network
    import modeling_titans.ops.neural_memory
    import modeling_titans.tokenization.tokenization_titans

    sources = {
        "configuration_titans.py": modeling_titans.configuration.configuration_titans,
        "modeling_titans.py": modeling_titans.modeling,
        "token_mixers.py": modeling_titans.layers.token_mixers,
        "attention.py": modeling_titans.layers.attention,
        "memory_layer.py": modeling_titans.layers.memory_layer,
        "basics.py": modeling_titans.layers.basics,
        "tokens.py": modeling_titans.layers.tokens,
        "memory_network.py": modeling_titans.ops.memory_network,
        "neural_memory.py": modeling_titans.ops.neural_memory,
        "chunk_scan.py": modeling_titans.ops.chunk_scan,
        "cache_titans.py": modeling_titans.cache_titans,
        "tokenization_titans.py": modeling_titans.tokenization.tokenization_titans,
    }
    folder = exported(hub_root, "mag")
    for flat_file, module in sources.items():
        flat_lines = (folder / flat_file).read_text().splitlines()
        with open(module.__file__) as f:
            source_lines = f.read().splitlines()
        assert flat_lines[0].startswith("# Generated by `titans export`") and flat_lines[1].startswith("#")
        assert len(flat_lines) == len(source_lines) + 2
        for flat_line, source_line in zip(flat_lines[2:], source_lines):
            if flat_line != source_line:
                assert source_line.startswith("from .") and re.fullmatch(r"from \.\w+ import .*", flat_line), flat_line
                assert flat_line.split(" import ")[1] == source_line.split(" import ")[1]
        for line in flat_lines:
            assert not re.match(r"\s*(from|import)\s+modeling_titans\b", line), line  # only relative imports
            if line.startswith("from ."):
                assert (folder / (line.split()[1][1:] + ".py")).is_file(), line


@pytest.mark.parametrize(
    "source, message",
    [
        ("from . import neural_memory\n", "`from . import ...` cannot be flattened"),
        ("import modeling_titans.ops.neural_memory\n", "`import modeling_titans.ops.neural_memory` cannot be flattened"),
    ],
)
def test_remote_code_refuses_imports_it_cannot_flatten(source, message):
    with pytest.raises(RemoteCodeError, match=re.escape(message)):
        package_imports("modeling_titans.modeling", source)


def test_remote_code_refuses_imports_from_a_package_init(tmp_path):
    with pytest.raises(RemoteCodeError, match="modeling_titans.configuration is a package"):
        write_remote_code(str(tmp_path), ["modeling_titans.configuration"])


def test_weights_are_safetensors_only_and_sharded_above_the_size_flag(hub_root):
    folder = exported(hub_root, SHARDED_VARIANT)
    shards = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    assert len(shards) > 1
    exported_tensors = {}
    for name in shards:
        shard = load_file(folder / name)
        assert sum(tensor.numel() * tensor.element_size() for tensor in shard.values()) <= 64 * 1000
        exported_tensors.update(shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not [name for name in os.listdir(folder) if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    original = load_file(hub_root / f"ckpt-{SHARDED_VARIANT}" / "model.safetensors")
    assert exported_tensors.keys() == original.keys()
    assert all(torch.equal(exported_tensors[key], original[key]) for key in original)


def test_package_loads_the_export_without_trust_remote_code(hub_root, package_results):
    """With modeling_titans imported, the Auto classes take our classes and the checkpoint's exact weights.
    (Weights, not logits: CPU matmul kernels may round differently for tensors at other memory alignments, and a
    sharded file places them differently.)"""
    for name in (*VARIANTS, "mag-bpe"):
        model = package_results[name]["model"]
        assert type(model) is TitansForCausalLM
        exported_weights = model.state_dict()
        original_weights = TitansForCausalLM.from_pretrained(hub_root / f"ckpt-{name}").state_dict()
        assert exported_weights.keys() == original_weights.keys()
        assert all(torch.equal(exported_weights[key], original_weights[key]) for key in original_weights)
    assert type(package_results["mag"]["tokenizer"]) is TitansByteTokenizer


@pytest.mark.parametrize("name", (*VARIANTS, "mag-bpe"))
def test_loads_without_the_package_and_matches_it_exactly(name, package_results, no_package_results):
    assert not no_package_results["package_importable"]
    assert no_package_results["modules_loaded"] == []
    remote, package = no_package_results["models"][name], package_results[name]
    config_class, tokenizer_class, model_class = remote["classes"]
    assert re.fullmatch(r"transformers_modules\..*\.configuration_titans\.TitansConfig", config_class)
    assert re.fullmatch(r"transformers_modules\..*\.modeling_titans\.TitansForCausalLM", model_class)
    if name == "mag-bpe":
        assert tokenizer_class.startswith("transformers.")
    else:
        assert re.fullmatch(r"transformers_modules\..*\.tokenization_titans\.TitansByteTokenizer", tokenizer_class)
    assert remote["cache"] == "TitansCache"
    assert torch.equal(remote["input_ids"], package["inputs"]["input_ids"])
    assert torch.equal(remote["logits"], package["logits"])
    assert torch.equal(remote["tokens"], package["tokens"])
    assert remote["tokens"].shape[1] == package["inputs"]["input_ids"].shape[1] + NEW_TOKENS


def test_remote_code_refuses_invalid_configs(no_package_results):
    errors = no_package_results["config_errors"]
    assert "variant='mamba' is invalid" in errors["unknown-variant"]
    assert "newer version" in errors["newer-format"]


def test_model_card_snippet_works_as_written(package_results, no_package_results):
    package = package_results["mag"]
    # The snippet's own prompt and settings, run with the package model:
    inputs = package["tokenizer"]("The passkey is", return_tensors="pt")
    output = package["model"].generate(**inputs, max_new_tokens=32, do_sample=False)
    expected_output = package["tokenizer"].decode(output[0], skip_special_tokens=True) + "\n"
    assert no_package_results["snippet_output"] == expected_output


def test_model_card_metadata_config_and_training(hub_root):
    card = ModelCard((exported(hub_root, SUMMARY_VARIANT) / "README.md").read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert {"titans", f"titans-{SUMMARY_VARIANT}"} <= set(card.data.tags)
    assert "**MAG** (memory as a gate)" in card.text
    assert "| `sliding_window` | 8 |" in card.text and "| `memory_chunk_size` | 4 |" in card.text
    for row in ("| `task` | passkey |", "| `learning_rate` | 0.003 |", "| `final_train_loss` | 4.512 |",
                "| `final_eval_loss` | 3.25 |", "| `train` | list of 10, in training_summary.json |"):
        assert row in card.text
    assert "### Data" in card.text and "### Metrics" in card.text and "config_file" not in card.text
    assert f'repo_id = "{REPO_OWNER}/tiny-{SUMMARY_VARIANT}"' in card.text

    sharded_card = ModelCard((exported(hub_root, SHARDED_VARIANT) / "README.md").read_text())
    assert sharded_card.data.license == "mit"
    assert "| `segment_size` | 8 |" in sharded_card.text and "sliding_window" not in sharded_card.text
    assert "No training record" in sharded_card.text


def test_export_refuses_pickle_only_checkpoint(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "lmm")
    state_dict = load_file(checkpoint / "model.safetensors")
    os.remove(checkpoint / "model.safetensors")
    torch.save(state_dict, checkpoint / "pytorch_model.bin")
    assert export(checkpoint, tmp_path / "out") == 2
    assert "only pickle weights (pytorch_model.bin)" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["ckpt"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[8:10] = b"[["  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))


def _edit_tensors(edit):
    def tamper(path):
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})

    return tamper


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_truncate, "not a valid safetensors file (truncated or corrupted?)"),
        (_corrupt_header, "not a valid safetensors file (truncated or corrupted?)"),
        (
            _edit_tensors(lambda t: t.__setitem__("model.norm.weigth", t.pop("model.norm.weight"))),
            "missing model.norm.weight; unexpected model.norm.weigth",
        ),
        (
            _edit_tensors(lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:-1].clone())),
            "wrong shape: model.norm.weight [31] in model.safetensors (expected [32])",
        ),
        (
            _edit_tensors(lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
            "missing model.layers.1.mlp.down_proj.weight",
        ),
    ],
    ids=["truncated", "corrupt-header", "renamed-tensor", "wrong-shape", "missing-tensor"],
)
def test_export_refuses_truncated_or_tampered_weights(tamper, message, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "mal")
    tamper(checkpoint / "model.safetensors")
    assert export(checkpoint, tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["ckpt"]  # no OUT_DIR, no staging folder left behind


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("variant", "mamba", "TitansConfig.variant='mamba' is invalid: must be one of"),
        ("titans_format_version", TITANS_FORMAT_VERSION + 1, "written by a newer version of the Titans code"),
        ("model_type", "llama", "model_type='llama', not 'titans'"),
    ],
)
def test_export_refuses_invalid_configs(field, value, message, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "mag")
    config = json.loads((checkpoint / "config.json").read_text())
    config[field] = value
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert export(checkpoint, tmp_path / "out") == 2
    assert message in capsys.readouterr().err


def test_export_refuses_bad_output_tokenizer_and_shard_size(hub_root, tmp_path, capsys):
    checkpoint = hub_root / "ckpt-lmm"
    assert export(checkpoint, exported(hub_root, "lmm")) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert export(checkpoint, tmp_path / "out", "--max-shard-size", "lots") == 2
    assert "--max-shard-size 'lots' is not a size" in capsys.readouterr().err
    no_tokenizer = tmp_path / "no-tokenizer"
    tiny_model("lmm").save_pretrained(no_tokenizer)
    assert export(no_tokenizer, tmp_path / "out") == 2
    assert "has no tokenizer; save one beside the model" in capsys.readouterr().err
    small_vocab = tmp_path / "small-vocab"
    tiny_model("lmm", vocab_size=200).save_pretrained(small_vocab)
    TitansByteTokenizer().save_pretrained(small_vocab)
    assert export(small_vocab, tmp_path / "out") == 2
    assert "has 259 tokens, more than the model's vocab_size=200" in capsys.readouterr().err


def test_dry_run_lists_exactly_the_files_in_the_folder(hub_root, tmp_path, capsys):
    folder = tmp_path / "repo"
    shutil.copytree(exported(hub_root, SHARDED_VARIANT), folder)
    (folder / "examples").mkdir()
    (folder / "examples" / "prompt.txt").write_text("The passkey is")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # upload_folder never sends .git/
    before = folder_digest(folder)

    assert main(["push", str(folder), "--repo-id", "someone/tiny", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {path: int(size.replace(",", "")) for size, path in (line.split() for line in lines[1:])}
    on_disk = {path: os.path.getsize(folder / path) for path in before if not path.startswith(".git")}
    assert listed == on_disk
    assert f"would upload {len(on_disk)} files, {sum(on_disk.values()):,} bytes" in lines[0]
    assert folder_digest(folder) == before


def test_push_refuses_pickle_files_broken_weights_and_folders_not_exported(hub_root, tmp_path, capsys):
    folder = tmp_path / "repo"
    shutil.copytree(exported(hub_root, "lmm"), folder)
    torch.save({"lr": 1e-3}, folder / "training_args.bin")
    assert main(["push", str(folder), "--repo-id", "someone/tiny", "--dry-run"]) == 2
    assert "holds pickle files (training_args.bin)" in capsys.readouterr().err
    assert main(["push", str(hub_root / "ckpt-lmm"), "--repo-id", "someone/tiny", "--dry-run"]) == 2
    assert "not an exported folder (run `titans export`)" in capsys.readouterr().err
    assert main(["push", str(folder), "--repo-id", "not a repo id!", "--dry-run"]) == 2
    assert "is not a valid repository id" in capsys.readouterr().err
    os.remove(folder / "training_args.bin")
    _truncate(folder / "model.safetensors")
    assert main(["push", str(folder), "--repo-id", "someone/tiny", "--dry-run"]) == 2
    assert "model.safetensors is not a valid safetensors file (truncated or corrupted?)" in capsys.readouterr().err


def test_push_offline_fails_clearly(hub_root, capsys):
    """conftest sets HF_HUB_OFFLINE=1; huggingface_hub then refuses every request."""
    folder = exported(hub_root, "lmm")
    before = folder_digest(folder)
    assert main(["push", str(folder), "--repo-id", "someone/tiny"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("titans push: error: could not push") and "OfflineModeIsEnabled" in error
    assert folder_digest(folder) == before


def test_push_network_failure_is_clear_and_leaves_the_folder_intact(hub_root):
    folder = exported(hub_root, "lmm")
    before = folder_digest(folder)
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_a_real_token")  # nothing listens on port 9
    command = "import sys; from modeling_titans.cli import main; sys.exit(main())"
    completed = subprocess.run(
        [sys.executable, "-c", command, "push", str(folder), "--repo-id", "someone/tiny", "--private", "--revision=v1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("titans push: error:")]
    assert len(error_lines) == 1 and "could not push" in error_lines[0] and "ConnectError" in error_lines[0]
    assert folder_digest(folder) == before
