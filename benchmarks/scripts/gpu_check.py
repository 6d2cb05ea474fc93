"""One unattended GPU check: CUDA tests, Triton kernels, sync-free step, floor tables, CIFAR rows.

    python benchmarks/scripts/gpu_check.py --out DIR [--device cuda|cpu] [--quick]

Writes ``DIR/report.md`` (and ``DIR/report.json``, every figure) with six sections, each with
its status (pass, fail, or skipped), its time and its output:

1. CUDA tests: ``pytest -q -x`` on the test files that run on a GPU when one is present (those
   that test ``torch.cuda.is_available()``; today ``tests/test_triton_kernels.py``), with counts.
2. Triton kernels against float64: for k = 2, 4, 8 and n = 1e5, 1e6, 1e7 and a ragged 3,000,017,
   the largest error of ``gram`` (relative to √(G_ii G_jj)), of ``combine`` (relative to
   Σ_i |c_i x_ij|, written and accumulated) and of the π that the Gram matrix gives (absolute)
   — both backends' — and Triton's median time over torch's, interleaved repeats. gradbalance has
   no Triton π update: π is ``min_norm_weights`` of each backend's Gram matrix.
3. Sync-free step: three steps of ``MultiObjectiveOptimizer`` (default settings; exact and
   amortized, k = 2 and 4) on a small CUDA MLP under ``torch.cuda.set_sync_debug_mode("error")``
   after an unguarded warm-up step; forward passes are outside the guard, ``zero_grad``,
   ``backward`` and ``step`` inside. Plain AdamW, the control, must pass.
4. The floor tables of ``floor.py`` on the GPU at larger batches (``GPU_BATCHES``: MLP 2048, CNN
   512, transformer 128; models as in ``floor.py``), k = 2, 4, 8, 11 repeats.
5. The projector table of ``bench_projectors.py``: ``proj.loss`` forward + backward with
   ``triv="qr"`` and geotorch's ``"cayley"`` against unconstrained matrices of the same shapes,
   at the shapes of docs/projectors.md (7 repeats; ``--quick`` and ``--device cpu``: tiny shapes).
6. CIFAR-100's resnet32x4 → resnet8x4: ``CIFAR_STEPS`` steps of each row of
   ``cifar_step_cost.py`` (its row builders: teacher forward, student step, mdistiller's SGD) on
   one random batch of 64 after ``CIFAR_WARMUP`` unmeasured ones, images per second and the peak
   memory of a step (``timing.peak_bytes``); ``--quick`` and ``--device cpu``: 2 steps at batch 2.

Each section runs in a child process of this script (``--section NAME``) with its own time
budget (``BUDGETS``, 435 s together), so a hang, a crash or an error that breaks the CUDA context
fails that section only and the others still run. ``--device cpu`` runs sections 2 (Triton's CPU
interpreter), 4, 5 and 6 at tiny sizes and marks the CUDA-only ones "skipped: no CUDA";
``--quick`` shrinks sections 2, 4, 5 and 6 on the GPU too.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Seconds per section, the child's hard limit. The tests compile every Triton specialisation
# they meet; the tables' child stops starting rows TABLE_MARGIN seconds before its limit.
BUDGETS = {"tests": 125, "kernels": 45, "sync": 30, "tables": 75, "projectors": 40, "cifar": 120}
TABLE_MARGIN = 20
# Section 6: steps per row (after CIFAR_WARMUP), at the recipe's batch; the child stops starting
# rows CIFAR_MARGIN seconds before its limit.
CIFAR_STEPS = 200
CIFAR_WARMUP = 10
CIFAR_MARGIN = 15
KERNEL_MARGIN = 8
GPU_BATCHES = {"mlp": 2048, "cnn": 512, "transformer": 128}
# Tolerances of section 2: float32 arithmetic on float32 data (as tests/test_triton_kernels.py);
# π at cos ≈ 0.999, where π moves by about 500 times G's relative error (1 / (1 − cos) / 2), so
# 1e-4 admits 2e-7 of G (the Triton kernel's is ~1e-8, the torch backend's ~4e-7 on 4096 columns).
GRAM_RTOL = 1e-6
COMBINE_RTOL = 1e-6
PI_ATOL = 1e-4
# Kineto prints a line for every profiler start and stop (the CPU memory measurement of floor.py).
NOISE = re.compile(r"^USDT:.*profiler_(start|stop)$")
OUTPUT_LINES = 60


@dataclass(frozen=True)
class Result:
    """What a section reports: pass/fail, a markdown body, and its figures for the JSON."""

    passed: bool
    body: str
    data: Any = None


@dataclass(frozen=True)
class Section:
    title: str
    cuda_only: bool
    run: Callable[[str, bool, float], Result]  # (device, quick, deadline) → result


# ---- 1. the CUDA tests ---------------------------------------------------------------------


def cuda_test_files() -> list[Path]:
    """The test modules that switch to the GPU when one is present."""
    marker = re.compile(r"cuda\.is_available\(\)|requires_cuda")
    return [
        path
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        if marker.search(path.read_text())
    ]


def summary_counts(output: str) -> dict[str, int]:
    """pytest's summary line (``3 passed, 1 skipped in 2.0s``) as counts."""
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", output)
    return {word.rstrip("s") if word.startswith("error") else word: int(n) for n, word in counts}


