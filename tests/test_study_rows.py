"""The rows and settings of the MNIST studies: feature rows, DOT, PCD (task first), the long
preset, per-method seeds, the held-out validation split and the paired differences."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch
import torchjd.aggregation
from helpers import tiny_digits

from gradbalance import IndefiniteSubspaceProjector, VkDProjector
from gradbalance.experiments.config import DistillConfig
from gradbalance.experiments.datasets import DATASETS, load_dataset, make_student
from gradbalance.experiments.distill import run_distill
from gradbalance.experiments.dot import DistillationOrientedTrainer, DotUpdate
from gradbalance.experiments.methods import (
    DOT_LR,
    DOT_WEIGHTS,
    MNIST_LONG_METHODS,
    MNIST_METHODS,
    Balanced,
    MethodSettings,
    TaskFirst,
    build,
    parse_method,
)
from gradbalance.experiments.report import paired_differences

# Hinton's MNIST setting: the logits only unless a row insists on its projector.
SETTINGS = MethodSettings(lr=1e-3, weight_decay=0.0, temperature=2.0, features=False)


def built(name, digits, teacher):
    torch.manual_seed(0)
    student = make_student("digits", digits.input_shape, digits.num_classes)
    objectives, update = build(parse_method(name), student, teacher, SETTINGS)
    output = student(digits.x_train[:16])
    losses = objectives(output, digits.x_train[:16], digits.y_train[:16], torch.arange(16))
    return student, objectives, update, losses


@pytest.mark.parametrize(
    ("name", "projector", "k"),
    [
        ("mokd-subspace", IndefiniteSubspaceProjector, 2),
        ("mokd-subspace-k3", IndefiniteSubspaceProjector, 3),
        ("mokd-vkd", VkDProjector, 2),
        ("vkd", VkDProjector, 2),
        ("mokd-exact", type(None), 2),
    ],
)
def test_feature_rows_keep_their_projector_when_features_are_off(
    digits, teacher, name, projector, k
):
    _, objectives, update, losses = built(name, digits, teacher)
    assert isinstance(objectives.projector, projector)
    assert len(losses) == k
    if objectives.projector is not None:
        projector_params = {id(p) for p in objectives.projector.parameters()}
        optimizer_params = {id(p) for g in update.optimizer.param_groups for p in g["params"]}
        assert projector_params <= optimizer_params


def test_k3_objectives_are_kl_feature_and_ce_separately(digits, teacher):
    _, _, _, paired = built("mokd-subspace", digits, teacher)
    _, _, _, separate = built("mokd-subspace-k3", digits, teacher)
    torch.testing.assert_close(separate[0] + separate[1], paired[0])
    torch.testing.assert_close(separate[2], paired[1])


def test_dot_row_is_dots_trainer_with_its_weights_and_lr(digits, teacher):
    _, _, update, _ = built("dot", digits, teacher)
    assert isinstance(update, DotUpdate) and update.weights == DOT_WEIGHTS
    assert isinstance(update.optimizer, DistillationOrientedTrainer)
    assert update.optimizer.param_groups[0]["lr"] == DOT_LR
    assert update.optimizer.param_groups[0]["weight_decay"] == SETTINGS.weight_decay
    swept = parse_method("dot-lr0.03")
    assert swept.trainer == "dot" and swept.lr == 0.03
    for bad in ("dot-lr0", "hinton-kd-lr0.1", "dot-w2"):
        with pytest.raises(ValueError):
            parse_method(bad)


def test_pcd_sees_the_task_first():
    """π = R·PCD(R G R): the task's row of G becomes PCD's primary objective."""
    gram = torch.tensor([[4.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    ours = TaskFirst(torchjd.aggregation.PCDWeighting())(gram)
    theirs = torchjd.aggregation.PCDWeighting()(gram.flip(0, 1))
    torch.testing.assert_close(ours, theirs.flip(0))
    # PCD scales the direction to the primary gradient's norm: ‖Σ π_i g_i‖ = ‖g_task‖ = 1
    assert (ours @ gram @ ours).item() == pytest.approx(1.0, rel=1e-9)


def test_pcd_row_balances_with_the_task_first(digits, teacher):
    _, _, update, _ = built("pcd", digits, teacher)
    assert isinstance(update, Balanced)
    assert update.optimizer.mode == "exact"


def test_the_long_preset_fills_what_the_command_line_leaves_open():
    long = DistillConfig(dataset="mnist", preset="long").resolved()
    preset = DATASETS["mnist"].presets["long"]
    assert long.methods == MNIST_LONG_METHODS and long.epochs == preset.settings["epochs"]
    assert long.seed_count("student") == 5 and long.seed_count("upgrad") == 3
    assert {"dot", "pcd", "imtl-g", "upgrad", "mokd-exact"} <= set(long.methods)
    # --seeds wins over the preset's per-method seeds (one cell: --seeds 1)
    one = DistillConfig(dataset="mnist", preset="long", seeds=1, methods=("mokd-exact",))
    assert (
        one.resolved().seed_count("mokd-exact") == 1
        and one.resolved().epochs == preset.settings["epochs"]
    )
    # --methods beside the preset: the preset's seeds for those methods only
    some = DistillConfig(dataset="mnist", preset="long", methods=("dot", "student")).resolved()
    assert some.seeds_for == (("student", 5),) and some.seed_count("dot") == 3
    with pytest.raises(ValueError, match="mnist only"):
        DistillConfig(dataset="digits", preset="long").resolved()
    assert {"dot", "pcd", "mokd-subspace", "mokd-subspace-k3", "mokd-vkd"} <= set(MNIST_METHODS)


def test_validation_holds_out_the_end_of_the_training_set():
    splits = load_dataset("digits")
    held = splits.validation(100)
    assert torch.equal(held.x_test, splits.x_train[-100:])
    assert torch.equal(held.x_train, splits.x_train[:-100])
    assert len(held.y_train) + len(held.y_test) == len(splits.y_train)
    with pytest.raises(ValueError, match="--validation"):
        splits.validation(len(splits.y_train))


def test_paired_differences_against_the_best_fixed_weight():
    methods = {
        "hinton-kd": {"errors_mean": 12.0, "errors": [12, 13, 11]},
        "hinton-kd-w1": {"errors_mean": 10.0, "errors": [10, 11, 9]},
        "mokd-exact": {"errors_mean": 8.0, "errors": [7, 9, 8, 6, 10]},
    }
    paired = paired_differences(methods)
    assert paired["reference"] == "hinton-kd-w1"
    entry = paired["methods"]["mokd-exact"]
    diffs = [-3, -2, -1]  # over the three seeds both ran
    assert entry["diffs"] == diffs and entry["n"] == 3
    assert (entry["fewer"], entry["more"]) == (3, 0)
    half = 4.303 * statistics.stdev(diffs) / 3**0.5  # t(0.975, 2 df)
    assert entry["low"] == pytest.approx(-2 - half) and entry["high"] == pytest.approx(-2 + half)
    assert paired_differences({"student": {"errors_mean": 1, "errors": [1]}}) == {}


def test_per_method_seeds_and_epoch_errors_end_to_end(tmp_path):
    config = tiny_digits(
        methods=("student", "hinton-kd-w1", "dot"),
        seeds=1,
        seeds_for=(("student", 2), ("hinton-kd-w1", 2)),
        epochs=2,
        out=tmp_path,
    )
    outcome = run_distill(config, "test")
    methods = outcome.results["methods"]
    assert len(methods["student"]["errors"]) == 2 and len(methods["dot"]["errors"]) == 1
    assert outcome.results["paired"]["reference"] == "hinton-kd-w1"
    history = json.loads((tmp_path / "history.json").read_text())
    run = history["student"][1]
    assert len(run["test_errors_per_epoch"]) == 2
    assert run["test_errors_per_epoch"][-1] == run["test_errors"]
    assert dataclasses.asdict(config)["seeds_for"] == (("student", 2), ("hinton-kd-w1", 2))


def test_every_method_has_its_own_style_and_pi_off_the_simplex_stays_in_the_axes():
    from matplotlib.figure import Figure

    from gradbalance.experiments.plots import method_styles, plot_step_statistic

    names = [f"m{i}" for i in range(20)]
    styles = method_styles(names)
    assert len({(s.color, s.marker) for s in styles.values()}) == 20
    assert len({s.color for s in styles.values()}) == 20
    history = {
        "pcgrad": [{"steps": {"pi_distill": {"step": [0, 1, 2], "value": [0.4, 1.7, -0.3]}}}]
    }
    axes = Figure().subplots()
    assert plot_step_statistic(history, "pi_distill", lambda v: v, "π", "π", None, axes=axes)
    low, high = axes.get_ylim()
    assert low <= -0.3 and high >= 1.7


def test_headline_names_the_best_and_the_paired_differences():
    from gradbalance.experiments.report import headline

    methods = {
        "student": {"errors_mean": 15.0, "errors": [15, 15]},
        "hinton-kd-w1": {"errors_mean": 10.0, "errors": [10, 10]},
        "mokd-exact": {"errors_mean": 8.5, "errors": [8, 9]},
    }
    line = headline({"methods": methods, "paired": paired_differences(methods)})
    assert line.startswith("Fewest test errors: mokd-exact (8.5 on average)")
    assert "hinton-kd-w1: mokd-exact -1.5 (2 of 2 seeds fewer)" in line
    assert "student" not in line.split(":", 2)[-1]


def test_the_main_preset_is_the_readme_job():
    main = DistillConfig(dataset="mnist", preset="main").resolved()
    assert main.methods == ("student", "hinton-kd-w1", "mokd-exact", "mokd-representation")
    assert {main.seed_count(name) for name in main.methods} == {2}


def test_finished_runs_are_reused_only_with_the_same_settings(tmp_path):
    config = tiny_digits(methods=("student",), seeds=1, epochs=1, train_size=128, out=tmp_path)
    run_distill(config, "first")
    stored = tmp_path / "runs" / "student-seed0.json"
    record = json.loads(stored.read_text())
    record["history"]["test_errors"] = 12345  # a mark: only a reused run reports it
    stored.write_text(json.dumps(record))

    more = run_distill(dataclasses.replace(config, seeds=2), "more seeds")
    errors = more.results["methods"]["student"]["errors"]
    assert errors[0] == 12345 and errors[1] != 12345
    assert (tmp_path / "runs" / "student-seed1.json").exists()

    stored = run_distill(dataclasses.replace(config, seeds=2, jobs=2), "all stored")
    assert stored.results["methods"]["student"]["errors"] == errors  # no process started

    changed = run_distill(dataclasses.replace(config, lr=3e-3), "another lr")
    assert changed.results["methods"]["student"]["errors"][0] != 12345


def test_k3_records_every_pairs_conflict(digits, teacher):
    from gradbalance.experiments.report import summarize_method
    from gradbalance.experiments.training import History, step_statistics

    _, _, update, losses = built("mokd-subspace-k3", digits, teacher)
    stats = update(losses, None)
    scalars = step_statistics(losses, stats)
    gram = stats["gram"]
    assert set(scalars) >= {"conflict", "conflict_0_2", "conflict_1_2"}
    assert scalars["conflict_1_2"] == gram[1, 2] and scalars["conflict"] == gram[0, 1]
    steps = {"conflict_1_2": {"step": [0, 1, 2, 3], "value": [-1.0, 2.0, -3.0, 4.0]}}
    summary = summarize_method([History([0.5], 5, steps, 1.0)])
    assert summary["conflict_1_2_share"] == 0.5


def test_the_hinton_preset_chooses_on_held_out_data_and_keeps_the_slots_seeds(tmp_path):
    """The fixed weight and DOT's lr are chosen on the last 10,000 training images (a study of
    their own in <out>/selection, never the test set); the chosen rows then run with the slots'
    seeds, and results.json records the choice, the paired differences to the chosen weight and
    to IMTL-G, and Hinton et al.'s numbers."""
    config = DistillConfig(
        dataset="mnist",
        preset="hinton",
        epochs=1,
        teacher_epochs=1,
        train_size=200,
        test_size=100,
        jobs=1,
        progress=False,
        out=tmp_path,
    )
    results = run_distill(config, "hinton").results
    selection = json.loads((tmp_path / "selection" / "results.json").read_text())
    assert selection["evaluated_on"] == "validation" and selection["config"]["validation"] == 10_000
    scores = {name: entry["errors_mean"] for name, entry in selection["methods"].items()}
    for slot in ("fixed-weight", "dot"):
        chosen = results["selection"][slot]
        assert chosen["validation_errors"] == {
            name: scores[name] for name in chosen["validation_errors"]
        }
        best = min(chosen["validation_errors"].values())
        assert chosen["validation_errors"][chosen["chosen"]] == best
        assert len(results["methods"][chosen["chosen"]]["errors"]) == 5  # the slot's seeds
    fixed = results["selection"]["fixed-weight"]
    assert {"hinton-kd-w0.1", "hinton-kd-w0.25", "hinton-kd-w0.5", "hinton-kd-w1"} <= set(
        fixed["validation_errors"]
    )
    assert {"hinton-kd-w3", "hinton-kd"} <= set(fixed["validation_errors"])
    assert results["paired"]["reference"] == fixed["chosen"]
    assert results["paired_rival"]["reference"] == "imtl-g"
    assert results["evaluated_on"] == "test" and "74" in results["published"]
    assert all(len(summary["errors"]) == 5 for summary in results["methods"].values())


def test_headline_without_a_balanced_row_names_only_the_best():
    from gradbalance.experiments.report import headline

    methods = {
        "student": {"errors_mean": 155.0, "errors": [155]},
        "hinton-kd-w1": {"errors_mean": 111.0, "errors": [111]},
    }
    paired = paired_differences(methods)
    assert paired["reference"] == "hinton-kd-w1"
    results = {"methods": methods, "paired": paired}
    assert headline(results) == "Fewest test errors: hinton-kd-w1 (111.0 on average)."
