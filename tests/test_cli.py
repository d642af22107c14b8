"""`titans train / generate / eval` end to end on the tiny preset, `--resume`, and every bad input giving one clear
line and exit code 2."""

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_titans.cli import main
from modeling_titans.evaluation import task_accuracy
from modeling_titans.ops import chunk_scan
from modeling_titans.tasks import answer_is_correct, generate_examples

TRAIN = ["train", "--preset", "tiny", "--per-device-train-batch-size", "2", "--seq-len", "200", "--eval-examples", "2"]


def train(output_dir, *flags) -> int:
    return main([*TRAIN, "--output-dir", str(output_dir), *flags])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model after 3 passkey steps, as `titans train` leaves it."""
    output_dir = tmp_path_factory.mktemp("run")
    assert train(output_dir, "--max-steps", "3", "--eval-steps", "2") == 0
    return output_dir


def test_train_saves_a_model_the_auto_classes_load(trained):
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "training_summary.json"):
        assert (trained / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert type(model).__name__ == "TitansForCausalLM" and model.config.variant == "mag"
    assert model.config.use_cache, "saved for generation"
    assert tokenizer.decode(tokenizer("héllo")["input_ids"], skip_special_tokens=True) == "héllo"

    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["training"]["steps"] == 3 and summary["model"]["preset"] == "tiny"
    assert summary["data"]["task"] == "passkey" and summary["data"]["train_examples"] == 3 * 2
    assert [step for step, _ in summary["loss_curve"]["train"]] == [1, 2, 3]
    assert [step for step, _ in summary["loss_curve"]["eval"]] == [2, 3]  # every 2 steps, and at the end
    assert summary["metrics"]["final_eval_loss"] == summary["loss_curve"]["eval"][-1][1]


def test_generate_streams_what_greedy_generate_gives(trained, capsys):
    prompt = "The secret code for Belmira is"
    assert main(["generate", str(trained), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert printed == expected + "\n"


def test_generate_samples_reproducibly(trained, capsys, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Once upon a time")
    outputs = []
    for seed in ("1", "1", "2"):
        flags = ["--do-sample", "--temperature", "1.5", "--top-k", "0", "--seed", seed, "--max-new-tokens", "24"]
        assert main(["generate", str(trained), "--prompt-file", str(prompt_file), *flags]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


@pytest.mark.parametrize("memory", [True, False])
def test_eval_scores_greedy_answers(trained, tmp_path, capsys, memory):
    """bAbI answers (places) differ in length, so the prompts of a batch do too: the batches are left-padded."""
    report_path = tmp_path / "report.json"
    flags = ["--task", "babi", "--lengths", "240", "--distances", "45,90", "--num-examples", "3"]
    flags += ["--batch-size", "2", "--json", str(report_path)] + ([] if memory else ["--no-memory"])
    assert main(["eval", str(trained), *flags]) == 0
    table = capsys.readouterr().out
    assert "memory on" in table if memory else "memory off" in table
    report = json.loads(report_path.read_text())
    assert report["memory"] is memory
    assert [(cell["length"], cell["needle_distance"]) for cell in report["results"]] == [(240, 45), (240, 90)]
    assert [cell["needle_distance_tokens"] for cell in report["results"]] == [45, 90]  # byte tokenizer
    assert re.search(r"240 +45 +45 +\d+\.\dx", table)  # distance, the same in tokens, and over the window

    # The same answers, one prompt at a time without padding, straight from generate(); the batch may have
    # decoded a few tokens more (for its longest answer), never others.
    model = AutoModelForCausalLM.from_pretrained(trained)
    model.set_memory_writes(memory)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    for cell in report["results"]:
        examples = generate_examples("babi", "test", 3, 238, seed=0, needle_distance=cell["needle_distance"])
        assert [record["answer"] for record in cell["examples"]] == [example.answer for example in examples]
        for example, record in zip(examples, cell["examples"]):
            inputs = tokenizer(example.prompt, return_tensors="pt")
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=len(example.answer) + 1, do_sample=False)
            generated = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            assert record["generated"].startswith(generated)
            assert record["correct"] == answer_is_correct(example, generated)
        assert cell["correct"] == sum(record["correct"] for record in cell["examples"])
        assert f"{cell['correct']}/3" in table


@pytest.mark.parametrize(
    "flag, value, field, as_saved, label",
    [("--forget-scale", 0.25, "memory_forget_scale", 1.0, "forget scale 0.25"),
     ("--max-norm", 0.05, "memory_max_norm", None, "max norm 0.05")],
)
def test_eval_memory_settings_apply_to_the_run(trained, tmp_path, capsys, flag, value, field, as_saved, label):
    """`--forget-scale` and `--max-norm` set a config field of the memory for the run: the report records it, and the
    answers are those of the model loaded with the field as a config override, the transformers way."""
    report_path = tmp_path / "report.json"
    flags = ["--task", "passkey", "--lengths", "200", "--distances", "60", "--num-examples", "2"]
    assert main(["eval", str(trained), *flags, "--json", str(report_path)]) == 0
    assert json.loads(report_path.read_text())[field] == as_saved
    capsys.readouterr()
    assert main(["eval", str(trained), *flags, flag, str(value), "--json", str(report_path)]) == 0
    assert f"memory on, {label}," in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report[field] == value
    model = AutoModelForCausalLM.from_pretrained(trained, **{field: value})
    expected = task_accuracy(model, AutoTokenizer.from_pretrained(trained), "passkey", 200, 60, 2)
    assert [r["generated"] for r in report["results"][0]["examples"]] == [r["generated"] for r in expected["examples"]]


def test_eval_forget_scale_length_scales_each_length_by_the_training_length(trained, tmp_path, capsys):
    """`--forget-scale length` reads the forgetting at T tokens with s = (training length) / T, at most 1: the
    200-token model keeps s = 1 at 200 tokens and gets 0.5 at 400, each length answering as the model loaded with
    that scale; `--trained-length` overrides the summary's length."""
    report_path = tmp_path / "report.json"
    flags = ["--task", "passkey", "--lengths", "200,400", "--distances", "60", "--num-examples", "2"]
    assert main(["eval", str(trained), *flags, "--forget-scale", "length", "--json", str(report_path)]) == 0
    assert "forget scale 1 at 200, 0.5 at 400" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["memory_forget_scale"] == "length"
    assert report["memory_forget_scale_per_length"] == {"200": 1.0, "400": 0.5}
    tokenizer = AutoTokenizer.from_pretrained(trained)
    for cell, scale in zip(report["results"], (1.0, 0.5)):
        model = AutoModelForCausalLM.from_pretrained(trained, memory_forget_scale=scale)
        expected = task_accuracy(model, tokenizer, "passkey", cell["length"], 60, 2)
        assert [r["generated"] for r in cell["examples"]] == [r["generated"] for r in expected["examples"]]

    flags += ["--forget-scale", "length", "--trained-length", "100", "--json", str(report_path)]
    assert main(["eval", str(trained), *flags]) == 0
    assert json.loads(report_path.read_text())["memory_forget_scale_per_length"] == {"200": 0.5, "400": 0.25}