def tests_section(device: str, quick: bool, deadline: float) -> Result:
    files = [str(path.relative_to(ROOT)) for path in cuda_test_files()]
    env = child_environment()  # without TRITON_INTERPRET: the kernels compiled, on the GPU
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files]
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(deadline - time.monotonic() - 5, 1),
        )
        output, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as error:
        output, returncode = _text(error.stdout) + _text(error.stderr), None
    counts = summary_counts(output.strip().splitlines()[-1] if output.strip() else "")
    passed = returncode == 0 and counts.get("passed", 0) > 0
    status = "timed out" if returncode is None else f"exit status {returncode}"
    body = f"`{' '.join(['pytest', *command[3:]])}`: {status}, counts {counts}\n\n" + code_block(
        output
    )
    return Result(passed, body, {"files": files, "returncode": returncode, "counts": counts})


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


# ---- 2. the Triton kernels -----------------------------------------------------------------


def near_parallel(k: int, n: int, device: str, cos: float = 0.999) -> Any:
    """k float32 rows u + ε v_i with cos(g_i, g_j) ≈ ``cos``: π is interior and sensitive."""
    import torch

    generator = torch.Generator().manual_seed(k * 7919 + n)
    common = torch.randn(n, generator=generator, dtype=torch.float64)
    noise = torch.randn(k, n, generator=generator, dtype=torch.float64)
    spread = math.sqrt(2 * (1 - cos))  # ‖g_i − g_j‖² ≈ 2ε² against ‖g‖² ≈ 1: 1 − cos ≈ ε²
    return (common + spread / math.sqrt(2) * noise).float().to(device)


def kernel_errors(flat: Any) -> dict[str, float]:
    """Largest relative errors of each backend's Gram and combine, and of the π it gives."""
    import torch

    from gradbalance._kernels import torch_backend, triton_backend
    from gradbalance.weighting import min_norm_weights

    values = flat.double()
    reference = values @ values.T
    scale = (reference.diagonal()[:, None] * reference.diagonal()[None, :]).sqrt()
    pi = min_norm_weights(reference)
    generator = torch.Generator().manual_seed(1)
    coefficients = torch.softmax(torch.randn(len(flat), generator=generator), 0).double()
    coefficients = coefficients.to(flat.device)
    initial = torch.randn(flat.shape[1], generator=generator).to(flat.device)
    weighted = coefficients @ values
    magnitude = coefficients @ values.abs()
    errors = {}
    for name, backend in (("triton", triton_backend), ("torch", torch_backend)):
        gram = backend.gram(flat)
        errors[f"{name} gram"] = ((gram - reference).abs() / scale).max().item()
        errors[f"{name} π"] = (min_norm_weights(gram) - pi).abs().max().item()
        out = backend.combine(flat, coefficients, torch.empty_like(initial), accumulate=False)
        errors[f"{name} combine"] = ((out.double() - weighted).abs() / magnitude).max().item()
        out = backend.combine(flat, coefficients, initial.clone(), accumulate=True)
        expected = initial.double() + weighted
        bound = magnitude + initial.double().abs()
        errors[f"{name} accumulate"] = ((out.double() - expected).abs() / bound).max().item()
    return errors


