"""Every benchmark script runs in its seconds-long `--smoke` mode and writes its JSON and PNG.

These check that the scripts work (tables, results, plots), never the speed: no timing is asserted.
"""

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS_DIR)

from flops import memory_op_flops  # noqa: E402 (after the sys.path entry)


def run_smoke(name, extra_args, out_dir, results_name=None):
    """Runs `benchmarks/<name>.py --smoke` and checks what every script must write (`results_name`.json and a
    plot, by default named after the script); returns its JSON."""
    results_name = results_name or name
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    command = [sys.executable, os.path.join(BENCHMARKS_DIR, f"{name}.py"), "--smoke", "--out", str(out_dir), *extra_args]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with open(out_dir / f"{results_name}.json") as f:
        results = json.load(f)
    assert results["benchmark"] == results_name and results["smoke"] is True
    assert results["machine"]["torch_threads"] == 1 and results["machine"]["cpu_count"] >= 1
    assert results["versions"]["torch"] and results["versions"]["transformers"]
    assert results["rows"], "no measurements"
    assert any(f.startswith(results_name) and f.endswith(".png") for f in os.listdir(out_dir))
    assert "wrote" in result.stdout  # the table and the paths are printed
    return results


def test_profile_step_smoke(tmp_path):
    results = run_smoke("profile_step", ["--variants", "mag"], tmp_path)
    assert {r["phase"] for r in results["rows"]} == {"mag_train", "mag_decode"}
    assert all(r["aten_calls"] > 0 for r in results["rows"])
    assert any("memory" in row["function"] for row in results["phases"]["mag_train"]["python"])


def test_memory_op_smoke(tmp_path):
    results = run_smoke("memory_op", ["--scan-modes", "eager", "compiled"], tmp_path)
    assert {r["impl"] for r in results["rows"]} >= {"module (ours)", "module (ours), compiled steps"}
    for impl in ("op, checkpointed (ours)", "op, checkpointed (ours), compiled steps", "op, autograd (before)"):
        op_rows = [r for r in results["rows"] if r["impl"] == impl]
        assert [r["tokens"] for r in op_rows] == results["config"]["lengths"]
        assert all(r["op GFLOP/s"] > 0 and r["% of op-shape peak"] > 0 for r in op_rows)
    assert all(value > 0 for value in results["peaks_gflops"].values())


def test_long_context_recall_trains_saves_and_scores_each_model(tmp_path):
    results = run_smoke("long_context_recall", ["--tasks", "passkey", "--models", "mag", "swa", "llama"], tmp_path)
    assert {r["model"] for r in results["rows"]} == {"mag", "swa", "llama"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["rows"])
    assert len({r["needle_distance"] for r in results["rows"]}) == 2  # two depths per length
    # Same budget for every model, recorded with the results; each model was saved and reloaded for scoring.
    budgets = [results["training"][f"{name} on passkey"]["budget"] for name in ("mag", "swa", "llama")]
    assert budgets[0] == budgets[1] == budgets[2]
    assert sorted(os.listdir(tmp_path / "models" / "passkey")) == ["llama", "mag", "swa"]
    assert [row["model"] for row in results["summary"]] == ["mag", "swa", "llama"]


def test_long_context_recall_task_mix_trains_one_model_for_all_tasks(tmp_path):
    arguments = ["--mix", "--tasks", "passkey", "recall", "--models", "lmm"]
    results = run_smoke("long_context_recall", arguments, tmp_path)
    assert os.listdir(tmp_path / "models") == ["mix"]
    assert results["training"]["lmm on passkey+recall"]["tasks"] == ["passkey", "recall"]
    assert {(r["model"], r["task"]) for r in results["rows"]} == {("lmm", "passkey"), ("lmm", "recall")}


