"""The runnable examples that the integration pages show: each one trains the toy student."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
SINGLE_PROCESS = [
    "amp.py",
    "accumulation.py",
    "compile.py",
    "lightning_manual.py",
    "lightning_automatic.py",
]


def run_example(*command: str) -> str:
    # Inductor (compiled in this process by other tests) exports a pointer of this process in
    # _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR; children that inherit it could abort at exit.
    env = {k: v for k, v in os.environ.items() if not k.startswith("_TORCHINDUCTOR")}
    # The examples import the gradbalance of this checkout, not another one installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES.parent), env.get("PYTHONPATH")]))
    result = subprocess.run(
        command, cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def accuracy(output: str) -> float:
    return float(re.search(r"accuracy (\d\.\d+)", output).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("script", SINGLE_PROCESS)
def test_example_trains_the_student(script):
    output = run_example(sys.executable, script)
    assert accuracy(output) > 0.5  # chance is 0.1; the teacher's labels are 90 % recoverable


@pytest.mark.slow
def test_hf_trainer_example_distils_with_a_balancer():
    output = run_example(sys.executable, "hf_trainer.py")
    assert accuracy(output) > 0.5  # 4 classes, chance is 0.25; the script checks the loss fell
    # Trainer's log lines carry π averaged over the steps since the last log (300 steps, every 100)
    logged = re.findall(r"'pi_distill': '?([-\d.e]+)'?, 'pi_task': '?([-\d.e]+)", output)
    assert len(logged) == 3, output
    for distill, task in logged:
        assert 0 <= float(distill) <= 1 and abs(float(distill) + float(task) - 1) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ddp.py", "fsdp.py"])
def test_distributed_example_trains_the_student_under_torchrun(script):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    output = run_example(*launcher, "--nproc_per_node", "2", script)
    assert accuracy(output) > 0.5