def kernel_times(flat: Any, repeats: int) -> dict[str, float]:
    """Triton's median time over torch's, for the Gram matrix and the combination."""
    import torch
    from timing import interleaved_medians

    from gradbalance._kernels import torch_backend, triton_backend

    coefficients = torch.full((len(flat),), 1 / len(flat), dtype=torch.float64, device=flat.device)
    out = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
    calls = {}
    for name, backend in (("triton", triton_backend), ("torch", torch_backend)):
        calls[f"{name} gram"] = lambda backend=backend: backend.gram(flat)
        calls[f"{name} combine"] = lambda backend=backend: backend.combine(
            flat, coefficients, out, accumulate=False
        )
    synchronize = torch.cuda.synchronize if flat.is_cuda else None
    medians = interleaved_medians(calls, repeats, warmup=2, synchronize=synchronize)
    return {
        "gram": medians["triton gram"] / medians["torch gram"],
        "combine": medians["triton combine"] / medians["torch combine"],
    }


def kernels_section(device: str, quick: bool, deadline: float) -> Result:
    on_gpu = device == "cuda"
    # The CPU runs go through Triton's interpreter (TRITON_INTERPRET=1, set by the parent), whose
    # cost is per 4096-column chunk: a few chunks only, and its times say nothing about a GPU.
    ns = (10**5, 10**6, 3_000_017) if quick else (10**5, 10**6, 10**7, 3_000_017)
    ns = ns if on_gpu else (1000, 4097)
    repeats = 25 if on_gpu else 3
    rows, skipped = [], []
    for k in (2, 4, 8):
        for n in ns:
            if time.monotonic() > deadline - KERNEL_MARGIN:
                skipped.append(f"k = {k}, n = {n:,}")
                continue
            flat = near_parallel(k, n, device)
            row = {"k": k, "n": n, **kernel_errors(flat)}
            row["time"] = kernel_times(flat, repeats)
            rows.append(row)
            del flat
    passed = not skipped and all(
        row["triton gram"] <= GRAM_RTOL
        and row["triton combine"] <= COMBINE_RTOL
        and row["triton accumulate"] <= COMBINE_RTOL
        and row["triton π"] <= PI_ATOL
        for row in rows
    )
    lines = [
        f"Tolerances: Gram {GRAM_RTOL:.0e} of √(G_ii G_jj), combine {COMBINE_RTOL:.0e} of "
        f"Σ|c_i x_ij|, π {PI_ATOL:.0e}; rows at cos ≈ 0.999; times: median of {repeats} "
        "interleaved repeats" + ("" if on_gpu else " (Triton's CPU interpreter: not GPU times)"),
        "",
        "| k | n | Gram err triton | torch | combine err triton | torch | accumulate err "
        "triton | torch | π err triton | torch | Gram time triton / torch | combine time "
        "triton / torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        errors = " | ".join(
            f"{row[f'{backend} {what}']:.1e}"
            for what in ("gram", "combine", "accumulate", "π")
            for backend in ("triton", "torch")
        )
        times = f"{row['time']['gram']:.2f} | {row['time']['combine']:.2f}"
        lines.append(f"| {row['k']} | {row['n']:,} | {errors} | {times} |")
    if skipped:
        lines += ["", "Not measured (out of time): " + "; ".join(skipped)]
    return Result(passed, "\n".join(lines), rows)


