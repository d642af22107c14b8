"""Data-parallel training on 2 processes of this machine: gloo on CPU.

`tests/ddp_worker.py` trains a tiny model for a few steps under a launcher; the ranks must end with identical
parameters, equal to one process training on the combined batches (DDP averages the gradients). Each launch
starts two Python processes, about 15-20 s here.
"""

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_titans import TitansForCausalLM

pytestmark = pytest.mark.slow  # each test starts a launcher and two Python processes: ~20-40 s

WORKER = Path(__file__).parent / "ddp_worker.py"


def load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher_args: list[str], script_args: list[str], cwd: Path, timeout: float = 300) -> None:
    """Runs the launcher; if it has not finished after `timeout` seconds, its workers and then the launcher get
    SIGABRT, on which Python (PYTHONFAULTHANDLER) prints each thread's stack into the output: the test fails with
    where every process was, and leaves none behind (torchrun starts its workers in sessions of their own, so they
    are found as the launcher's descendants, not through its process group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", *launcher_args, *script_args]
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            launcher = psutil.Process(process.pid)
            workers = launcher.children(recursive=True)
            for target in [*workers, launcher]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    target.send_signal(signal.SIGABRT)
                psutil.wait_procs([target], timeout=10)
            for target in [*workers, launcher]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    target.kill()
            output, _ = process.communicate()
            pytest.fail(f"{command} did not finish in {timeout} s; the stacks at SIGABRT:\n{output[-8000:]}")
    assert process.returncode == 0, output[-6000:]


def single_process_reference(worker, variant: str, world_size: int) -> dict[str, torch.Tensor]:
    """What DDP must equal: each step trains on the batches all ranks saw (rank r gets batch r of each group)."""
    model = worker.make_model(variant)
    optimizer = torch.optim.SGD(model.parameters(), lr=worker.LEARNING_RATE)
    rows = worker.make_rows(worker.PER_DEVICE_BATCH * world_size * worker.STEPS)
    for batch in rows.split(worker.PER_DEVICE_BATCH * world_size):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach() for name, p in model.named_parameters()}


LAUNCHERS = {
    "torchrun": lambda port: ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)],
    "accelerate": lambda port: [
        "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
    ],
}


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ddp_ranks_end_with_identical_parameters(tmp_path, launcher):
    variant = "mac"
    launch(LAUNCHERS[launcher](free_port()), [str(WORKER), str(tmp_path), variant], cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(rank["world_size"] == 2 and rank["distributed_type"].endswith("MULTI_CPU") for rank in ranks)
    first, second = ranks[0]["parameters"], ranks[1]["parameters"]
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name

    worker = load_worker()
    expected = single_process_reference(worker, variant, world_size=2)
    initial = dict(worker.make_model(variant).named_parameters())
    assert any(not torch.equal(first[name], initial[name]) for name in first)  # training moved the weights
    for name, value in expected.items():
        torch.testing.assert_close(first[name], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_titans_train_runs_data_parallel(tmp_path, launcher):
    """`titans train` under a launcher: one DDP run over 2 processes (not two lone runs writing one folder)."""
    output_dir = tmp_path / "run"
    launch(
        [*LAUNCHERS[launcher](free_port()), "-m"],
        ["modeling_titans.cli", "train", "--preset", "tiny", "--max-steps", "3", "--output-dir", str(output_dir)],
        cwd=tmp_path,
    )
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["training"]["devices"] == 2
    assert summary["training"]["steps"] == 3
    assert isinstance(AutoModelForCausalLM.from_pretrained(output_dir), TitansForCausalLM)
