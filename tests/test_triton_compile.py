"""The Triton kernels compile ahead of time for sm_80 and sm_90 without spilling registers.

No GPU is needed: Triton lowers to PTX itself and assembles it with the ``ptxas`` it ships. The
compilation runs in a child process (this file run as a script) because the test session may
have set ``TRITON_INTERPRET=1`` (see ``tests/conftest.py``): Triton then decorates its own
helpers (``tl.sum`` among them) and our kernels as interpreted functions, which the compiler
cannot lower; only a fresh interpreter without the variable gets the real ``JITFunction``\\s.

The spill counts are read from the ``ptxas -v`` log that Triton prints with
``TRITON_DUMP_PTXAS_LOG=1``: ``CompiledKernel.n_spills`` is filled only when the binary is loaded
onto a GPU. The child also runs ``gram`` and ``combine`` with their launches turned into
compile-only warm-ups, which checks that the wrappers' arguments bind to the kernels.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ARCHES = (80, 90)
FLAT_DTYPES = ("fp32", "fp16", "bf16", "fp64")
# (kernel, flat dtype, aligned): "aligned" compiles with n and the row stride multiples of 16, as
# the launcher specialises them when they are: vector loads, and so another register allocation.
CASES = [(kernel, dtype, False) for kernel in ("gram_partials", "combine") for dtype in FLAT_DTYPES]
CASES += [("gram_partials", "fp32", True), ("combine", "fp32", True)]
CASES += [("reduce_partials", "fp64", False)]
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _source(kernel: str, dtype: str, aligned: bool):
    """The ``ASTSource`` of one kernel as :mod:`gradbalance._kernels.triton_backend` launches it."""
    import triton.language as tl
    from triton.compiler import ASTSource

    from gradbalance._kernels import triton_backend as backend

    compute = tl.float64 if dtype == "fp64" else tl.float32
    if kernel == "gram_partials":
        fn = backend._gram_partials_kernel
        signature = {"flat_ptr": f"*{dtype}", "partials_ptr": "*fp64"}
        signature |= {"k": "i32", "n": "i32", "row_stride": "i32"}
        constexprs = {
            "K_PAD": backend.MAX_ROWS,
            "CHUNK": backend._GRAM_CHUNK,
            "RUNS": backend._GRAM_RUNS,
            "RUN": backend._GRAM_RUN,
            "DOT_DTYPE": compute,
        }
    elif kernel == "combine":
        fn = backend._combine_kernel
        signature = {"flat_ptr": f"*{dtype}", "coefficients_ptr": "*fp64", "out_ptr": f"*{dtype}"}
        signature |= {"k": "i32", "n": "i32", "row_stride": "i32"}
        constexprs = {"ACCUMULATE": True, "COMPUTE_DTYPE": compute, "TILE": backend._COMBINE_TILE}
    else:
        fn = backend._reduce_partials_kernel
        signature = {"partials_ptr": "*fp64", "gram_ptr": "*fp64", "k": "i32", "chunks": "i32"}
        constexprs = {"K_PAD": backend.MAX_ROWS, "TILE": backend._REDUCE_TILE}
    # Tensors from torch's caching allocator are 16-byte aligned, as the launcher would find.
    divisible = [name for name in signature if name.endswith("_ptr")]
    if aligned:
        divisible += ["n", "row_stride"]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    signature |= dict.fromkeys(constexprs, "constexpr")
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _compile_all() -> list[dict]:
    """Compile every case for every architecture; one record per compilation."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    from gradbalance._kernels import triton_backend as backend

    records = []
    for kernel, dtype, aligned in CASES:
        for arch in ARCHES:
            record = {"case": [kernel, dtype, aligned], "arch": arch}
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    compiled = triton.compile(
                        _source(kernel, dtype, aligned),
                        target=GPUTarget("cuda", arch, 32),
                        options=backend._COMPILE_OPTIONS,
                    )
            except Exception as error:  # reported by the test of this case
                record["error"] = f"{type(error).__name__}: {error}"
            else:
                record["spills"] = [list(map(int, m)) for m in PTXAS_SPILLS.findall(log.getvalue())]
                record["cubin_bytes"] = len(compiled.asm["cubin"])
                record["tf32"] = "tf32" in compiled.asm["ptx"]
            records.append(record)
    return records


def _launch_wrappers() -> str | None:
    """Run gram and combine with each launch turned into a compile-only warm-up for sm_90.

    The interpreter drops launch options it does not know, so only the JIT checks that the
    wrappers' arguments and options bind to the kernels. ``JITFunction.warmup`` needs a driver for
    the current device and target only; this one answers without a GPU. Returns the error, if any.
    """
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver

    from gradbalance._kernels import triton_backend as backend

    class NoGpuDriver(CudaDriver):
        def __init__(self) -> None:  # the real one loads libcuda
            pass

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

    class WarmUp:
        def __init__(self, kernel) -> None:
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.kernel.warmup(*args, grid=grid, **kwargs)

    driver.set_active(NoGpuDriver())
    for name in ("_gram_partials_kernel", "_reduce_partials_kernel", "_combine_kernel"):
        setattr(backend, name, WarmUp(getattr(backend, name)))
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            flat = torch.zeros(3, 5000, dtype=dtype)
            backend.gram(flat)
            for accumulate in (False, True):
                out = torch.empty(5000, dtype=dtype)
                backend.combine(
                    flat, torch.ones(3, dtype=torch.float64), out, accumulate=accumulate
                )
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # A fresh cache, so that ptxas runs (and logs) for every kernel.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    results = json.loads(child.stdout.splitlines()[-1])
    records = {(tuple(r["case"]), r["arch"]): r for r in results["kernels"]}
    return {"kernels": records, "wrappers": results["wrappers"]}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda case: f"{case[0]}-{case[1]}" + ("-aligned" if case[2] else "")
)
def test_kernel_compiles_for_the_gpu_without_spills(compiled, case, arch):
    record = compiled["kernels"][(case, arch)]
    assert "error" not in record, record.get("error")
    assert record["cubin_bytes"] > 0
    assert record["spills"], "no spill line in the ptxas log: has its format changed?"
    assert all(stores == 0 and loads == 0 for stores, loads in record["spills"]), record["spills"]
    assert not record["tf32"], "TF32 in the PTX: a tl.dot lost input_precision='ieee'"


def test_wrappers_launch_arguments_bind_to_the_compiled_kernels(compiled):
    assert compiled["wrappers"] is None, compiled["wrappers"]


if __name__ == "__main__":
    print(json.dumps({"kernels": _compile_all(), "wrappers": _launch_wrappers()}))
