"""The README's two commands: CI runs exactly them, and the setup (command 1) installs what the tests (command 2)
need, so both run verbatim in a new virtual environment."""

import os
import re
import runpy
import subprocess

import setuptools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> tuple[str, str]:
    """The commands under "# 1." and "# 2." in the README's first bash block."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        block = re.search(r"```bash\n(.*?)```", f.read(), re.DOTALL).group(1)
    lines = block.splitlines()
    after = {line.split(".")[0][2:]: lines[i + 1] for i, line in enumerate(lines) if re.match(r"# \d\.", line)}
    return after["1"], after["2"]


def test_ci_sets_up_as_the_readme_does_then_runs_its_test_command(tmp_path):
    setup, tests = readme_commands()
    steps = [step.strip() for step in setup.split("&&")]
    installs = [step for step in steps if step.startswith("pip install ")]
    assert installs[0] == "pip install torch==2.13.0"  # first, or pip pulls a multi-GB CUDA build
    expected = [step for step in steps if step.startswith(("python3 -m venv ", ". ", "pip install "))] + [tests]
    # `--print` must run nothing: python and pip fail here, so a CI script that ignored it would stop at once.
    for name in ("python", "python3", "pip", "pip3"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 97\n")
        (tmp_path / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    completed = subprocess.run([os.path.join(REPO, ".ci", "run"), "--print"], capture_output=True, text=True, env=env)
    assert completed.returncode == 0, completed.stderr
    printed = completed.stdout.splitlines()
    assert printed == expected
    assert "titans demo" in setup and not any("titans" in step for step in printed[:-1])  # CI skips the main job


def test_readme_setup_installs_what_the_tests_need(monkeypatch):
    setup, _ = readme_commands()
    extras = re.search(r'pip install -e "\.\[([\w,]+)\]"', setup).group(1).split(",")
    arguments = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: arguments.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(os.path.join(REPO, "setup.py"))
    requirements = arguments["install_requires"] + [r for extra in extras for r in arguments["extras_require"][extra]]
    names = {re.match(r"[\w.-]+", requirement).group(0).lower() for requirement in requirements}
    # The test files import pytest and peft; the benchmark tests draw their plots with matplotlib; the GGUF tests
    # of test_upcycling.py write their file with gguf.
    assert {"pytest", "peft", "matplotlib", "gguf"} <= names