def test_eval_forget_scale_length_needs_the_training_length(trained, tmp_path, capsys):
    bare = tmp_path / "bare"  # saved with save_pretrained: no training summary
    shutil.copytree(trained, bare)
    (bare / "training_summary.json").unlink()
    flags = ["--task", "passkey", "--lengths", "200", "--num-examples", "1"]
    assert main(["eval", str(bare), *flags, "--forget-scale", "length"]) == 2
    assert_one_line_error(capsys, "eval", "--forget-scale length needs the training length", "--trained-length N")
    assert main(["eval", str(bare), *flags, "--forget-scale", "length", "--trained-length", "0"]) == 2
    assert_one_line_error(capsys, "eval", "--trained-length 0: must be at least 1")
    assert main(["eval", str(trained), *flags, "--trained-length", "200"]) == 2
    assert_one_line_error(capsys, "eval", "--trained-length is for --forget-scale length")


def test_resume_continues_the_step_count_and_the_loss_curve(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    assert train(uninterrupted, "--task", "babi", "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2") == 0
    full = json.loads((uninterrupted / "training_summary.json").read_text())

    interrupted = tmp_path / "interrupted"
    shutil.copytree(uninterrupted / "checkpoint-2", interrupted / "checkpoint-2")  # as if stopped after step 2
    assert train(interrupted, "--task", "babi", "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2", "--resume") == 0
    resumed = json.loads((interrupted / "training_summary.json").read_text())
    assert resumed["training"]["resumed_from"] == "checkpoint-2" and resumed["training"]["steps"] == 4
    for curve in ("train", "eval"):
        assert [step for step, _ in resumed["loss_curve"][curve]] == [step for step, _ in full["loss_curve"][curve]]
        assert [loss for _, loss in resumed["loss_curve"][curve]] == pytest.approx(
            [loss for _, loss in full["loss_curve"][curve]], rel=1e-5
        )
    assert (interrupted / "checkpoint-4").is_dir()


def test_train_packs_task_examples_into_each_sequence(tmp_path):
    assert train(tmp_path, "--max-steps", "1", "--seq-len", "400", "--examples-per-sequence", "2") == 0
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["data"]["examples_per_sequence"] == [2] and summary["data"]["example_chars"] == [[198]]
    mixed = tmp_path / "mixed"
    assert train(mixed, "--max-steps", "1", "--seq-len", "400", "--examples-per-sequence", "1,2") == 0
    summary = json.loads((mixed / "training_summary.json").read_text())
    assert summary["data"]["examples_per_sequence"] == [1, 2] and summary["data"]["example_chars"] == [[398, 198]]


def test_train_on_text_files(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("Titans learn to memorize at test time. " * 40)
    output_dir = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--train-file", str(text), "--seq-len", "64", "--per-device-train-batch-size", "4",
                 "--max-steps", "2", "--output-dir", str(output_dir)]) == 0  # fmt: skip
    summary = json.loads((output_dir / "training_summary.json").read_text())
    sequences = (len(text.read_text()) + 2) // 64  # <s> text </s> in rows of 64
    assert summary["data"]["train_sequences"] + summary["data"]["eval_sequences"] == sequences
    assert summary["data"]["loss_on"] == "all" and summary["training"]["steps"] == 2
    assert AutoModelForCausalLM.from_pretrained(output_dir).config.vocab_size == 259


