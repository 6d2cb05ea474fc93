"""Methods, the training loop, the teacher cache and the report of ``gradbalance distill``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_digits

from gradbalance import IndefiniteSubspaceProjector, MultiObjectiveOptimizer, VkDProjector
from gradbalance.experiments.augment import Augmentation
from gradbalance.experiments.data import Splits, with_label_noise
from gradbalance.experiments.datasets import DATASETS, make_student
from gradbalance.experiments.distill import run_distill
from gradbalance.experiments.methods import (
    METHODS,
    Balanced,
    FixedSum,
    MethodSettings,
    TaskObjective,
    TeacherTargets,
    build,
    parse_method,
    shared_representation,
)
from gradbalance.experiments.report import format_table, summarize
from gradbalance.experiments.teacher import load_or_train_teacher
from gradbalance.experiments.training import History, TrainConfig, train
from gradbalance.weighting import min_norm_weights

SETTINGS = MethodSettings(lr=1e-3, weight_decay=0.0, temperature=2.0, stats_every=3)
TINY_DIGITS = tiny_digits()


def fresh_student(digits: Splits, seed: int = 0):
    torch.manual_seed(seed)
    return make_student("digits", digits.input_shape, digits.num_classes)


def first_batch(digits: Splits, size: int = 16):
    return digits.x_train[:size], digits.y_train[:size], torch.arange(size)


def test_parse_method_knows_the_methods_and_the_sweep():
    assert parse_method("mokd-exact") is METHODS["mokd-exact"]
    swept = parse_method("kd-fixed-w0.25")
    assert (swept.distill_weight, swept.projector, swept.balance) == (0.25, "subspace", None)
    hinton = parse_method("hinton-kd-w3")
    assert (hinton.distill_weight, hinton.projector, hinton.teacher) == (3.0, None, True)
    assert (
        parse_method("upgrad").weighting == "upgrad" and parse_method("upgrad").balance == "exact"
    )
    for bad in ("kd-fixed-w", "kd-fixed-w-1", "kd-fixed-w1e3", "mokd", "upgrad-w2"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)
    with pytest.raises(ValueError, match="must be > 0"):
        parse_method("kd-fixed-w0.0")


def test_build_chooses_objectives_and_update_per_method(digits, teacher):
    student = fresh_student(digits)
    objectives, update = build(METHODS["student"], student, teacher, SETTINGS)
    assert isinstance(objectives, TaskObjective) and isinstance(update, FixedSum)
    assert update.optimizer.param_groups[0]["params"] == list(student.parameters())

    objectives, update = build(parse_method("kd-fixed-w3"), student, teacher, SETTINGS)
    assert isinstance(objectives.projector, IndefiniteSubspaceProjector)
    assert update.weights == [3.0, 1.0]
    optimized = update.optimizer.param_groups[0]["params"]
    assert len(optimized) == len(list(student.parameters())) + len(
        list(objectives.projector.parameters())
    )

    objectives, update = build(METHODS["vkd"], student, teacher, SETTINGS)
    assert isinstance(objectives.projector, VkDProjector) and isinstance(update, FixedSum)

    _, update = build(METHODS["mokd-amortized"], student, teacher, SETTINGS)
    assert isinstance(update, Balanced) and isinstance(update.optimizer, MultiObjectiveOptimizer)
    assert (update.optimizer.mode, update.optimizer.stats_every) == ("amortized", 3)
    _, update = build(METHODS["mokd-exact"], student, teacher, SETTINGS)
    assert update.optimizer.mode == "exact" and not update.optimizer.normalize
    assert update.optimizer.param_groups[0]["lr"] == SETTINGS.lr


def test_same_seed_gives_the_same_student_and_projector_for_every_method(digits, teacher):
    inits = []
    for name in ("kd-fixed", "mokd-exact", "mokd-amortized"):
        student = fresh_student(digits, seed=4)
        objectives, _ = build(METHODS[name], student, teacher, SETTINGS)
        inits.append([*student.state_dict().values(), *objectives.projector.state_dict().values()])
    for other in inits[1:]:
        assert all(torch.equal(a, b) for a, b in zip(inits[0], other, strict=True))


def test_distill_objectives_are_the_papers_grouping(digits, teacher):
    student = fresh_student(digits)
    objectives, _ = build(METHODS["kd-fixed"], student, teacher, SETTINGS)
    x, y, index = first_batch(digits)
    distill, task = objectives(student(x), x, y, index)
    target = teacher.teacher(x)
    output = student(x)
    log_q = F.log_softmax(output.logits / 2, dim=1)
    log_p = F.log_softmax(target.logits / 2, dim=1)
    kl = 4 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    feature = objectives.projector.loss(output.features, target.features)
    torch.testing.assert_close(distill, kl + feature)
    torch.testing.assert_close(task, F.cross_entropy(output.logits, y))


@pytest.mark.parametrize(("name", "log"), [("kd-fixed-w0.5", False), ("kd-log", True)])
def test_fixed_sum_steps_on_the_weighted_gradient(digits, teacher, name, log):
    student = fresh_student(digits)
    objectives, update = build(parse_method(name), student, teacher, SETTINGS)
    assert update.log == log
    update.optimizer = torch.optim.SGD(update.optimizer.param_groups[0]["params"], lr=0.1)
    x, y, index = first_batch(digits)
    output = student(x)
    losses = objectives(output, x, y, index)
    weight = parse_method(name).distill_weight
    # log: w ∇L_d / L_d + ∇L_t / L_t
    weights = [weight / losses[0].item(), 1 / losses[1].item()] if log else [weight, 1.0]
    total = weights[0] * losses[0] + weights[1] * losses[1]
    expected = torch.autograd.grad(total, list(student.parameters()), retain_graph=True)
    before = [p.detach().clone() for p in student.parameters()]
    assert update(losses, output) == {}
    for old, new, grad in zip(before, student.parameters(), expected, strict=True):
        torch.testing.assert_close(new.detach(), old - 0.1 * grad)


def test_mokd_representation_balances_at_the_features_both_losses_read(
    digits, teacher, monkeypatch
):
    student = fresh_student(digits)
    objectives, update = build(METHODS["mokd-representation"], student, teacher, SETTINGS)
    assert isinstance(update, Balanced) and update.optimizer.mode == "representation"
    assert not update.optimizer.normalize
    x, y, index = first_batch(digits)
    output = student(x)
    losses = objectives(output, x, y, index)
    representation = shared_representation(output)
    assert representation is output.features
    # Both losses reach the features: the feature term directly, KL and CE through the head.
    rows = []
    for loss in losses:
        (grad,) = torch.autograd.grad(loss.log(), representation, retain_graph=True)
        assert grad.abs().sum() > 0
        rows.append(grad.flatten().double())
    jacobian = torch.stack(rows)
    expected = min_norm_weights(jacobian @ jacobian.T)
    passed = []
    backward = update.optimizer.backward

    def spy(losses, **kwargs):
        passed.append(kwargs["representation"])
        return backward(losses, **kwargs)

    monkeypatch.setattr(update.optimizer, "backward", spy)
    stats = update(losses, output)
    assert len(passed) == 1 and passed[0] is output.features
    torch.testing.assert_close(stats["weights"], expected, rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in objectives.projector.parameters())


def test_mokd_representation_trains_end_to_end(tmp_path):
    config = dataclasses.replace(
        TINY_DIGITS, methods=("mokd-representation",), seeds=1, epochs=4, out=tmp_path
    )
    outcome = run_distill(config, "gradbalance distill --methods mokd-representation")
    summary = outcome.results["methods"]["mokd-representation"]
    assert len(summary["accuracies"]) == 1 and 0 <= summary["accuracy_mean"] <= 1
    run = json.loads((tmp_path / "history.json").read_text())["mokd-representation"][0]
    steps = run["steps"]
    assert steps["pi_distill"]["step"] == list(range(12))  # 4 epochs of 3 batches
    assert all(0 <= value <= 1 for value in steps["pi_distill"]["value"])
    for name in ("loss_distill", "loss_task"):
        values = steps[name]["value"]
        assert sum(values[-3:]) < sum(values[:3]), name  # last epoch below the first


class Spy:
    """Objectives that record the inputs and labels of every batch: CE on the labels."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def __call__(self, output, inputs, labels, index):
        self.inputs.append(inputs)
        self.labels.append(labels)
        return [F.cross_entropy(output.logits, labels)]


