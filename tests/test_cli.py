"""``gradbalance distill`` end to end on tiny settings, and its refusal of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from test_data import write_cifar100, write_mnist_idx

from gradbalance import cli
from gradbalance.cli import main
from gradbalance.experiments.cifar_models import make_cifar_model
from gradbalance.experiments.config import DistillConfig
from gradbalance.experiments.datasets import DATASETS, load_dataset
from gradbalance.experiments.methods import CIFAR_METHODS

TINY = ["--epochs", "2", "--teacher-epochs", "2", "--seeds", "2", "--no-progress"]
TINY += ["--train-size", "192", "--test-size", "100", "--batch-size", "64"]
METHODS = ["student", "kd-fixed", "vkd", "mokd-exact", "mokd-amortized", "kd-fixed-w0.5"]
PLOTS = ["accuracy.png", "weights.png", "conflict.png", "cosine.png", "dominance.png"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """One tiny MNIST-1D run with every default method plus a sweep point; (folder, stdout)."""
    out = tmp_path_factory.mktemp("distill")
    command = ["distill", *TINY, "--stats-every", "2", "--out", str(out), "--methods", *METHODS]
    result = subprocess.run(
        [sys.executable, "-m", "gradbalance.cli", *command],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_results_json_has_the_documented_schema(tiny_run):
    out, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "mnist1d"
    assert 0 <= results["teacher_accuracy"] <= 1
    assert list(results["methods"]) == METHODS
    for summary in results["methods"].values():
        accuracies = summary["accuracies"]
        assert len(accuracies) == 2 and all(0 <= value <= 1 for value in accuracies)
        assert summary["accuracy_mean"] == pytest.approx(sum(accuracies) / 2)
        spread = abs(accuracies[0] - accuracies[1]) / 2**0.5  # sample std of two values
        assert summary["accuracy_std"] == pytest.approx(spread)
        errors = summary["errors"]
        assert errors == [round((1 - value) * 100) for value in accuracies]  # --test-size 100
    assert results["command"].startswith("gradbalance distill --epochs 2")
    assert results["seeds"] == [0, 1] and results["epochs"] == 2


def test_history_has_curves_and_step_statistics(tiny_run):
    out, _ = tiny_run
    history = json.loads((out / "history.json").read_text())
    steps_per_run = 2 * 3  # 2 epochs of 192 examples in batches of 64
    for runs in history.values():
        assert len(runs) == 2 and all(len(run["test_accuracy"]) == 2 for run in runs)
    assert set(history["student"][0]["steps"]) == {"loss_task"}
    exact = history["mokd-exact"][0]["steps"]
    assert exact["pi_distill"]["step"] == list(range(steps_per_run))
    assert all(0 <= value <= 1 for value in exact["pi_distill"]["value"])
    assert len(exact["dominance"]["value"]) == steps_per_run
    amortized = history["mokd-amortized"][0]["steps"]
    assert amortized["pi_distill"]["step"] == list(range(steps_per_run))
    assert amortized["conflict"]["step"] == [0, 2, 4]  # --stats-every 2
    # FAMO starts from π = (½, ½).
    assert amortized["pi_distill"]["value"][0] == pytest.approx(0.5)


def test_plots_are_valid_pngs(tiny_run):
    out, _ = tiny_run
    for name in [*PLOTS, "summary.png", "errors.png", "test_errors.png", "accuracy.png"]:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_table_is_printed(tiny_run):
    _, stdout = tiny_run
    lines = stdout.splitlines()
    assert lines[0].startswith("mnist1d: teacher")
    assert "accuracy" in lines[1] and "vs student" in lines[1]
    for method in METHODS:
        assert any(line.startswith(method + " ") for line in lines)
    assert "results.json" in lines[-1]


def test_rerun_loads_the_cached_teacher(tiny_run, capsys):
    out, _ = tiny_run
    first = json.loads((out / "results.json").read_text())
    assert main(["distill", *TINY, "--seeds", "1", "--methods", "student", "--out", str(out)]) == 0
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["teacher_cached"] and not first["teacher_cached"]
    assert rerun["teacher_accuracy"] == first["teacher_accuracy"]
    assert (
        rerun["methods"]["student"]["accuracies"] == first["methods"]["student"]["accuracies"][:1]
    )
    wrote = capsys.readouterr().out.splitlines()[-1]
    assert "accuracy.png" in wrote and "weights.png" not in wrote  # no π without a mokd method


def test_cifar100_preset_runs_every_row_for_one_epoch_with_a_teacher_checkpoint(tmp_path):
    """The benchmark's short form, as CI runs it: every row of the preset, one epoch, one seed,
    the teacher from a checkpoint in mdistiller's layout."""
    write_cifar100(tmp_path / "data", train=32, test=16)
    torch.manual_seed(5)
    teacher = make_cifar_model("resnet32x4")
    checkpoint = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": teacher.state_dict(), "epoch": 240, "best_acc": 79.42}, checkpoint)
    out = tmp_path / "out"
    argv = ["distill", "--dataset", "cifar100", "--preset", "cifar-r32x4-r8x4"]
    argv += ["--data-dir", str(tmp_path / "data"), "--teacher-checkpoint", str(checkpoint)]
    argv += ["--epochs", "1", "--seeds", "1", "--no-progress", "--jobs", "1", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == list(CIFAR_METHODS)
    assert results["networks"] == {
        "teacher": {"name": "resnet32x4", "parameters": 7_433_860},
        "student": {"name": "resnet8x4", "parameters": 1_233_540},
    }
    assert results["config"]["optimizer"] == "sgd" and results["config"]["temperature"] == 4.0
    assert results["paired"]["reference"] in ("kd", "kd-w1", "kd-w3")
    assert "KD 73.33" in results["published"]
    assert not list(out.glob("teacher-*.pt"))  # loaded, not trained
    expected = teacher.eval()(load_dataset("cifar100", tmp_path / "data").x_test).logits
    labels = load_dataset("cifar100", tmp_path / "data").y_test
    assert results["teacher_errors"] == int((expected.argmax(1) != labels).sum())


def test_cifar100_trains_and_caches_the_teacher_without_a_checkpoint(tmp_path, capsys):
    write_cifar100(tmp_path / "data", train=32, test=16)
    out = tmp_path / "out"
    argv = ["distill", "--dataset", "cifar100", "--data-dir", str(tmp_path / "data")]
    argv += ["--teacher", "wrn_16_2", "--student", "wrn_16_2", "--methods", "kd", "mokd-exact"]
    argv += ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--no-progress"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    assert (out / "teacher-cifar100-wrn_16_2.pt").is_file()
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"kd", "mokd-exact"} and results["teacher_cached"] is False
    assert "cifar100: teacher" in capsys.readouterr().out