def test_passkey_curriculum_trains_each_phase_and_scores_each_setting(tmp_path):
    results = run_smoke("passkey_curriculum", ["--forget-scales", "1", "0.5"], tmp_path)
    phases = [(p["length"], p["steps"], p["batch_size"], p["seed"]) for p in results["phases"]]
    assert phases == [(176, 2, 1, 0), (176, 1, 2, 3)]
    # The demo's model, then one saved model per phase, each continuing the one before.
    assert sorted(os.listdir(tmp_path / "models")) == ["demo", "phase1-176", "phase2-176"]
    settings = [(r["forget_scale"], r["memory_writes"]) for r in results["rows"]]
    assert list(dict.fromkeys(settings)) == [(1.0, True), (0.5, True), (1.0, False)]  # the control last
    distances = [r["needle_distance"] for r in results["rows"] if r["forget_scale"] == 0.5]
    assert len(distances) == 3 and distances == sorted(distances)
    assert all(r["total"] == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in results["rows"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--phases", "4096:300:2"], "expected LENGTH:STEPS:BATCH:LEARNING_RATE[:SEED]"),
        (["--phases", "4096:3:x:1e-3"], "LENGTH, STEPS, BATCH and SEED are integers"),
        (["--phases", "4096:0:2:1e-3"], "must be at least 1, the learning rate positive"),
        (["--phases", "100:3:2:1e-3"], "phase length 100: a passkey training sequence needs at least 169 tokens"),
        (["--eval-lengths", "100"], "Length 100 does not fit the passkey task"),
        (["--start", "no/such/model"], "--start no/such/model: no such folder"),
        (["--forget-scales", "-1"], "each must be a finite number >= 0"),
    ],
)
def test_passkey_curriculum_rejects_bad_settings_before_training(tmp_path, flags, message):
    command = [sys.executable, os.path.join(BENCHMARKS_DIR, "passkey_curriculum.py"), "--out", str(tmp_path),
               "--train-dir", str(tmp_path / "models"), *flags]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and message in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line
    assert not os.path.exists(tmp_path / "models")


