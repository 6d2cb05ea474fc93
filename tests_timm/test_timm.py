"""gradbalance.integrations.timm inside timm's own tasks and loss-scaler protocol.

Tiny randomly initialised ViTs on random 28 × 28 single-channel images; float64 where values are
compared exactly. The balanced ``.grad`` is checked against the min-norm closed form for k = 2 on
per-task gradients from ``torch.autograd.grad``; accumulation, clipping and loss scaling against
timm's fixed-weight path (``loss.backward()`` / ``NativeScaler``) under a weighting that gives
the task's fixed weights back.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import run_on_ranks
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.task import (
    ClassificationTask,
    FeatureDistillationTask,
    LogitDistillationTask,
    TokenDistillationTask,
    resume_task_checkpoint,
)
from timm.utils import NativeScaler, dispatch_clip_grad

from gradbalance import (
    Balancer,
    IndefiniteSubspaceProjector,
    MultiObjectiveOptimizer,
    VkDProjector,
    cross_entropy_floor,
)
from gradbalance.integrations.timm import (
    BalancedScaler,
    ProjectedFeatureDistillationTask,
    ProjectedFeatureModule,
    task_losses,
)

STUDENT_NORM = {"mean": (0.25,), "std": (0.5,)}
TEACHER_NORM = {"mean": (0.5,), "std": (0.25,)}  # differs: the task converts every batch
BALANCED_KINDS = ["logit", "token", "vkd", "indefinite"]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "timm_distill.py"


def vit(width: int, norm: dict, distilled: bool = False) -> torch.nn.Module:
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    return timm.create_model(
        name,
        pretrained=False,
        in_chans=1,
        num_classes=4,
        img_size=28,
        patch_size=14,
        embed_dim=width,
        depth=1,
        num_heads=2,
        pretrained_cfg_overlay=norm,
    )


def make_task(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs):
    """A distillation task of ``kind``: a tiny teacher (width 16, the same for every seed) and a
    student (width 8) and projector initialised from ``seed``; ``kwargs`` go to the task."""
    torch.manual_seed(0)
    teacher = vit(16, TEACHER_NORM).to(dtype)
    with torch.no_grad():  # a confident teacher, as a trained one is (timm's init is near uniform)
        teacher.head.weight.normal_(std=1.0)
    torch.manual_seed(seed)
    student = vit(8, STUDENT_NORM, distilled=kind == "token").to(dtype)
    common = {"dtype": dtype, "verbose": False, **kwargs}
    if kind == "logit":
        return LogitDistillationTask(student, teacher, temperature=2.0, **common)
    if kind == "token":
        return TokenDistillationTask(student, teacher, temperature=2.0, **common)
    if kind == "linear":  # timm's own feature task, its nn.Linear projection
        return FeatureDistillationTask(student, teacher, distill_loss_weight=5.0, **common)
    projector_type = VkDProjector if kind == "vkd" else IndefiniteSubspaceProjector
    projector = projector_type(teacher.num_features, student.num_features)
    return ProjectedFeatureDistillationTask(
        student, teacher, projector, distill_loss_weight=5.0, **common
    )


def batch(size: int = 8, dtype: torch.dtype = torch.float64, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 1, 28, 28, generator=generator, dtype=dtype)
    return images, torch.randint(0, 4, (size,), generator=generator)


def parameters(task) -> list[torch.Tensor]:
    return list(task.get_trainable_module().parameters())


def flat(tensors: list[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor:
    """One vector of ``tensors`` (None: zeros shaped as in ``like``)."""
    return torch.cat(
        [(torch.zeros_like(p) if t is None else t).flatten() for t, p in zip(tensors, like)]
    )


def flat_grad(task) -> torch.Tensor:
    params = parameters(task)
    return flat([p.grad for p in params], params)


def frozen_optimizer(task) -> torch.optim.Optimizer:
    """timm's optimizer (its decay / no-decay groups) with lr 0: ``.grad`` is what is checked."""
    return create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.0, weight_decay=0.0)