def test_mnist_idx_folder_runs_hintons_setting_end_to_end(tmp_path, capsys):
    write_mnist_idx(tmp_path / "data", train=64, test=20)
    out = tmp_path / "out"
    argv = ["distill", "--dataset", "mnist", "--data-dir", str(tmp_path / "data")]
    argv += ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "1", "--no-progress"]
    argv += ["--student-width", "16", "--jobs", "1", "--out", str(out)]
    argv += ["--methods", "student", "hinton-kd", "mokd-exact", "pcgrad"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert (config["temperature"], config["weight_decay"], config["lr"]) == (20.0, 0.0, 1e-3)
    assert (config["features"], config["batch_size"]) == (False, 256)
    assert results["test_size"] == 20 and 0 <= results["teacher_errors"] <= 20
    for summary in results["methods"].values():
        assert len(summary["errors"]) == 1 and 0 <= summary["errors"][0] <= 20
    assert "conflict_share" in results["methods"]["mokd-exact"]
    assert "mnist: teacher" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--epochs", "0"], "must be ≥ 1"),
        (["--seeds", "two"], "expected an integer"),
        (["--lr", "nan"], "finite"),
        (["--temperature", "0"], "must be > 0"),
        (["--weight-decay", "-1"], "must be ≥ 0"),
        (["--methods", "mokd"], "unknown method 'mokd'"),
        (["--methods", "kd-fixed-w0"], "distill weight must be > 0"),
        (["--methods", "student", "student"], "lists a method twice"),
        (["--dataset", "mnist2d"], "invalid choice"),
        (["--dataset", "cifar100"], "needs --data-dir"),
        (["--dataset", "cifar100", "--data-dir", "missing"], "no CIFAR-100 in missing"),
        (["--dataset", "mnist", "--data-dir", "missing"], "no MNIST IDX files in missing"),
        (["--data-dir", "."], "only used with --dataset mnist or cifar100"),
        (["--label-noise", "1"], "must be in [0, 1)"),
        (["--dataset", "digits", "--student-width", "8"], "MLP students"),
        (["--jobs", "0"], "must be ≥ 1"),
        (["--normalize", "on", "--methods", "mokd-affine"], "mokd-affine has none"),
        (["--normalize", "sometimes"], "invalid choice"),
        (["--device", "cuda:99"], "CUDA"),
        (["--device", "tpu"], "device"),
    ],
)
def test_bad_input_exits_with_a_message_and_writes_nothing(tmp_path, capsys, arguments, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--out", str(out), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("below", ["", "sub/folder"])
def test_out_must_not_be_or_be_inside_a_file(tmp_path, capsys, below):
    target = tmp_path / "results"
    target.write_text("keep me")
    with pytest.raises(SystemExit):
        main(["distill", "--out", str(target / below)])
    assert "exists and is not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_missing_optional_packages_are_named(tmp_path, capsys, monkeypatch):
    real_find_spec = cli.find_spec
    monkeypatch.setattr(
        cli, "find_spec", lambda name: None if name == "tqdm" else real_find_spec(name)
    )
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "missing tqdm" in capsys.readouterr().err
    assert not out.exists()


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["mnist1d", "mnist"])
def test_the_command_line_defaults_are_the_configs(dataset):
    """Each setting is declared once, on DistillConfig: no arguments give its resolved defaults."""
    args = cli.build_parser().parse_args(["distill", "--dataset", dataset])
    config = cli._config(args)
    assert config == DistillConfig(dataset=dataset).resolved()
    defaults = DATASETS[dataset].defaults
    assert (config.epochs, config.lr, config.methods) == (
        defaults.epochs,
        defaults.lr,
        defaults.methods,
    )
    assert config.out == Path("runs") / dataset


def test_options_set_the_fields_they_name(tmp_path):
    argv = ["distill", "--normalize", "on", "--features", "off", "--label-noise", "0.2"]
    argv += ["--methods", "pcgrad", "hinton-kd-w3", "--out", str(tmp_path), "--jobs", "3"]
    config = cli._config(cli.build_parser().parse_args(argv))
    assert (config.normalize, config.features, config.label_noise) == (True, False, 0.2)
    assert config.methods == ("pcgrad", "hinton-kd-w3") and config.jobs == 3
    assert config.out == tmp_path