def spy_run(digits: Splits, seed: int, augmentation: Augmentation | None) -> Spy:
    student = fresh_student(digits)
    spy = Spy()
    update = FixedSum(torch.optim.AdamW(student.parameters(), lr=1e-3), [1.0])
    train(student, spy, update, digits, TrainConfig(epochs=2, batch_size=32), seed, augmentation)
    return spy


def test_loop_visits_every_example_once_per_epoch_in_a_seeded_order(digits):
    first = spy_run(digits, seed=1, augmentation=None)
    assert len(first.labels) == 2 * 3
    for epoch in range(2):
        labels = torch.cat(first.labels[3 * epoch : 3 * epoch + 3])
        assert torch.equal(labels.sort().values, digits.y_train.sort().values)
    again = spy_run(digits, seed=1, augmentation=Augmentation(max_shift=1))
    other = spy_run(digits, seed=2, augmentation=None)
    assert all(torch.equal(a, b) for a, b in zip(first.labels, again.labels, strict=True))
    assert not torch.equal(torch.cat(first.labels), torch.cat(other.labels))
    # Augmentation changes the inputs, not which examples come in which batch.
    assert not torch.equal(torch.cat(first.inputs), torch.cat(again.inputs))


def test_loop_records_curves_losses_and_optimizer_statistics(digits, teacher):
    student = fresh_student(digits)
    objectives, update = build(METHODS["mokd-amortized"], student, teacher, SETTINGS)
    config = TrainConfig(epochs=2, batch_size=32)
    epochs_seen = []
    history = train(
        student,
        objectives,
        update,
        digits,
        config,
        seed=0,
        on_epoch=lambda epoch, accuracy: epochs_seen.append((epoch, accuracy)),
    )
    assert [epoch for epoch, _ in epochs_seen] == [0, 1]
    assert history.test_accuracy == [accuracy for _, accuracy in epochs_seen]
    assert history.steps["loss_task"]["step"] == list(range(6))
    assert history.steps["pi_distill"]["step"] == list(range(6))
    assert history.steps["conflict"]["step"] == [0, 3]  # stats_every = 3
    assert history.steps["pi_distill"]["value"][0] == pytest.approx(0.5)
    assert history.seconds > 0