def log_loss_gradients(
    losses: dict[str, torch.Tensor], params: list[torch.Tensor], floors=(0.0, 0.0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """g_distill, g_task: g = ∇L / (L − m) by torch.autograd.grad, m the loss's floor."""
    return tuple(
        flat(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)
        / (loss.detach() - floor)
        for loss, floor in zip(losses.values(), floors)
    )


def min_norm_direction(
    losses: dict[str, torch.Tensor], params: list[torch.Tensor], floors=(0.0, 0.0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """π(distill) and d = π g_distill + (1 − π) g_task for the log-loss gradients: the closed
    form of the min-norm point of a segment, independent of the Balancer."""
    g1, g2 = log_loss_gradients(losses, params, floors)
    pi = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0.0, 1.0)
    return pi, pi * g1 + (1 - pi) * g2


def fixed_weights(task, window: list[dict[str, torch.Tensor]]):
    """A Balancer weighting that gives the task's fixed weighting back: the Balancer follows
    d = Σ π_i ∇L̄_i / L̄_i (L̄: the window's mean losses), so π_i = w_i · L̄_i gives
    d = w_distill ∇kd_loss + w_task ∇task_loss, what timm's loop backpropagates."""
    means = {
        name: torch.stack([task_losses(result)[name].detach() for result in window]).mean()
        for name in ("distill", "task")
    }

    def weighting(gram: torch.Tensor) -> torch.Tensor:
        weights = [
            task.distill_loss_weight * means["distill"],
            task.task_loss_weight * means["task"],
        ]
        return torch.stack(weights).to(gram)

    return weighting


def micro_batches(size: int = 8, count: int = 2, dtype: torch.dtype = torch.float64) -> list:
    images, labels = batch(size, dtype)
    return list(zip(images.chunk(count), labels.chunk(count)))


# -- task_losses -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "key"), [("logit", "kd_loss"), ("token", "distill_loss")])
def test_task_losses_names_the_distillation_and_the_task_loss(kind, key):
    result = make_task(kind)(*batch())
    losses = task_losses(result)
    assert list(losses) == ["distill", "task"]
    assert losses["distill"] is result[key] and losses["task"] is result["task_loss"]


def test_task_losses_refuses_an_output_with_nothing_to_balance():
    task = ClassificationTask(vit(8, STUDENT_NORM), verbose=False)
    with pytest.raises(KeyError, match="task_loss"):
        task_losses(task(*batch(dtype=torch.float32)))


def test_task_losses_refuses_the_fixed_weight_loss():
    result = make_task("logit")(*batch())
    with pytest.raises(TypeError, match="not `result\\['loss'\\]`"):
        task_losses(result["loss"])


# -- the balanced .grad --------------------------------------------------------------------------


# π is inside (0, 1) for logit, token and vkd here, at the vertex 0 for indefinite and linear.
@pytest.mark.parametrize("kind", [*BALANCED_KINDS, "linear"])
def test_balanced_grad_is_the_min_norm_combination_of_the_log_loss_gradients(kind):
    task = make_task(kind)
    optimizer = frozen_optimizer(task)
    result = task(*batch())
    pi, expected = min_norm_direction(task_losses(result), parameters(task))
    params = parameters(task)
    fixed = flat(torch.autograd.grad(result["loss"], params, retain_graph=True), params)
    scaler = BalancedScaler()
    scaler(result, optimizer)
    torch.testing.assert_close(scaler.balancer.weights[0], pi, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat_grad(task), expected, rtol=1e-9, atol=1e-12)
    cosine = torch.nn.functional.cosine_similarity(expected, fixed, dim=0)
    assert cosine < 0.999, "balancing changes the direction of the task's fixed weighting"


@pytest.mark.parametrize("kind", ["logit", "vkd"])
def test_micro_batches_balance_their_mean_as_one_batch(kind):
    task = make_task(kind)
    BalancedScaler()(task(*batch()), frozen_optimizer(task))
    whole = flat_grad(task)

    task = make_task(kind)
    optimizer, scaler = frozen_optimizer(task), BalancedScaler()
    first, last = micro_batches()
    scaler(task(*first), optimizer, need_update=False)
    assert all(p.grad is None for p in parameters(task)), "held until the window's last"
    scaler(task(*last), optimizer, need_update=True)
    torch.testing.assert_close(flat_grad(task), whole, rtol=1e-9, atol=1e-12)


# -- timm's loop: accumulation, clipping, loss scaling against the fixed-weight path -------------


def timm_fixed_update(task, clip_mode: str, clip_grad: float) -> None:
    """train.py without a loss scaler: loss / accum_steps backward per micro-batch, then on the
    last clip and step."""
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    parts = micro_batches()
    for images, labels in parts:
        (task(images, labels)["loss"] / len(parts)).backward()
    clip = task.get_clip_parameters(exclude_head="agc" in clip_mode)
    dispatch_clip_grad(clip, clip_grad, mode=clip_mode)
    optimizer.step()


def balanced_update(task, clip_mode: str, clip_grad: float) -> None:
    """The same with a BalancedScaler whose weighting is the task's fixed one."""
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    parts = micro_batches()
    results = [task(images, labels) for images, labels in parts]
    for result in results:
        result["loss"] /= len(parts)  # as train.py's _forward does, in place: the scaler ignores it
    scaler = BalancedScaler(Balancer(weighting=fixed_weights(task, results)))
    for index, result in enumerate(results):
        clip = task.get_clip_parameters(exclude_head="agc" in clip_mode)
        last = index == len(results) - 1
        scaler(result, optimizer, clip_grad, clip_mode, parameters=clip, need_update=last)


@pytest.mark.parametrize(
    ("clip_mode", "clip_grad"), [("norm", 0.1), ("value", 1e-3), ("agc", 1e-3)]
)
@pytest.mark.parametrize("kind", ["logit", "vkd"])
def test_accumulation_and_clipping_follow_timms_loop(kind, clip_mode, clip_grad):
    reference, task = make_task(kind), make_task(kind)
    before = [p.detach().clone() for p in parameters(task)]
    timm_fixed_update(reference, clip_mode, clip_grad)
    balanced_update(task, clip_mode, clip_grad)
    for expected, param in zip(parameters(reference), parameters(task)):
        torch.testing.assert_close(param, expected, rtol=1e-9, atol=1e-12)
    if clip_mode == "norm":  # the clipping was active: the unclipped step is another one
        assert torch.linalg.vector_norm(flat_grad(task)) == pytest.approx(clip_grad)
    if clip_mode == "value":
        assert flat_grad(task).abs().max() == pytest.approx(clip_grad)
    assert any(not torch.equal(p, b) for p, b in zip(parameters(task), before))


def test_loss_scaling_follows_timms_native_scaler():
    # float32 without autocast, so that both paths round alike: what is compared is the scaling,
    # unscaling, clipping and stepping around the backward.
    x, y = batch(dtype=torch.float32)
    steps = []
    for balanced in (False, True):
        task = make_task("logit", dtype=torch.float32)
        optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
        result = task(x, y)
        clip = {"clip_grad": 0.1, "parameters": task.get_clip_parameters()}
        if balanced:
            balancer = Balancer(weighting=fixed_weights(task, [result]))
            scaler = BalancedScaler(balancer, torch.amp.GradScaler("cpu"))
            scaler(result, optimizer, **clip)
            scale = scaler.grad_scaler.get_scale()
        else:
            native = NativeScaler(device="cpu")
            native(result["loss"], optimizer, **clip)
            scale = native.state_dict()["scale"]
        steps.append(([p.detach().clone() for p in parameters(task)], scale))
    (expected, expected_scale), (actual, scale) = steps
    assert scale == expected_scale == 2.0**16
    for param, reference in zip(actual, expected):
        torch.testing.assert_close(param, reference, rtol=1e-5, atol=1e-7)


def test_an_overflow_skips_the_step_and_halves_the_scale():
    task = make_task("vkd", dtype=torch.float32)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    before = [p.detach().clone() for p in parameters(task)]
    scaler = BalancedScaler(grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**127))
    scaler(task(*batch(dtype=torch.float32)), optimizer, clip_grad=1.0, parameters=parameters(task))
    assert scaler.grad_scaler.get_scale() == 2.0**126
    assert all(torch.equal(p, b) for p, b in zip(parameters(task), before))
    assert not torch.isfinite(flat_grad(task)).all()
    assert scaler.log_text() == "" and scaler.epoch_metrics() == {}, "a skipped step is no update"


# -- a task without a distillation loss (train.py without --kd-model-name) ----------------------


def classification_update(reference: str, clip_mode: str, create_graph: bool):
    """One update of two micro-batches of a ClassificationTask as train.py's train_one_epoch
    runs it (the loss divided in place by the accumulation steps), through a BalancedScaler or
    through ``reference``: timm's NativeScaler, or train.py's path without a loss scaler.
    Returns the .grad, the parameters and the grad scaler's state after the update."""
    torch.manual_seed(0)
    task = ClassificationTask(vit(8, STUDENT_NORM), verbose=False)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    scaler = {
        "balanced, native": BalancedScaler(grad_scaler=torch.amp.GradScaler("cpu")),
        "balanced, none": BalancedScaler(),
        "native": NativeScaler(device="cpu"),
    }.get(reference)
    parts = micro_batches(dtype=torch.float32)
    for index, (images, labels) in enumerate(parts):
        result = task(images, labels)
        result["loss"] /= len(parts)
        clip = task.get_clip_parameters(exclude_head="agc" in clip_mode)
        update = index == len(parts) - 1
        if isinstance(scaler, BalancedScaler):
            scaler(result, optimizer, 0.1, clip_mode, clip, create_graph, need_update=update)
        elif scaler is not None:
            scaler(result["loss"], optimizer, 0.1, clip_mode, clip, create_graph, update)
        else:  # train.py without a loss scaler
            result["loss"].backward(create_graph=create_graph)
            if update:
                dispatch_clip_grad(clip, 0.1, mode=clip_mode)
                optimizer.step()
    if isinstance(scaler, BalancedScaler):
        assert scaler.balancer.weights is None, "nothing was balanced"
        assert scaler.log_text() == "" and scaler.epoch_metrics() == {}
        state = scaler.grad_scaler.state_dict()  # {} where disabled
    else:
        state = {} if scaler is None else scaler.state_dict()
    return [p.grad.detach() for p in parameters(task)], parameters(task), state


# torch warns that create_graph=True ties .grad to the graph: what NativeScaler does too
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("clip_mode", ["norm", "agc"])
@pytest.mark.parametrize(
    ("balanced", "reference"), [("balanced, native", "native"), ("balanced, none", None)]
)
def test_without_a_distillation_loss_the_scaler_steps_as_timm_does(
    balanced, reference, clip_mode, create_graph
):
    grads, params, state = classification_update(balanced, clip_mode, create_graph)
    expected_grads, expected_params, expected_state = classification_update(
        reference, clip_mode, create_graph
    )
    assert state == expected_state
    for actual, expected in zip([*grads, *params], [*expected_grads, *expected_params]):
        assert torch.equal(actual, expected)


def test_an_output_without_a_loss_raises_naming_its_keys():
    task = make_task("logit")
    with pytest.raises(KeyError, match=r"'loss'.*got the keys \['output'\]"):
        BalancedScaler()({"output": torch.zeros(1)}, frozen_optimizer(task))


# -- what train.py logs: π, GrC, GrD -------------------------------------------------------------


def test_the_scaler_reports_pi_grc_and_grd_of_the_updates():
    task = make_task("logit")
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.5)
    scaler = BalancedScaler()
    expected = []  # per update: π(distill), π(task), GrC, GrD, cosine, at a vertex
    for seed in (1, 2, 3, 4):
        result = task(*batch(seed=seed))
        g1, g2 = log_loss_gradients(task_losses(result), parameters(task))
        pi, _ = min_norm_direction(task_losses(result), parameters(task))
        cosine = torch.nn.functional.cosine_similarity(g1, g2, dim=0).item()
        vertex = float(pi in (0.0, 1.0))
        norms = (g1.norm() / g2.norm()).item()
        expected.append([pi.item(), 1 - pi.item(), (g1 @ g2).item(), norms, cosine, vertex])
        scaler(result, optimizer)
        optimizer.zero_grad()
    means = [sum(column) / len(expected) for column in zip(*expected)]
    assert 0 < means[-1] < 1, "the updates include a vertex and an inner point"
    for pi, _, _, grd, cosine, _ in expected:  # the vertices, as docs/integrations/timm.md says
        assert (pi == 1.0) == (cosine >= grd) and (pi == 0.0) == (cosine >= 1 / grd)
    number = r"(-?[\d.e+-]+)"
    line = rf"  π\(distill\): {number} \({number}\)  GrC: {number}  GrD: {number}  cos: {number}"
    printed = [float(x) for x in re.fullmatch(line, scaler.log_text()).groups()]
    pi, _, grc, grd, cosine, _ = expected[-1]
    assert printed[:2] == pytest.approx([pi, means[0]], abs=5e-4)  # printed with 3 decimals
    assert printed[2:4] == pytest.approx([grc, grd], rel=5e-3)  # with 3 significant digits
    assert printed[4] == pytest.approx(cosine, abs=5e-4)
    metrics = scaler.epoch_metrics()
    assert list(metrics) == ["pi_distill", "pi_task", "grc", "grd", "cos", "pi_vertex"]
    assert list(metrics.values()) == pytest.approx(means, rel=1e-9)
    assert scaler.epoch_metrics() == {}, "the next epoch starts anew"


def test_a_held_micro_batch_is_not_reported():
    task = make_task("logit")
    scaler = BalancedScaler()
    first, _ = micro_batches()
    scaler(task(*first), frozen_optimizer(task), need_update=False)
    assert scaler.log_text() == "" and scaler.epoch_metrics() == {}


# -- label smoothing: the task loss's floor -------------------------------------------------------


def test_the_cross_entropy_floor_is_the_minimum_of_timms_label_smoothing_loss():
    classes, smoothing = 4, 0.1
    target = torch.full((1, classes), smoothing / classes, dtype=torch.float64)
    target[0, 2] += 1 - smoothing
    loss = LabelSmoothingCrossEntropy(smoothing)(target.log(), torch.tensor([2]))
    assert loss.item() == pytest.approx(cross_entropy_floor(classes, smoothing), rel=1e-12)


def test_with_label_smoothing_the_task_loss_is_balanced_above_its_floor():
    floor = cross_entropy_floor(4, 0.1)
    task = make_task("logit", criterion=LabelSmoothingCrossEntropy(0.1))
    result = task(*batch())
    losses = task_losses(result)
    pi, expected = min_norm_direction(losses, parameters(task), floors=(0.0, floor))
    pi_without_floor, _ = min_norm_direction(losses, parameters(task))
    scaler = BalancedScaler(Balancer(min_losses=[0.0, floor]))
    scaler(result, frozen_optimizer(task))
    torch.testing.assert_close(scaler.balancer.weights[0], pi, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat_grad(task), expected, rtol=1e-9, atol=1e-12)
    assert abs(pi - pi_without_floor) > 1e-3, "the floor changes π"


# -- a MultiObjectiveOptimizer, checkpoints, EMA -------------------------------------------------


def test_with_a_multi_objective_optimizer_the_scaler_does_what_opt_backward_does():
    x, y = batch()
    updated = []
    for through_scaler in (False, True):
        task = make_task("logit")
        timm_optimizer = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=1e-2)
        opt = MultiObjectiveOptimizer(timm_optimizer)
        result = task(x, y)
        if through_scaler:
            BalancedScaler(opt.balancer)(result, opt)
        else:
            opt.backward(task_losses(result))
            opt.step()
        updated.append(torch.cat([p.detach().flatten() for p in parameters(task)]))
    assert torch.equal(updated[0], updated[1])


