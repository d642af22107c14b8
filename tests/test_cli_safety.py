"""The command line never loses a run or a model, reports damaged inputs in one line, and offers what a
Transformers user expects: fine-tuning from a saved model, every `TrainingArguments` flag, bits per byte on a
text, a device choice."""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_cli import assert_one_line_error, train
from modeling_titans.checkpoints import load_model_and_tokenizer
from modeling_titans.cli import main
from modeling_titans.evaluation import text_bits_per_byte


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train(output_dir, "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2") == 0
    return output_dir


def snapshot(folder) -> dict:
    return {
        os.path.relpath(os.path.join(root, name), folder): os.path.getmtime(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(finished_run, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    assert train(run, "--max-steps", "2") == 2
    assert_one_line_error(capsys, "train", "already holds a training run", "--resume", "--overwrite-output-dir")
    assert snapshot(run) == before


def test_overwrite_output_dir_replaces_the_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert train(run, "--max-steps", "2", "--save-steps", "2", "--overwrite-output-dir") == 0
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["training"]["steps"] == 2
    assert sorted(name for name in os.listdir(run) if name.startswith("checkpoint-")) == ["checkpoint-2"]


def test_resume_and_overwrite_together_are_refused(finished_run, capsys):
    assert train(finished_run, "--max-steps", "4", "--resume", "--overwrite-output-dir") == 2
    assert_one_line_error(capsys, "train", "give one")


@pytest.mark.parametrize("damage", ["no-state", "partial-state", "truncated-weights"])
def test_resume_skips_a_checkpoint_that_was_not_written_completely(finished_run, tmp_path, capsys, damage):
    """A run killed while checkpoint-4 was being written resumes from checkpoint-2 and says why."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    partial = run / "checkpoint-4"
    if damage == "no-state":
        (partial / "trainer_state.json").unlink()
    elif damage == "partial-state":
        text = (partial / "trainer_state.json").read_text()
        (partial / "trainer_state.json").write_text(text[: len(text) // 2])
    else:
        weights = (partial / "model.safetensors").read_bytes()
        (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert train(run, "--max-steps", "6", "--save-steps", "2", "--eval-steps", "2", "--resume") == 0
    out = capsys.readouterr().out
    assert "Skipping checkpoint-4:" in out and "Resuming from" in out and "checkpoint-2" in out
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["training"]["resumed_from"] == "checkpoint-2" and summary["training"]["steps"] == 6


def test_tokenizer_command_refuses_a_model_folder_and_an_existing_tokenizer(finished_run, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog 0123456789\n" * 50)
    model = tmp_path / "model"
    shutil.copytree(finished_run, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    tokenizer_before = (model / "tokenizer_config.json").read_text()
    assert main(["tokenizer", "--files", str(corpus), "--vocab-size", "300", "--output-dir", str(model)]) == 2
    assert_one_line_error(capsys, "tokenizer", "holds a model")
    assert (model / "tokenizer_config.json").read_text() == tokenizer_before
    assert not (model / "tokenizer.json").exists()

    folder = tmp_path / "bpe"
    assert main(["tokenizer", "--files", str(corpus), "--vocab-size", "300", "--output-dir", str(folder)]) == 0
    assert main(["tokenizer", "--files", str(corpus), "--vocab-size", "290", "--output-dir", str(folder)]) == 2
    assert_one_line_error(capsys, "tokenizer", "already holds a tokenizer", "--overwrite")
    assert main(["tokenizer", "--files", str(corpus), "--vocab-size", "290", "--output-dir", str(folder), "--overwrite"]) == 0


def damaged_copy(source, target, damage: str):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = target / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "wrong-shapes":
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    elif damage == "nan":
        tensors = load_file(weights)
        name = next(name for name in tensors if "mlp.down_proj" in name)
        tensors[name][0, 0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("truncated", "not a valid safetensors file"),
        ("empty", "not a valid safetensors file"),
        ("wrong-shapes", "do not match its config.json"),
        ("nan", "are not finite"),
    ],
)
def test_generate_and_eval_report_damaged_checkpoints_in_one_line(finished_run, tmp_path, capsys, damage, fragment):
    folder = tmp_path / damage
    damaged_copy(finished_run, folder, damage)
    assert main(["generate", str(folder), "--prompt", "hi"]) == 2
    assert_one_line_error(capsys, "generate", fragment)
    assert main(["eval", str(folder), "--num-examples", "1"]) == 2
    assert_one_line_error(capsys, "eval", fragment)
    assert main(["export", str(folder), str(tmp_path / "export")]) == 2
    assert_one_line_error(capsys, "export", fragment if damage != "nan" else "are not finite")


def test_fine_tune_from_a_saved_model(finished_run, tmp_path):
    """--model-name-or-path starts from the saved weights (the first loss is the saved model's) and keeps its
    config and tokenizer."""
    output_dir = tmp_path / "tuned"
    flags = ["--per-device-train-batch-size", "2", "--seq-len", "200", "--eval-examples", "2", "--eval-on-start"]
    assert main(["train", "--model-name-or-path", str(finished_run), "--max-steps", "2", "--eval-steps", "2",
                 "--output-dir", str(output_dir), *flags]) == 0  # fmt: skip
    summary = json.loads((output_dir / "training_summary.json").read_text())
    before = json.loads((finished_run / "training_summary.json").read_text())
    assert summary["model"]["initialised_from"] == str(finished_run)
    assert summary["loss_curve"]["eval"][0][1] == pytest.approx(before["metrics"]["final_eval_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--model-name-or-path", "x", "--preset", "tiny"], "not --preset and --model-name-or-path"),
        (["--model-name-or-path", "x", "--variant", "mac"], "brings its own variant"),
        (["--seq-len", "200,300", "--train-file", "a.txt"], "curriculum) is for the built-in tasks only"),
    ],
)
def test_fine_tune_flags_reject_conflicts(tmp_path, capsys, flags, fragment):
    assert main(["train", "--output-dir", str(tmp_path / "out"), *flags]) == 2
    assert_one_line_error(capsys, "train", fragment)


def test_every_training_argument_is_a_flag_with_its_default_shown(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--gradient-accumulation-steps", "--bf16", "--activation-checkpointing", "--model-name-or-path",
                 "--overwrite-output-dir", "--lr-scheduler-type"):
        assert flag in help_text, flag
    assert "(default: 1000)" in help_text  # --max-steps, this command's default


def test_gradient_accumulation_counts_examples_per_optimizer_step(tmp_path):
    output_dir = tmp_path / "accumulated"
    assert train(output_dir, "--max-steps", "2", "--gradient-accumulation-steps", "2") == 0
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["training"]["gradient_accumulation_steps"] == 2
    assert summary["training"]["examples_per_step"] == 4 and summary["data"]["train_examples"] == 8


@pytest.mark.parametrize(
    "content, suffix, fragment",
    [
        (b"good line\n\xff\xfe binary\n", ".txt", "line 2 is not UTF-8 text"),
        (b'{"text": "a"}\n{"text": "b"\n', ".jsonl", "line 2 is not valid JSON"),
        (b'{"text": "a"}\n["b"]\n', ".jsonl", "line 2 is not a JSON object"),
    ],
)
def test_bad_training_files_name_the_file_and_line(tmp_path, capsys, content, suffix, fragment):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    assert train(tmp_path / "out", "--train-file", str(path)) == 2
    assert_one_line_error(capsys, "train", str(path), fragment)


def test_eval_scores_bits_per_byte_of_a_text(finished_run, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("A neural memory learns while it reads. " * 30)
    report = tmp_path / "bpb.json"
    assert main(["eval", str(finished_run), "--text-file", str(text), "--lengths", "64,128", "--json", str(report),
                 "--device", "cpu"]) == 0  # fmt: skip
    results = json.loads(report.read_text())["results"]
    assert [cell["seq_len"] for cell in results] == [64, 128]
    printed = capsys.readouterr()
    assert "bits/byte" in printed.out and "scoring" in printed.err  # the table, and a progress bar
    # The number itself: the byte tokenizer predicts one byte per token, so bits per byte is the mean loss in bits.
    model, tokenizer = load_model_and_tokenizer(str(finished_run), device="cpu")
    ids = torch.tensor([[1] + [b + 3 for b in text.read_bytes()] + [2]])[:, :64]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    first = text_bits_per_byte(model, tokenizer, [text.read_text()], 64, max_sequences=1)
    assert first["bits_per_byte"] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert results[0]["bits_per_byte"] > 0


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lengths", "100000000"], "use 169 to 1,048,576 tokens"),
        (["--text-file", "held_out.txt", "--lengths", "100000000"], "use 2 to 1,048,576 tokens"),
        (["--device", "nowhere"], "cannot use device 'nowhere'"),
    ],
)
def test_eval_refuses_absurd_lengths_and_devices_up_front(finished_run, tmp_path, capsys, flags, fragment, monkeypatch):
    (tmp_path / "held_out.txt").write_text("some text " * 10)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(finished_run), *flags]) == 2
    assert_one_line_error(capsys, "eval", fragment)


def test_generate_runs_on_the_device_asked_for(finished_run, capsys):
    assert main(["generate", str(finished_run), "--prompt", "The code", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert main(["generate", str(finished_run), "--prompt", "x", "--device", "nowhere"]) == 2
    assert_one_line_error(capsys, "generate", "cannot use device 'nowhere'")


def test_loaded_model_lands_on_the_device(finished_run):
    model, _ = load_model_and_tokenizer(str(finished_run), device="cpu")
    assert next(model.parameters()).device.type == "cpu" and not model.training