def test_passkey_curriculum_keeps_an_existing_train_dir(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.txt").write_text("a user's file")
    command = [sys.executable, os.path.join(BENCHMARKS_DIR, "passkey_curriculum.py"), "--smoke", "--out", str(tmp_path)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "is not empty" in result.stderr
    assert os.listdir(tmp_path / "models") == ["mine.txt"]


def test_speed_rows_cover_models_and_lengths(tmp_path):
    results = run_smoke("speed", ["--models", "lmm", "llama"], tmp_path)
    train = {(r["model"], r["tokens"]) for r in results["rows"]}
    decode = {(r["model"], r["context"]) for r in results["decode"]}
    assert train == {(m, n) for m in ("lmm", "llama") for n in results["config"]["train_lengths"]}
    assert decode == {(m, n) for m in ("lmm", "llama") for n in results["config"]["decode_contexts"]}
    assert all(r["tok/s"] > 0 and r["peak_MiB"] >= 0 and r["GFLOP/s (cpu time)"] > 0 for r in results["rows"])
    tokens_per_step = results["config"]["tokens_per_step"]
    assert all(r["batch"] == max(1, tokens_per_step // r["tokens"]) for r in results["rows"])
    # Llama's KV cache grows with the context; Titans' cache does not (bounded window + memory weights).
    llama = sorted((r["context"], r["cache_MiB"]) for r in results["decode"] if r["model"] == "llama")
    assert llama[-1][1] > llama[0][1]
    titans = {r["cache_MiB"] for r in results["decode"] if r["model"] == "lmm"}
    assert len(titans) == 1


def test_speed_trains_each_chunk_size_without_decoding(tmp_path):
    """The chunk-size sweep is a training-only run (`--decode-contexts` with no value); its plot must still work."""
    args = ["--models", "lmm", "llama", "--chunk-sizes", "2", "8", "--decode-contexts", "--train-steps", "2"]
    results = run_smoke("speed", args, tmp_path)
    assert results["config"]["train_steps"] == 2
    lengths = results["config"]["train_lengths"]
    train = {(r["model"], r.get("chunk"), r["tokens"]) for r in results["rows"]}
    assert train == {("lmm", c, n) for c in (2, 8) for n in lengths} | {("llama", None, n) for n in lengths}
    assert results["decode"] == []


def test_stability_reports_finite_bounded_state(tmp_path):
    results = run_smoke("stability", [], tmp_path)
    assert results["summary"]["all_finite"] is True
    assert [r["tokens"] for r in results["rows"]] == [100, 200, 300]
    assert all(0 < r["max |M|"] < 1e3 for r in results["rows"])


def test_stability_streams_task_examples_through_one_cache(tmp_path):
    """`--task`: each example's answer loss in the stream and alone; the first one sees a fresh cache either way."""
    results = run_smoke("stability", ["--task", "passkey"], tmp_path, results_name="stability_stream")
    rows = results["rows"]
    assert [r["example"] for r in rows] == [1, 2, 3] and [r["tokens"] for r in rows] == [192, 384, 576]
    assert rows[0]["loss in stream"] == pytest.approx(rows[0]["loss alone"], rel=1e-5)
    assert results["summary"]["all_finite"] is True and results["config"]["task"] == "passkey"


@pytest.mark.parametrize("variant", ["mag", "lmm"])
def test_stability_stream_with_bounded_weights(tmp_path, variant):
    """`--max-norm R`: the memory's weights after every example (each ends where a chunk closes) lie in the ball."""
    flags = ["--task", "passkey", "--variants", variant, "--max-norm", "0.5"]
    results = run_smoke("stability", flags, tmp_path, results_name="stability_stream")
    assert results["config"]["max_norm"] == 0.5
    assert all(0.4 < row["max |M|"] <= 0.5 * (1 + 1e-5) for row in results["rows"])


def test_memory_op_flops_counts_one_chunk_by_hand():
    # One head, depth 1 (d -> d), one chunk of c tokens: gradient forward 2cd^2, reads 2*2cd^2 + 2c^2*2d,
    # state 2*2cd^2, gate products 2c^3 + 2c^2.
    c, d = 4, 8
    expected = 2 * c * d * d + 4 * c * d * d + 4 * c * c * d + 4 * c * d * d + 2 * c**3 + 2 * c**2
    assert memory_op_flops(c, c, [d, d], heads=1) == expected
    # Lengths round up to whole chunks; heads and batch multiply.
    assert memory_op_flops(c + 1, c, [d, d], heads=3, batch=2) == 2 * expected * 3 * 2


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("llama", {}),
        *((variant, {}) for variant in ("mac", "mag", "mal", "lmm")),
        ("mag", {"use_momentum": False, "memory_depth": 1}),
        ("mal", {"memory_per_layer_gates": True, "memory_depth": 3, "use_forgetting": False}),
        ("lmm", {"memory_gates_from_input": False}),
        ("mag", {"memory_depth": 1, "memory_forget_per_channel": True}),
        ("mal", {"memory_depth": 1, "memory_forget_per_channel": True, "use_momentum": False}),
        ("mag", {"mixer_types": ["swa", "mag"], "num_persistent_tokens": 0}),
    ],
)
def test_forward_flops_equal_the_matmuls_a_forward_pass_runs(name, overrides):
    """The analytic count (attention's scores aside) equals what torch's FLOP counter sees in a forward pass."""
    import torch
    from flops import forward_flops_per_token
    from harness import build_model
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(name, smoke=True, device="cpu", **overrides).eval()
    length = 32  # whole memory chunks and segments
    counter = FlopCounterMode(display=False)
    with counter:  # (grad mode on: torch's module tracker fails on a gate that returns a parameter's view)
        model(input_ids=torch.randint(3, model.config.vocab_size, (1, length)))
    counted = sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))
    expected = forward_flops_per_token(model.config, length)
    assert counted == length * (expected["dense"] + expected["memory"])
    assert expected["attention"] > 0 if name != "lmm" else expected["attention"] == 0


def test_activation_checkpointing_smoke(tmp_path):
    results = run_smoke("activation_checkpointing", ["--variants", "mag"], tmp_path)
    assert {(r["tokens"], r["checkpointing"]) for r in results["rows"]} == {
        (n, c) for n in results["config"]["lengths"] for c in (False, True)
    }
    assert all(r["peak MiB"] >= 0 and r["step s (cpu)"] > 0 for r in results["rows"])


def test_titans_pytorch_model_has_matching_sizes():
    pytest.importorskip("titans_pytorch")  # optional benchmark extra: pip install -e ".[bench]"
    import torch
    from harness import BACKBONE, build_model, count_parameters, training_loss

    theirs = build_model("titans-pytorch", smoke=True, device="cpu")
    loss = training_loss(theirs, "titans-pytorch", torch.randint(0, 259, (1, 20)))
    loss.backward()
    assert loss.item() > 0
    # At the benchmark size it is within 5% of our MAC's parameter count (same width, depth, memory, segment).
    ours, theirs = (count_parameters(build_model(name, False, "cpu")) for name in ("mac", "titans-pytorch"))
    assert abs(theirs - ours) / ours < 0.05 and BACKBONE["hidden_size"] == 256