def test_a_timm_checkpoint_keeps_the_projector_and_the_scaler(tmp_path):
    task = make_task("indefinite")
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=1e-2)
    scaler = BalancedScaler(Balancer(mode="amortized"))
    for seed in (1, 2):  # two updates: amortized mode's logits move
        scaler(task(*batch(seed=seed)), optimizer)
        optimizer.zero_grad()
    checkpoint = {
        **task.get_checkpoint_state(),
        "optimizer": optimizer.state_dict(),
        scaler.state_dict_key: scaler.state_dict(),
        "epoch": 0,
    }
    torch.save(checkpoint, tmp_path / "last.pth.tar")  # what timm's CheckpointSaver writes

    resumed = make_task("indefinite", seed=1)
    resumed_optimizer = create_optimizer_v2(resumed.get_trainable_module(), opt="adamw", lr=1e-2)
    resumed_scaler = BalancedScaler(Balancer(mode="amortized"))
    resume_task_checkpoint(
        resumed, str(tmp_path / "last.pth.tar"), resumed_optimizer, resumed_scaler, log_info=False
    )
    assert resumed_scaler.state_dict() == scaler.state_dict()
    x, y = batch(seed=3)
    expected, actual = task(x, y), resumed(x, y)
    for key in ("kd_loss", "task_loss"):  # the student and the projector came back
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-12, atol=0)