def test_teacher_is_cached_and_retrained_when_its_settings_change(digits, tmp_path):
    cache = tmp_path / "teacher.pt"
    config = TrainConfig(epochs=1, batch_size=32)
    augmentation = Augmentation(max_shift=1)
    network = DATASETS["digits"].teachers["cnn"]
    first, cached = load_or_train_teacher("cnn", network, digits, config, augmentation, cache)
    assert not cached and cache.is_file()
    again, cached = load_or_train_teacher("cnn", network, digits, config, augmentation, cache)
    assert cached
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in again.parameters()) and not again.training
    _, cached = load_or_train_teacher(
        "cnn", network, digits, TrainConfig(epochs=2, batch_size=32), augmentation, cache
    )
    assert not cached
    other_data = dataclasses.replace(digits, x_train=digits.x_train + 1)
    _, cached = load_or_train_teacher("cnn", network, other_data, config, augmentation, cache)
    assert not cached


def test_summary_and_table():
    conflicts = {"conflict": {"step": [0, 1, 2, 3], "value": [0.5, -0.1, 0.2, -0.3]}}
    runs = {
        "student": [History([0.5, 0.6], 40, {}, 1.0), History([0.5, 0.7], 30, {}, 3.0)],
        "mokd-exact": [History([0.6, 0.8], 20, conflicts, 2.0), History([0.6, 0.8], 20, {}, 2.0)],
    }
    header = {"dataset": "digits", "seeds": [0, 1], "epochs": 2, "teacher_errors": 10}
    results = summarize(runs, header, teacher_accuracy=0.9)
    student = results["methods"]["student"]
    assert student["accuracies"] == [0.6, 0.7]
    assert student["accuracy_mean"] == pytest.approx(0.65)
    assert student["accuracy_std"] == pytest.approx(0.0707107, abs=1e-6)
    assert (student["errors"], student["errors_mean"]) == ([40, 30], 35)
    assert student["errors_std"] == pytest.approx(7.0710678)
    assert student["seconds_mean"] == 2.0 and "conflict_share" not in student
    assert results["methods"]["mokd-exact"]["conflict_share"] == 0.5  # of the runs that record it
    table = format_table(results).splitlines()
    assert table[0] == "digits: teacher 0.9000 (10 errors), 2 seed(s) x 2 epochs"
    row = table[3].split()
    assert row[:5] == ["mokd-exact", "0.8000", "±", "0.0000", "+0.1500"]
    assert row[5:9] == ["20.0", "±", "0.0", "50.0%"] and row[-2:] == ["20", "20"]