# ---- 3. the sync-free step -----------------------------------------------------------------


@contextmanager
def sync_errors(device: Any) -> Iterator[None]:
    """Every host synchronisation raises inside (CUDA only); the mode is restored after."""
    import torch

    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def sync_free_case(mode: str | None, k: int, device: Any, steps: int = 3) -> str | None:
    """None if ``steps`` guarded steps ran without a synchronisation, else the error's text.

    ``mode`` None is the control: torch's AdamW (fused) on the summed loss.
    """
    import torch
    from workloads import Batch, mlp

    from gradbalance import MultiObjectiveOptimizer

    batch = Batch(k, features=256, size=64, device=device)
    model = mlp(width=256, depth=2, features=256).to(device)
    if mode is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    else:
        optimizer = MultiObjectiveOptimizer(model.parameters(), mode=mode, lr=1e-4)

    def step(guarded: bool) -> None:
        outputs = model(batch.inputs)
        losses = batch.losses_of(outputs)
        shared = {"representation": outputs} if mode == "representation" else {}
        with sync_errors(device) if guarded else _nothing():
            optimizer.zero_grad()
            if mode is None:
                sum(losses).backward()
            else:
                optimizer.backward(losses, **shared)
            optimizer.step()

    try:
        step(guarded=False)
        # vectorize=None chooses the per-task backward on its first step (from the graph)
        while mode == "exact" and optimizer.balancer.vectorize is None:
            step(guarded=False)
        for _ in range(steps):
            step(guarded=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous error surfaces here
    except Exception as error:
        return "".join(traceback.format_exception(error)[-12:])
    return None


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# (mode, k, whether it is expected to synchronise): exact mode's k ≥ 3 solver runs on the host
# (docs/method.md, "Without a host synchronisation"), so exact k = 4 is expected to fail the guard.
SYNC_CASES: list[tuple[str | None, int, bool]] = [
    (None, 2, False),
    ("exact", 2, False),
    ("exact", 4, True),
    ("amortized", 2, False),
    ("amortized", 4, False),
    ("representation", 2, False),
]


def sync_section(device: str, quick: bool, deadline: float) -> Result:
    import torch

    cases, expected = {}, {}
    for mode, k, synchronises in SYNC_CASES:
        case = f"{mode or 'control: AdamW'}, k = {k}"
        cases[case] = sync_free_case(mode, k, torch.device(device))
        expected[case] = synchronises
    lines = ["| case | result | expected |", "|---|---|---|"]
    lines += [
        f"| {case} | {'synchronised' if error else 'no sync'} | "
        f"{'synchronises' if expected[case] else 'no sync'} |"
        for case, error in cases.items()
    ]
    for case, error in cases.items():
        if error is not None:
            lines += ["", f"{case}:", "", code_block(error)]
    passed = all((error is not None) == expected[case] for case, error in cases.items())
    return Result(passed, "\n".join(lines), cases)


# ---- 4. the floor tables -------------------------------------------------------------------


def tables_section(device: str, quick: bool, deadline: float) -> Result:
    import floor
    import torch

    if device == "cuda" and not quick:
        workloads, ks, repeats = floor.full_workloads(GPU_BATCHES), [2, 4, 8], 11
    else:
        workloads, ks, repeats = floor.quick_workloads(), [2, 3], 3
    results = floor.run(workloads, ks, torch.device(device), repeats, deadline - TABLE_MARGIN)
    finite = all(
        math.isfinite(value) and value > 0
        for row in results["rows"]
        for value in row["time"].values()
    ) and all(math.isfinite(value) for row in results["rows"] for value in row["memory"].values())
    passed = finite and not results["skipped"] and bool(results["rows"])
    return Result(passed, floor.report(results), results)


# ---- 5. the projectors against their floor ---------------------------------------------------


def projectors_section(device: str, quick: bool, deadline: float) -> Result:
    import bench_projectors
    import torch

    full = device == "cuda" and not quick
    shapes = bench_projectors.SHAPES if full else bench_projectors.QUICK_SHAPES
    trivs = ["qr", "cayley"]
    rows = bench_projectors.projector_table(shapes, trivs, 7 if full else 3, torch.device(device))
    passed = all(
        math.isfinite(ratio) and ratio > 0 for row in rows for ratio in row["ratio"].values()
    )
    data = [{**row, "shape": vars(row["shape"])} for row in rows]
    return Result(passed, bench_projectors.markdown(rows, trivs), data)


# ---- 6. the CIFAR-100 rows -------------------------------------------------------------------


def cifar_section(device: str, quick: bool, deadline: float) -> Result:
    import cifar_step_cost
    import torch
    from timing import peak_bytes

    full = device == "cuda" and not quick
    batch, steps, warmup = (64, CIFAR_STEPS, CIFAR_WARMUP) if full else (2, 2, 1)
    where = torch.device(device)
    inputs, labels = cifar_step_cost.random_batch(batch, where)
    teacher = cifar_step_cost.frozen_teacher("resnet32x4", where)
    builders = cifar_step_cost.row_builders(teacher, "resnet8x4", inputs, labels)
    wait = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)
    rows, skipped = [], []
    for name, build in builders.items():
        if time.monotonic() > deadline - CIFAR_MARGIN:
            skipped.append(name)
            continue
        step = build()
        for _ in range(warmup):
            step()
        wait()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wait()
        seconds = time.perf_counter() - start
        del step
        rows.append(
            {
                "row": name,
                "images_per_s": steps * batch / seconds,
                "peak_bytes": peak_bytes(build, where),
            }
        )
    passed = not skipped and all(
        math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0 and row["peak_bytes"] > 0
        for row in rows
    )
    lines = [
        f"resnet32x4 → resnet8x4, batch {batch}, {steps} steps per row after {warmup}",
        "",
        "| row | images/s | time × kd | peak MiB | memory × kd |",
        "|---|---|---|---|---|",
    ]
    kd = next(row for row in rows if row["row"] == "kd")
    for row in rows:
        lines.append(
            f"| {row['row']} | {row['images_per_s']:.0f} | "
            f"{kd['images_per_s'] / row['images_per_s']:.2f} | {row['peak_bytes'] / 2**20:.0f} | "
            f"{row['peak_bytes'] / kd['peak_bytes']:.2f} |"
        )
    if skipped:
        lines += ["", f"Not run (out of time): {', '.join(skipped)}"]
    return Result(passed, "\n".join(lines), {"batch": batch, "steps": steps, "rows": rows})


