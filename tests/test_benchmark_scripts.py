"""The benchmark scripts run and report what they claim: floor.py and gpu_check.py.

Each script runs once, in a subprocess at its ``--quick`` sizes (tens of seconds on 2 cores); the
assertions are on the structure of what they write and on what holds whatever the machine's load
(no timing bounds). Both live in benchmarks/scripts/, with the timing.py and workloads.py they
import.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "benchmarks" / "scripts"
WORKLOADS = ("mlp", "cnn", "transformer")
QUICK_KS = (2, 3)
# The variants of the brief; floor.py may have more (each new one is one more column).
VARIANTS = ("plain", "exact", "floor", "torchjd", "amortized", "famo")
CIFAR_ROWS = (
    "kd",
    "dot",
    "mokd-exact",
    "mokd-representation",
    "mokd-amortized",
    "imtl-g",
    "vkd",
    "mokd-subspace",
)
TIME_COLUMNS = ("exact", "floor", "exact / floor", "torchjd", "amortized", "famo")


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the tests share the machine
    done = subprocess.run(
        [sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def floor_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("floor") / "floor.json"
    done = run_script("benchmarks/scripts/floor.py", "--quick", "--json", str(path))
    return done.stdout, json.loads(path.read_text())


@pytest.fixture(scope="module")
def gpu_check_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    run_script("benchmarks/scripts/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out))
    return (out / "report.md").read_text(), json.loads((out / "report.json").read_text())


@pytest.fixture
def scripts_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))


@pytest.mark.slow
def test_floor_measures_every_workload_and_k(floor_run):
    _, results = floor_run
    rows = {(row["workload"], row["k"]): row for row in results["rows"]}
    assert set(rows) == {(name, k) for name in WORKLOADS for k in QUICK_KS}
    assert results["skipped"] == []
    for row in rows.values():
        assert set(VARIANTS) <= set(row["seconds"]) == set(row["peak_bytes"])
        assert {*VARIANTS, "exact / floor"} <= set(row["time"])
        assert all(math.isfinite(ratio) and ratio > 0 for ratio in row["time"].values())
        assert row["time"]["plain"] == 1.0
        assert row["memory"]["plain"] == 0.0
        # Plain AdamW alone holds the parameters, their gradients and two moments: 4 copies.
        assert row["peak_bytes"]["plain"] >= 4 * 4 * row["n"]


@pytest.mark.slow
def test_floor_memory_is_ordered_as_the_methods_are(floor_run):
    _, results = floor_run
    for row in results["rows"]:
        memory = row["memory"]
        # Exact mode holds the (k, n) float32 per-task gradients: k copies, more than one.
        if row["k"] == 3:
            assert memory["exact"] > 1, row
        # The k backward passes keep the graph that plain's one backward frees as it goes.
        assert memory["floor"] >= 0, row


@pytest.mark.slow
def test_floor_prints_both_tables_with_a_row_per_workload_and_k(floor_run):
    printed, _ = floor_run
    lines = printed.splitlines()
    time_header = next(line for line in lines if line.startswith("| workload | k | n |"))
    memory_header = next(line for line in lines if line.startswith("| workload | k | exact"))
    for header, keys, columns in (
        (time_header, ("workload", "k", "n"), TIME_COLUMNS),
        (memory_header, ("workload", "k"), VARIANTS[1:]),
    ):
        cells = cells_of(header)
        assert cells[: len(keys)] == list(keys)
        assert [cell for cell in cells if cell in columns] == list(columns)  # in this order
        start = lines.index(header) + 2
        table = lines[start : start + len(WORKLOADS) * len(QUICK_KS)]
        assert [tuple(cells_of(line)[:2]) for line in table] == [
            (name, str(k)) for name in WORKLOADS for k in QUICK_KS
        ]
        assert all(len(cells_of(line)) == len(cells) for line in table)


def cells_of(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_the_cpu_peak_memory_of_a_step_is_the_same_every_time(scripts_importable):
    import floor
    from timing import peak_bytes

    problem = floor.Problem.build(floor.quick_workloads()["mlp"], 3, torch.device("cpu"))
    for variant in ("plain", "exact"):
        peaks = [
            peak_bytes(lambda variant=variant: floor.VARIANTS[variant](problem), problem.device)
            for _ in range(2)
        ]
        assert peaks[0] == peaks[1] > 0


@pytest.mark.slow
def test_gpu_check_on_cpu_runs_what_it_can_and_skips_the_rest(gpu_check_report):
    report, records = gpu_check_report
    statuses = {name: record["status"] for name, record in records.items()}
    assert statuses == {
        "tests": "skipped: no CUDA",
        "kernels": "pass",
        "sync": "skipped: no CUDA",
        "tables": "pass",
        "projectors": "pass",
        "cifar": "pass",
    }
    for title, status in (
        ("1. CUDA tests", "skipped: no CUDA"),
        ("2. Triton kernels against float64 references", "pass"),
        ("3. The sync-free step", "skipped: no CUDA"),
        ("4. Step time and memory against the floor", "pass"),
        ("5. Projectors against their floor", "pass"),
        ("6. CIFAR-100 rows: images/s and memory", "pass"),
    ):
        assert f"## {title}: {status}" in report
    kernel_rows = records["kernels"]["data"]
    assert sorted({row["k"] for row in kernel_rows}) == [2, 4, 8]
    projector_rows = records["projectors"]["data"]
    assert len(projector_rows) == 2 and all(row["ratio"]["qr"] > 0 for row in projector_rows)
    cifar_rows = records["cifar"]["data"]["rows"]
    assert [row["row"] for row in cifar_rows] == list(CIFAR_ROWS)
    table_rows = records["tables"]["data"]["rows"]
    assert {(row["workload"], row["k"]) for row in table_rows} == {
        (name, k) for name in WORKLOADS for k in QUICK_KS
    }


def test_the_sync_free_case_runs_its_steps_off_cuda(scripts_importable):
    """On CPU the guard is off: this checks the steps themselves, which the GPU run guards."""
    import gpu_check

    for mode, k, _ in gpu_check.SYNC_CASES:
        assert gpu_check.sync_free_case(mode, k, torch.device("cpu"), steps=1) is None


def test_pytest_counts_are_read_from_its_summary_line(scripts_importable):
    from gpu_check import summary_counts

    assert summary_counts("1 failed, 250 passed, 2 skipped, 1 error in 31.2s") == {
        "failed": 1,
        "passed": 250,
        "skipped": 2,
        "error": 1,
    }