def test_precomputed_teacher_targets_equal_the_teacher_on_the_batch(digits, teacher):
    table = TeacherTargets(teacher.teacher, digits.x_train)
    index = torch.tensor([5, 0, 17, 3])
    looked_up = table(torch.empty(0), index)
    live = teacher(digits.x_train[index], index)
    torch.testing.assert_close(looked_up.logits, live.logits)
    torch.testing.assert_close(looked_up.features, live.features)


def test_hinton_kd_is_the_logits_only_pair_with_the_t_squared_kl(digits, teacher):
    student = fresh_student(digits)
    objectives, update = build(METHODS["hinton-kd"], student, teacher, SETTINGS)
    assert objectives.projector is None and update.weights == [9.0, 1.0]
    assert update.optimizer.param_groups[0]["params"] == list(student.parameters())
    x, y, index = first_batch(digits)
    output = student(x)
    distill, task = objectives(output, x, y, index)
    log_q = F.log_softmax(output.logits / 2, dim=1)
    log_p = F.log_softmax(teacher.teacher(x).logits / 2, dim=1)
    torch.testing.assert_close(
        distill, 4 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    )
    torch.testing.assert_close(task, F.cross_entropy(output.logits, y))


def test_without_features_the_subspace_methods_distil_the_logits_and_vkd_keeps_its_own(
    digits, teacher
):
    logits_only = dataclasses.replace(SETTINGS, features=False)
    for name in ("kd-fixed", "mokd-exact", "mokd-amortized", "upgrad"):
        student = fresh_student(digits)
        objectives, update = build(METHODS[name], student, teacher, logits_only)
        assert objectives.projector is None, name
        assert update.optimizer.param_groups[0]["params"] == list(student.parameters())
    objectives, _ = build(METHODS["vkd"], fresh_student(digits), teacher, logits_only)
    assert isinstance(objectives.projector, VkDProjector)


@pytest.mark.parametrize("name", ["upgrad", "pcgrad", "imtl-g", "aligned-mtl", "dualproj"])
def test_torchjd_baselines_are_exact_mode_with_torchjd_weightings(digits, teacher, name):
    aggregation = pytest.importorskip("torchjd.aggregation")
    student = fresh_student(digits)
    objectives, update = build(METHODS[name], student, teacher, SETTINGS)
    assert isinstance(objectives.projector, IndefiniteSubspaceProjector)
    optimizer = update.optimizer
    assert optimizer.mode == "exact"
    weighting = optimizer.balancer.options.weighting
    assert isinstance(weighting, aggregation.Weighting)
    x, y, index = first_batch(digits)
    output = student(x)
    stats = update(objectives(output, x, y, index), output)
    torch.manual_seed(0)
    expected = type(weighting)()(stats["gram"])
    torch.testing.assert_close(stats["weights"], expected)


def test_label_noise_moves_the_asked_share_of_labels_to_other_classes(digits):
    noisy = with_label_noise(digits, 0.25)
    changed = noisy.y_train != digits.y_train
    assert changed.sum() == round(0.25 * len(digits.y_train))
    assert torch.equal(noisy.x_train, digits.x_train) and torch.equal(noisy.y_test, digits.y_test)
    assert torch.equal(with_label_noise(digits, 0.25).y_train, noisy.y_train)  # fixed seed
    assert with_label_noise(digits, 0.0) is digits


def test_parallel_jobs_give_the_results_of_one_process(tmp_path):
    config = dataclasses.replace(
        TINY_DIGITS, methods=("student", "mokd-exact"), seeds=2, epochs=1, train_size=128
    )
    one = run_distill(dataclasses.replace(config, out=tmp_path / "one", jobs=1), "one")
    two = run_distill(dataclasses.replace(config, out=tmp_path / "two", jobs=2), "two")
    for name in config.methods:
        for key in ("accuracies", "errors"):
            assert one.results["methods"][name][key] == two.results["methods"][name][key]