SECTIONS = {
    "tests": Section("1. CUDA tests", True, tests_section),
    "kernels": Section("2. Triton kernels against float64 references", False, kernels_section),
    "sync": Section("3. The sync-free step", True, sync_section),
    "tables": Section("4. Step time and memory against the floor", False, tables_section),
    "projectors": Section("5. Projectors against their floor", False, projectors_section),
    "cifar": Section("6. CIFAR-100 rows: images/s and memory", False, cifar_section),
}


# ---- running the sections and writing the report ---------------------------------------------


def code_block(text: str, lines: int = OUTPUT_LINES) -> str:
    """The last ``lines`` lines of ``text`` but kineto's noise, as a markdown code block."""
    kept = [line for line in text.rstrip().splitlines() if not NOISE.match(line)][-lines:]
    return "```text\n" + "\n".join(kept) + "\n```"


def child_environment() -> dict[str, str]:
    """This one's, with the checkout importable even where gradbalance is not installed."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(name: str, device: str, quick: bool, out: Path) -> dict[str, Any]:
    """Run one section in a child process within its budget; its record for the report."""
    budget = BUDGETS[name]
    result_path = out / f"{name}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--section", name, "--device", device]
    command += ["--out", str(out), "--budget", str(budget)] + (["--quick"] if quick else [])
    env = child_environment()
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # read when Triton is imported: kernels on CPU tensors
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget
        )
        output, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as error:
        output, returncode = _text(error.stdout) + _text(error.stderr), None
    record = {"seconds": time.monotonic() - start, "budget": budget, "output": output}
    if result_path.exists():
        record.update(json.loads(result_path.read_text()))
    elif returncode is None:
        record.update(status="fail", body=f"timed out after {budget} s")
    else:
        record.update(status="fail", body=f"the section's process ended with status {returncode}")
    return record


def child(name: str, device: str, quick: bool, out: Path, budget: float) -> None:
    """The child process's side: run the section, write its result (or its error) as JSON."""
    deadline = time.monotonic() + budget
    try:
        result = SECTIONS[name].run(device, quick, deadline)
        record = {"status": "pass" if result.passed else "fail", "body": result.body}
        record["data"] = result.data
    except Exception as error:
        record = {"status": "fail", "body": code_block("".join(traceback.format_exception(error)))}
    (out / f"{name}.json").write_text(json.dumps(record, default=str))