def test_upcycling_smoke_is_exact_and_bounded(tmp_path):
    results = run_smoke("upcycling", [], tmp_path)
    assert all(value < 1e-5 for value in results["exactness"].values())
    assert {r["model"] for r in results["rows"]} == {"source", "mag"}
    titans = {r["cache_MiB"] for r in results["rows"] if r["model"] == "mag"}
    assert len(titans) == 1  # the converted model's cache does not grow with the context
    source, converted = (row["loss"] for row in results["heldout"])
    assert converted > 0 and source > 0


def write_documents(folder, count=12):
    """A tiny stand-in for the State of the Union folder: `count` numbered English documents, one per file."""
    folder.mkdir()
    for i in range(count):
        text = f"Address number {i}. The members met, read the report and voted on the roads and the harbours. " * 12
        (folder / f"{1790 + i}_address.txt").write_text(text)
    return folder


def test_real_text_trains_and_scores_each_model_at_each_length(tmp_path):
    data = write_documents(tmp_path / "data")
    models = ["mag", "swa", "llama", "mag:writes=off", "mag:memory_depth=1"]
    results = run_smoke("real_text", ["--data-dir", str(data), "--models", *models], tmp_path / "out")
    config = results["config"]
    assert config["data"].startswith("12 files") and config["held_out_bytes"] > 0
    assert [row["model"] for row in results["rows"]] == models
    for row in results["rows"]:
        assert row["params"] > 0 and "diverged_at" not in row
        lengths = [row[f"{m}x"] for m in config["eval_multiples"]]
        evals = [row[f"@{step}"] for step in range(config["eval_every"], config["steps"] + 1, config["eval_every"])]
        assert all(0 < value < 10 for value in lengths + evals)
        assert row["1x"] == row[f"@{config['steps']}"]
        log = results["logs"][row["model"]]
        assert [entry["step"] for entry in log] == list(range(1, config["steps"] + 1))
        assert all(entry["grad_norm"]["total"] > 0 for entry in log)
    # Same seed, same batches: a model with its memory's writes off starts from the same loss as with them on.
    first = {name: results["logs"][name][0]["bpb"] for name in models}
    assert abs(first["mag"] - first["mag:writes=off"]) < 0.1
    assert results["logs"]["mag"][0]["grad_norm"]["M0"] > 0


def test_real_text_smoke_runs_without_data_and_runs_combine(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    for model in ("lmm", "swa"):
        results = run_smoke("real_text", ["--data-dir", missing, "--models", model], tmp_path / model)
        assert results["config"]["data"] == "built-in text (smoke)"
    paths = [str(tmp_path / model / "real_text.json") for model in ("lmm", "swa")]
    combined = run_smoke("real_text", ["--combine", *paths], tmp_path / "both")
    assert [row["model"] for row in combined["rows"]] == ["lmm", "swa"]
    assert set(combined["logs"]) == {"lmm", "swa"}
    assert [run["models"] for run in combined["runs"]] == [["lmm"], ["swa"]]


def test_real_text_held_out_windows_score_the_same_bytes_at_every_length():
    import torch
    from real_text import held_out_spans, parse_spec, windows_of

    spans = held_out_spans(torch.arange(1000), count=3, span=64)
    assert spans.shape == (3, 65)
    for length in (4, 16, 64):
        windows = windows_of(spans, length)
        assert windows.shape == (3 * 64 // length, length + 1)
        assert torch.equal(windows[:, 1:].reshape(3, 64), spans[:, 1:])  # each scored byte once, in order
    assert parse_spec("mag:memory_depth=3,memory_lr_max=0.1,writes=off") == (
        "mag", {"memory_depth": 3, "memory_lr_max": 0.1}, {"writes": "off"}
    )


def test_flops_prints_a_row_per_model_and_length():
    from modeling_titans.configuration.configuration_titans import VARIANTS

    command = [sys.executable, os.path.join(BENCHMARKS_DIR, "flops.py"), "--tokens", "1024", "8192"]
    result = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [(row[0], row[1]) for row in rows] == [(m, n) for n in ("1024", "8192") for m in ("llama", *VARIANTS)]
    total = {(row[0], row[1]): float(row[5]) for row in rows}
    # Causal attention grows with the length; a window does not.
    assert total["llama", "8192"] > 1.5 * total["llama", "1024"]
    assert total["mag", "8192"] < 1.1 * total["mag", "1024"]