def test_train_compile_memory_scan_runs_the_compiled_steps(tmp_path, monkeypatch):
    """--compile-memory-scan switches the model's scan to `compiled_chunk_steps` (counted eager steps here; their
    compiled numbers are `tests/test_chunk_scan.py`'s)."""
    calls = []

    def counted():
        calls.append(1)
        return chunk_scan.EAGER_STEPS

    monkeypatch.setattr(chunk_scan, "compiled_chunk_steps", counted)
    assert main(["train", "--preset", "tiny", "--max-steps", "1", "--eval-examples", "1", "--compile-memory-scan",
                 "--output-dir", str(tmp_path / "run")]) == 0  # fmt: skip
    assert calls


def assert_one_line_error(capsys, command: str, *fragments: str):
    """stderr ends with one error line (progress bars of the data loading may come before it), no traceback."""
    err = capsys.readouterr().err
    last_line = re.split(r"[\r\n]", err.strip())[-1]
    assert last_line.startswith(f"titans {command}: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in last_line, last_line


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--train-file", "missing.txt"], ["No such file: missing.txt"]),
        (["--preset", "huge"], ["Unknown Titans preset 'huge'; available:", "tiny"]),
        (["--preset", "tiny", "--config", "config.json"], ["not --preset and --config"]),
        (["--task", "sudoku"], ["Unknown task 'sudoku'; available: passkey, recall, mqar, babi"]),
        (["--seq-len", "1"], ["--seq-len 1: a training sequence needs at least 2 tokens"]),
        (["--seq-len", "-5"], ["--seq-len -5"]),
        (["--seq-len", "100"], ["--seq-len 100 is too short for the passkey task: use at least 169"]),
        (["--needle-distance", "100000"], ["--needle-distance: needle_distance=100000 does not fit"]),
        (["--resume"], ["holds no complete checkpoint-N folder to resume from"]),
        (["--variant", "xyz"], ["variant='xyz' is invalid"]),
        (["--max-steps", "0"], ["--max-steps 0: must be at least 1"]),
        (["--config", "nowhere.json"], ["No such config file: nowhere.json"]),
        (["--tokenizer", "nowhere"], ["No tokenizer folder nowhere"]),
        (["--task", "recall", "--train-file", "a.txt"], ["not both"]),
        (["--seq-len", "400", "--examples-per-sequence", "3"],
         ["--examples-per-sequence 3: must be at least 1 and divide every --seq-len (400)"]),
        (["--seq-len", "300", "--examples-per-sequence", "2"],
         ["--seq-len 300 holds 2 passkey examples of 150 tokens; each needs at least 169"]),
        (["--train-file", "a.txt", "--examples-per-sequence", "2"],
         ["--examples-per-sequence is for the built-in tasks"]),
        (["--seq-len", "400", "--examples-per-sequence", "1,3"],
         ["--examples-per-sequence 3: must be at least 1 and divide every --seq-len (400)"]),
        (["--examples-per-sequence", "two"], ["--examples-per-sequence 'two': expected an integer"]),
    ],
)
def test_train_rejects_bad_input(tmp_path, capsys, flags, fragments):
    assert main(["train", "--output-dir", str(tmp_path / "out"), *flags]) == 2
    assert_one_line_error(capsys, "train", *fragments)