def cuda_device() -> str | None:
    """The GPU's name or None, asked in a child process: this one creates no CUDA context."""
    command = [
        sys.executable,
        "-c",
        "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or None


def versions() -> str:
    found = []
    for package in ("torch", "triton", "torchjd"):
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package} not installed")
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return f"python {platform.python_version()}, " + ", ".join(found) + f", commit {commit or '?'}"


def report(records: dict[str, dict[str, Any]], header: list[str]) -> str:
    lines = ["# GPU check", "", *header, "", "| section | status | seconds | budget |"]
    lines.append("|---|---|---|---|")
    for name, record in records.items():
        lines.append(
            f"| {SECTIONS[name].title} | {record['status']} | {record['seconds']:.0f} | "
            f"{record['budget']} |"
        )
    for name, record in records.items():
        lines += ["", f"## {SECTIONS[name].title}: {record['status']}", "", record["body"]]
        if record.get("output", "").strip():
            lines += ["", "Output (last lines):", "", code_block(record["output"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the report's folder")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="smaller kernel and table sizes")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.section:
        child(args.section, args.device, args.quick, args.out, args.budget)
        return
    start = time.monotonic()
    # On a GPU machine whose CUDA is broken every section fails, loudly; only --device cpu skips.
    gpu = cuda_device() if args.device == "cuda" else None
    missing = args.device == "cuda" and gpu is None
    records = {}
    for name, section in SECTIONS.items():
        if missing or (section.cuda_only and args.device == "cpu"):
            body = (
                "--device cuda, but torch.cuda.is_available() is False"
                if missing
                else "Needs a CUDA GPU: run with --device cuda on a GPU machine."
            )
            status = "fail" if missing else "skipped: no CUDA"
            records[name] = {"status": status, "body": body, "seconds": 0.0}
            records[name]["budget"] = BUDGETS[name]
            continue
        records[name] = run_child(name, args.device, args.quick, args.out)
        print(f"{section.title}: {records[name]['status']} ({records[name]['seconds']:.0f} s)")
    header = [
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}; --device {args.device}"
        + (" --quick" if args.quick else "")
        + f"; {time.monotonic() - start:.0f} s in all (budgets {sum(BUDGETS.values())} s)",
        f"GPU: {gpu or 'none'}; " + versions(),
    ]
    (args.out / "report.md").write_text(report(records, header))
    (args.out / "report.json").write_text(json.dumps(records, indent=2, default=str))
    for name in SECTIONS:
        (args.out / f"{name}.json").unlink(missing_ok=True)  # folded into report.json
    print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