def test_the_ema_averages_the_student_and_the_projector():
    task = make_task("vkd")
    task.setup_ema(decay=0.5)
    before = {k: v.clone() for k, v in task.get_trainable_module().state_dict().items()}
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    # amortized mode starts at π = (½, ½): the projector moves on the first step
    BalancedScaler(Balancer(mode="amortized"))(task(*batch()), optimizer)
    task.update_ema()  # no step: the decay as set (timm gives step 1 a decay of 0)
    after = task.get_trainable_module().state_dict()
    average = task.get_trainable_module(ema=True).module.state_dict()
    original = "projection.parametrizations.projection.original"
    assert not torch.equal(after[original], before[original]), "the projector was trained"
    for key, value in average.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (before[key] + after[key]) / 2)
    assert isinstance(task.get_eval_model(ema=True), timm.models.VisionTransformer)


# -- the projector in timm's feature task --------------------------------------------------------


@pytest.mark.parametrize("kind", ["vkd", "indefinite"])
def test_the_projector_is_trainable_and_compares_with_the_normalised_teacher(kind):
    task = make_task(kind)
    module = task.get_trainable_module()
    assert isinstance(module, ProjectedFeatureModule)
    projector = module.projection
    assert isinstance(projector, VkDProjector if kind == "vkd" else IndefiniteSubspaceProjector)
    optimized = {id(p) for group in frozen_optimizer(task).param_groups for p in group["params"]}
    assert {id(p) for p in projector.parameters()} <= optimized
    assert {id(p) for p in projector.parameters()} <= {id(p) for p in task.get_clip_parameters()}

    x, y = batch()
    student, teacher = module.student, task.teacher.model
    teacher_input = (x * 0.5 + 0.25 - 0.5) / 0.25  # student normalisation undone, teacher's done
    with torch.no_grad():
        z_t = teacher.forward_head(teacher.forward_features(teacher_input), pre_logits=True)
    z_s = student.forward_head(student.forward_features(x), pre_logits=True)
    result = task(x, y)
    torch.testing.assert_close(result["kd_loss"], projector.loss(z_s, z_t), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        result["task_loss"], torch.nn.functional.cross_entropy(student(x), y), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(result["loss"], result["task_loss"] + 5.0 * result["kd_loss"])
    grads = torch.autograd.grad(result["kd_loss"], list(projector.parameters()))
    assert all(grad.abs().sum() > 0 for grad in grads), "kd_loss trains the projector"


# -- DDP (prepare_distributed) -------------------------------------------------------------------


def ddp_rank(rank: int, world_size: int, kind: str) -> list[torch.Tensor]:
    """One balanced backward of this rank's share of the batch, the task under DDP."""
    task = make_task(kind)
    task.prepare_distributed()
    x, y = batch()
    share = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    BalancedScaler()(task(x[share], y[share]), frozen_optimizer(task))
    return [p.grad for p in parameters(task)]


@pytest.mark.parametrize("kind", ["logit", "vkd"])
def test_under_ddp_every_rank_takes_the_step_of_the_whole_batch(kind):
    task = make_task(kind)
    BalancedScaler()(task(*batch()), frozen_optimizer(task))
    expected = flat_grad(task)
    for grads in run_on_ranks(ddp_rank, kind):
        torch.testing.assert_close(flat(grads, parameters(task)), expected, rtol=1e-9, atol=1e-12)


# -- refusals, imports, the example --------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"create_graph": True}, "second-order"), ({"clip_grad": 1.0}, "parameters to clip")],
)
def test_unsupported_calls_raise_before_anything_changes(arguments, message):
    task = make_task("logit")
    scaler = BalancedScaler()
    with pytest.raises(ValueError, match=message):
        scaler(task(*batch()), frozen_optimizer(task), **arguments)
    assert all(p.grad is None for p in parameters(task))
    assert scaler.balancer.weights is None


def test_import_gradbalance_does_not_import_timm():
    code = "import sys, gradbalance; assert 'timm' not in sys.modules, 'timm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_the_example_distils_with_fixed_and_balanced_weights():
    command = [sys.executable, str(EXAMPLE), "--train-size", "1024", "--test-size", "1000"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(
        r"^(logit|feature), (fixed weights|balanced) +([\d.]+) +([\d.]+) +(\S+)",
        result.stdout,
        re.M,
    )
    assert [(kind, how) for kind, how, *_ in rows] == [
        (kind, how) for kind in ("logit", "feature") for how in ("fixed weights", "balanced")
    ], result.stdout
    for _, how, accuracy, ema_accuracy, pi in rows:
        assert 0.0 <= float(accuracy) <= 1.0 and 0.0 <= float(ema_accuracy) <= 1.0
        assert (pi == "-") if how == "fixed weights" else 0.0 <= float(pi) <= 1.0