def test_train_rejects_empty_and_short_files(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert train(tmp_path / "out", "--train-file", str(tmp_path / "empty.txt")) == 2
    assert_one_line_error(capsys, "train", "empty.txt is empty")
    (tmp_path / "short.jsonl").write_text('{"text": "hi"}\n')
    assert train(tmp_path / "out", "--train-file", str(tmp_path / "short.jsonl")) == 2
    assert_one_line_error(capsys, "train", "holds 4 tokens, fewer than one sequence of 200")
    (tmp_path / "config.json").write_text("{not json")
    assert main(["train", "--config", str(tmp_path / "config.json"), "--output-dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys, "train", "config.json")


def test_seq_len_must_be_an_integer(tmp_path, capsys):
    assert main(["train", "--seq-len", "long", "--output-dir", str(tmp_path)]) == 2
    assert_one_line_error(capsys, "train", "--seq-len 'long': expected an integer")


def test_generate_and_eval_reject_folders_without_a_model(tmp_path, capsys, trained):
    (tmp_path / "config_only").mkdir()
    shutil.copy(trained / "config.json", tmp_path / "config_only" / "config.json")
    for command in ("generate", "eval"):
        extra = ["--prompt", "hi"] if command == "generate" else []
        assert main([command, str(tmp_path / "absent"), *extra]) == 2
        assert_one_line_error(capsys, command, "No such model folder")
        assert main([command, str(tmp_path), *extra]) == 2
        assert_one_line_error(capsys, command, "has no config.json")
        assert main([command, str(tmp_path / "config_only"), *extra]) == 2
        assert_one_line_error(capsys, command, "has no model.safetensors")


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--task", "maze"], ["Unknown task 'maze'; available: passkey, recall, mqar, babi"]),
        (["--lengths", "1k"], ["--lengths '1k': expected comma-separated integers"]),
        (["--lengths", "50"], ["Length 50 does not fit the passkey task: use 169 to"]),
        (["--lengths", "200", "--distances", "5"], ["Needle distance 5 does not fit length 200"]),
        (["--num-examples", "0"], ["--num-examples 0: must be at least 1"]),
        (["--forget-scale", "-1"], ["--forget-scale -1: must be a finite number >= 0, or `length`"]),
        (["--forget-scale", "nan"], ["--forget-scale nan: must be a finite number >= 0, or `length`"]),
        (["--max-norm", "0"], ["--max-norm 0.0: must be a finite number > 0"]),
        (["--max-norm", "inf"], ["--max-norm inf: must be a finite number > 0"]),
    ],
)
def test_eval_rejects_bad_input(trained, capsys, flags, fragments):
    assert main(["eval", str(trained), *flags]) == 2
    assert_one_line_error(capsys, "eval", *fragments)


def test_generate_rejects_bad_input(trained, tmp_path, capsys):
    assert main(["generate", str(trained), "--prompt-file", str(tmp_path / "none.txt")]) == 2
    assert_one_line_error(capsys, "generate", "No such prompt file")
    (tmp_path / "empty.txt").write_text("")
    assert main(["generate", str(trained), "--prompt-file", str(tmp_path / "empty.txt")]) == 2
    assert_one_line_error(capsys, "generate", "is empty")
    assert main(["generate", str(trained), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert_one_line_error(capsys, "generate", "--max-new-tokens 0")
