"""benchmarks/scripts/cifar_step_cost.py: every row of a pair, measured, in --quick mode.

The script runs once in a subprocess (tiny batch, one repeat); the assertions hold whatever the
machine's load: the rows, KD as the reference, and what each row must hold in memory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_benchmark_scripts import CIFAR_ROWS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("cifar_cost") / "cost.json"
    # This checkout's gradbalance, whichever one the environment has installed.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "benchmarks/scripts/cifar_step_cost.py", "--quick"]
    command += ["--pairs", "wrn_40_2-wrn_16_2", "--json", str(path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(path.read_text())


@pytest.mark.slow
def test_every_row_is_measured_against_kd(quick_run):
    printed, results = quick_run
    (result,) = results
    assert result["pair"] == "wrn_40_2-wrn_16_2" and result["batch"] == 2
    for key in ("seconds", "peak_bytes", "time", "memory"):
        assert list(result[key]) == list(CIFAR_ROWS)
    assert result["time"]["kd"] == result["memory"]["kd"] == 1.0
    assert all(value > 0 for value in result["seconds"].values())
    table = [line for line in printed.splitlines() if line.startswith("| ")][1:]  # no header
    assert [line.split("|")[1].strip() for line in table] == list(CIFAR_ROWS)


@pytest.mark.slow
def test_the_memory_follows_what_each_row_holds(quick_run):
    _, (result,) = quick_run
    peaks = result["peak_bytes"]
    parameters = 703_284 * 4  # wrn_16_2 in float32
    # SGD with momentum holds the weights, their gradients and one buffer: three copies.
    assert peaks["kd"] >= 3 * parameters
    # Exact mode keeps both per-task gradients (k = 2 copies) beside .grad; DOT a second buffer.
    assert peaks["mokd-exact"] >= peaks["kd"] + parameters
    assert peaks["dot"] >= peaks["kd"] + parameters
    # The projector rows add the projector's parameters to the one without.
    assert peaks["mokd-subspace"] > peaks["mokd-exact"] and peaks["vkd"] > peaks["kd"]
