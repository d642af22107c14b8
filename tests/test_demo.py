"""`titans demo` end to end with tiny settings: the plumbing and the output, not the accuracy."""

import json
import math
import os

import pytest

from modeling_titans.cli import main
from modeling_titans.demo import RESULTS_NAME
from modeling_titans.evaluation import digits_right, sequence_length_for
from modeling_titans.training import phase_steps
from modeling_titans.tasks import generate_examples


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    return output_dir, main(["demo", "--quick", "--output-dir", str(output_dir)])


def test_quick_demo_writes_results_and_a_loadable_model(quick_run, capsys):
    output_dir, exit_code = quick_run
    assert exit_code == 0
    with open(output_dir / RESULTS_NAME) as f:
        results = json.load(f)

    window = results["model"]["attention_window"]
    recall = results["recall"]
    assert recall["distances"] == [8 * window, 32 * window, 64 * window]
    assert list(recall["rows"]) == [
        "Titans (memory on)",
        "same model, memory writes off",
    ]
    for cells in recall["rows"].values():
        assert [cell["needle_distance"] for cell in cells] == recall["distances"]
        for cell in cells:
            assert cell["total"] == recall["examples_per_distance"]
            assert cell["accuracy"] == cell["correct"] / cell["total"]
            assert 0 <= cell["digit_accuracy"] <= 1
            assert cell["digit_accuracy"] >= cell["accuracy"]  # an exact match has every digit right

    training = results["training"]
    assert [step for step, _ in training["validation_loss"]] == [
        0,
        2,
        4,
    ]  # --quick: 4 steps, eval every 2
    assert [step for step, _ in training["train_loss"]] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for _, loss in training["train_loss"] + training["validation_loss"])

    generation = results["generation"]
    assert generation["needle_distance"] == 64 * window
    assert generation["needle"].startswith("The secret code for ")
    assert generation["expected"] in generation["needle"]
    assert generation["correct"] == generation["generated"].lstrip().startswith(generation["expected"])

    model_dir = results["model"]["model_dir"]
    assert os.path.isfile(os.path.join(model_dir, "config.json"))
    assert os.path.isfile(os.path.join(model_dir, "model.safetensors"))


def test_quick_demo_records_its_training_for_titans_eval(quick_run, tmp_path):
    """The saved model carries the `training_summary.json` of `titans train`: `titans eval` takes the task and the
    training length from it, so `--forget-scale length` needs no `--trained-length`."""
    output_dir, _ = quick_run
    model_dir = output_dir / "model"
    summary = json.loads((model_dir / "training_summary.json").read_text())
    assert summary["data"]["task"] == "passkey"
    assert summary["training"]["seq_len"] == [176]
    report_path = tmp_path / "report.json"
    flags = ["--lengths", "176,352", "--distances", "55", "--num-examples", "1", "--json", str(report_path)]
    assert main(["eval", str(model_dir), "--forget-scale", "length", *flags]) == 0
    report = json.loads(report_path.read_text())
    assert report["task"] == "passkey"
    assert report["memory_forget_scale_per_length"] == {"176": 1.0, "352": 0.5}


def test_quick_demo_prints_the_summary_table(quick_run, capsys):
    # The module fixture ran before capsys of this test: rerun into a fresh directory to see the output.
    output_dir, _ = quick_run
    assert main(["demo", "--quick", "--output-dir", str(output_dir / "again")]) == 0
    printed = capsys.readouterr().out
    assert "Titans (memory on)" in printed
    assert "same model, memory writes off" in printed
    assert "Validation loss:" in printed
    assert "pipeline('text-generation')" in printed


def test_sequence_length_places_the_needle_exactly_as_far_as_asked():
    for distance in (64, 256, 512):
        length = sequence_length_for("passkey", distance)
        example = generate_examples("passkey", "test", 1, length - 2, needle_distance=distance)[0]
        assert example.length == length - 2
        # The needle ends with the code and a period; that period sits `distance` positions before the prompt's
        # last character (counted here from the text itself).
        period = example.prompt.index(example.answer) + len(example.answer)
        assert example.prompt[period] == "."
        assert len(example.prompt) - 1 - period == distance


def test_digits_right_counts_digits_in_place():
    assert digits_right("48213", " 48213") == 1.0
    assert digits_right("48213", "48913") == 0.8
    assert digits_right("48213", "8213") == 0.0  # shifted by one: no digit in its place
    assert digits_right("48213", "48") == 0.4


def test_phase_steps_cover_all_steps():
    assert phase_steps(600, 2) == [300, 300]
    assert phase_steps(7, 3) == [3, 2, 2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps 0"),
        (["--seq-lens", "100"], "--seq-lens"),
        (["--seq-lens", "abc"], "--seq-lens"),
        (["--preset", "nonexistent"], "Unknown Titans preset"),
        (["--learning-rate", "-1"], "--learning-rate"),
        (["--memory-depth", "0"], "--memory-depth 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(flags, message, capsys, tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_demo_config_gives_mac_the_larger_inner_rate_of_the_demo_preset_only():
    from modeling_titans.configuration import TitansConfig
    from modeling_titans.demo import demo_config

    preset = TitansConfig.from_preset("demo")
    assert demo_config().to_dict() == preset.to_dict()
    assert demo_config(variant="mag").memory_lr_max == preset.memory_lr_max
    mac = demo_config(variant="mac")
    assert (mac.variant, mac.memory_lr_max) == ("mac", 2.0) and preset.memory_lr_max < 2.0
    assert demo_config("tiny", "mac").memory_lr_max == TitansConfig.from_preset("tiny").memory_lr_max
    with pytest.raises(ValueError, match="variant"):
        demo_config(variant="xyz")


def test_demo_config_gives_a_deep_memory_its_larger_inner_rate_in_the_demo_preset_only():
    from modeling_titans.configuration import TitansConfig
    from modeling_titans.demo import DEMO_DEEP_MEMORY_FIELDS, demo_config

    preset = TitansConfig.from_preset("demo")
    assert demo_config(memory_depth=1).to_dict() == preset.to_dict()
    deep = demo_config(memory_depth=2)
    assert (deep.memory_depth, deep.memory_lr_max) == (2, DEMO_DEEP_MEMORY_FIELDS["memory_lr_max"])
    assert preset.memory_lr_max < deep.memory_lr_max
    assert demo_config(variant="mac", memory_depth=3).memory_lr_max == DEMO_DEEP_MEMORY_FIELDS["memory_lr_max"]
    tiny = demo_config("tiny", memory_depth=2)
    assert (tiny.memory_depth, tiny.memory_lr_max) == (2, TitansConfig.from_preset("tiny").memory_lr_max)


def test_quick_demo_with_a_deep_memory_saves_and_reports_it(tmp_path):
    assert main(["demo", "--quick", "--memory-depth", "3", "--output-dir", str(tmp_path)]) == 0
    with open(tmp_path / RESULTS_NAME) as f:
        results = json.load(f)
    assert results["model"]["memory_depth"] == 3
    with open(os.path.join(results["model"]["model_dir"], "config.json")) as f:
        assert json.load(f)["memory_depth"] == 3
