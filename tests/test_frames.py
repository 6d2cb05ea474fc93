"""The QR frame parametrisation: its gradient against torch's float64 QR autograd, its cache
(once per optimizer step, never stale), geotorch's frame on the same data."""

import copy

import geotorch
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import gradbalance.frames as frames
from gradbalance import IndefiniteSubspaceProjector, MultiObjectiveOptimizer, VkDProjector
from gradbalance.frames import QRFrame, orthonormal_frame

F64 = torch.float64


def torch_qf(raw: torch.Tensor) -> torch.Tensor:
    """Independent reference: torch.linalg.qr's own autograd, signs fixed to diag(R) > 0."""
    wide = raw.shape[0] < raw.shape[1]
    tall = raw.mT if wide else raw
    q, r = torch.linalg.qr(tall)
    q = q * torch.sign(r.diagonal())
    return q.mT if wide else q


def orthonormality_error(matrix: torch.Tensor) -> float:
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.mT
    eye = torch.eye(matrix.shape[1], dtype=matrix.dtype)
    return (matrix.mT @ matrix - eye).abs().max().item()


@pytest.fixture
def qr_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the QR decompositions the frames compute, in order."""
    calls = []
    original = frames._positive_qr

    def counted(tall):
        calls.append(tuple(tall.shape))
        return original(tall)

    monkeypatch.setattr(frames, "_positive_qr", counted)
    return calls


@pytest.mark.parametrize("shape", [(7, 3), (5, 5), (3, 8)])
def test_frame_and_gradient_equal_torch_qr_in_float64(shape):
    torch.manual_seed(0)
    raw = torch.randn(shape, dtype=F64, requires_grad=True)
    grad_out = torch.randn(shape, dtype=F64)
    ours = orthonormal_frame(raw)
    reference = torch_qf(raw)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    (ours_grad,) = torch.autograd.grad(ours, raw, grad_out)
    (reference_grad,) = torch.autograd.grad(reference, raw, grad_out)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-10, atol=1e-12)
    assert orthonormality_error(ours.detach()) < 1e-14


def test_gradcheck_of_the_frame():
    raw = torch.randn(6, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(orthonormal_frame, (raw,))


def test_double_backward_is_refused_rather_than_wrong():
    raw = torch.randn(5, 3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(orthonormal_frame(raw).pow(3).sum(), raw, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        grad.sum().backward()


def test_a_frame_is_its_own_preimage():
    frame = torch_qf(torch.randn(9, 4, dtype=F64))
    parametrization = QRFrame()
    torch.testing.assert_close(parametrization(parametrization.right_inverse(frame)), frame)


@pytest.mark.parametrize("cls", [IndefiniteSubspaceProjector, VkDProjector])
def test_each_frame_is_computed_once_per_step_across_calls_and_micro_batches(cls, qr_calls):
    torch.manual_seed(0)
    proj = cls(12, 5)
    frames_per_step = len(proj.parametrizations)
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-2)
    z_s, z_t = torch.randn(8, 5), torch.randn(8, 12)
    qr_calls.clear()  # construction computes each frame (parametrize checks right_inverse) ...
    for step in range(1, 3):
        for micro in (slice(0, 4), slice(4, 8)):
            loss = (
                proj.loss(z_s[micro], z_t[micro]) + proj.similarity(z_s[micro], z_t[micro]).mean()
            )
            loss.backward()
        assert len(qr_calls) == (step - 1) * frames_per_step  # ... and that one serves step 1
        opt.step()  # changes every frame: the next access recomputes it
        opt.zero_grad()


@pytest.mark.parametrize("cls", [IndefiniteSubspaceProjector, VkDProjector])
def test_micro_batches_through_the_cached_frame_accumulate_the_full_batch_gradient(cls):
    torch.manual_seed(0)
    proj = cls(6, 4).to(F64)
    z_s, z_t = torch.randn(8, 4, dtype=F64), torch.randn(8, 6, dtype=F64)
    proj.loss(z_s[:4], z_t[:4]).backward()
    proj.loss(z_s[4:], z_t[4:]).backward()
    accumulated = {name: p.grad.clone() for name, p in proj.named_parameters()}

    fresh = copy.deepcopy(proj)
    fresh.zero_grad()
    (proj_loss(fresh, z_s[:4], z_t[:4]) + proj_loss(fresh, z_s[4:], z_t[4:])).backward()
    for name, param in fresh.named_parameters():
        torch.testing.assert_close(accumulated[name], param.grad, rtol=1e-12, atol=1e-14)


def proj_loss(proj, z_s, z_t):
    with parametrize.cached():  # one graph for both halves: the reference of one backward
        return proj.loss(z_s, z_t)


def test_no_optimizer_step_sees_a_stale_frame():
    """After step, load_state_dict or an in-place edit the frame follows the parameter."""
    torch.manual_seed(0)
    proj = IndefiniteSubspaceProjector(6, 4)
    raw = proj.parametrizations.student_projection.original
    before = proj.student_projection.detach().clone()
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    proj.loss(torch.randn(8, 4), torch.randn(8, 6)).backward()
    opt.step()
    assert not torch.equal(proj.student_projection, before)
    torch.testing.assert_close(proj.student_projection, torch_qf(raw.detach()))
    assert proj.parametrizations.student_projection[0].cached_frame is proj.student_projection

    other = IndefiniteSubspaceProjector(6, 4)
    proj.load_state_dict(other.state_dict())
    torch.testing.assert_close(proj.student_projection, other.student_projection)
    with torch.no_grad():
        raw.mul_(-1.0)
    torch.testing.assert_close(proj.student_projection, -other.student_projection)


def test_a_frame_cached_without_grad_is_recomputed_when_a_graph_is_needed(qr_calls):
    proj = VkDProjector(6, 4)
    qr_calls.clear()
    z_s, z_t = torch.randn(8, 4), torch.randn(8, 6)
    with torch.no_grad():
        proj.loss(z_s, z_t)
    proj.loss(z_s, z_t).backward()
    assert proj.parametrizations.projection.original.grad is not None
    with torch.inference_mode():
        proj.loss(z_s, z_t)
    proj.loss(z_s, z_t).backward()
    # construction's frame (with its graph) serves no_grad and grad; inference mode needs its own,
    # and the grad call after it a new one with a graph
    assert len(qr_calls) == 2


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize(
    "make",
    [lambda: IndefiniteSubspaceProjector(6, 4), lambda: VkDProjector(4, 6)],
    ids=["subspace", "wide-vkd"],
)
def test_exact_mode_balances_through_the_cached_frame(vectorize, make):
    """k per-task backward passes (vmapped or not) reuse one frame; the balanced gradient equals
    the float64 reference Σ π_i ∇L_i computed with plain autograd. A wide frame (VkD with the
    wider student) gets its gradient as a transposed view, which the per-task buffers lay out in
    the parameter's order."""
    torch.manual_seed(0)
    proj = make().to(F64)
    wide = isinstance(proj, VkDProjector)
    # A parameter before the projector's, so that the frames' slots do not start the buffer.
    scale = nn.Parameter(torch.tensor(1.5, dtype=F64))
    z_s, z_t = torch.randn(8, 4, dtype=F64), torch.randn(8, 6, dtype=F64)
    if wide:
        z_s, z_t = z_t, z_s

    def objectives(module, factor):
        return [module.loss(factor * z_s, z_t), module.similarity(factor * z_s, z_t).pow(2).mean()]

    params = [scale, *proj.parameters()]
    opt = MultiObjectiveOptimizer(params, lr=1e-3, vectorize=vectorize)
    opt.backward(objectives(proj, scale))
    pi = opt.weights

    reference, ref_scale = copy.deepcopy(proj), scale.detach().clone().requires_grad_(True)
    ref_losses = objectives(reference, ref_scale)
    ref_params = [ref_scale, *reference.parameters()]
    grads = [torch.autograd.grad(loss, ref_params) for loss in ref_losses]
    for index, param in enumerate(params):
        expected = sum(
            weight * grad[index] / loss.detach()
            for weight, grad, loss in zip(pi, grads, ref_losses, strict=True)
        )
        torch.testing.assert_close(param.grad, expected.to(param.dtype), rtol=1e-9, atol=1e-12)


def test_same_frame_as_geotorch_on_the_same_data():
    """Given the same orthonormal frames, the QR parametrisation and geotorch's give the same
    embeddings, similarity, loss and feature gradients."""
    torch.manual_seed(0)
    ours = IndefiniteSubspaceProjector(9, 5, dim=11).to(F64)
    theirs = IndefiniteSubspaceProjector(9, 5, dim=11, triv="cayley").to(F64)
    with torch.no_grad():
        for name in ("teacher_projection", "student_projection"):
            setattr(theirs, name, getattr(ours, name))  # geotorch's right_inverse
        theirs.metric.copy_(torch.randn(11, dtype=F64))
        ours.metric.copy_(theirs.metric)
    for name in ("teacher_projection", "student_projection"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=1e-12, rtol=0)
    z_t = torch.randn(16, 9, dtype=F64)
    outputs = []
    for proj in (ours, theirs):
        z_s = torch.randn(16, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
        z_s.requires_grad_(True)
        loss = proj.loss(z_s, z_t)
        (grad,) = torch.autograd.grad(loss, z_s)
        outputs.append((loss, proj.similarity(z_s, z_t), grad))
    for mine, geotorchs in zip(*outputs, strict=True):
        torch.testing.assert_close(mine, geotorchs, rtol=1e-10, atol=1e-12)


def test_deepcopy_after_a_forward_with_a_cached_frame():
    """(Pickling a parametrized module is refused by torch itself: state_dict() is the way.)"""
    proj = IndefiniteSubspaceProjector(6, 4)
    z_s, z_t = torch.randn(4, 4), torch.randn(4, 6)
    loss = proj.loss(z_s, z_t)
    clone = copy.deepcopy(proj)
    torch.testing.assert_close(clone.loss(z_s, z_t), loss)
    clone.loss(z_s, z_t).backward()
    assert proj.parametrizations.student_projection.original.grad is None


def test_frames_stay_orthonormal_over_a_long_run():
    """3000 AdamW steps at a high learning rate: every frame stays orthonormal to 1e-5 in float32
    with no base update, and its unconstrained matrix stays well conditioned."""
    torch.manual_seed(0)
    proj = IndefiniteSubspaceProjector(32, 12, dim=40)
    opt = torch.optim.AdamW(proj.parameters(), lr=3e-2)
    for _ in range(3000):
        opt.zero_grad()
        proj.loss(torch.randn(32, 12), torch.randn(32, 32)).backward()
        opt.step()
    for name in ("teacher_projection", "student_projection"):
        with torch.no_grad():
            assert orthonormality_error(getattr(proj, name)) < 1e-5, name
            singular = torch.linalg.svdvals(proj.parametrizations[name].original)
        assert (singular.max() / singular.min()).item() < 100, name


def test_geotorch_stays_the_manifold_library_for_its_trivializations():
    proj = IndefiniteSubspaceProjector(6, 4, triv="cayley")
    assert isinstance(proj.parametrizations.student_projection[0], geotorch.Stiefel)
    assert isinstance(
        IndefiniteSubspaceProjector(6, 4).parametrizations.student_projection[0], QRFrame
    )


def test_parametrize_registration_on_any_module():
    layer = nn.Linear(3, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch_qf(torch.randn(5, 3)))
    parametrize.register_parametrization(layer, "weight", QRFrame())
    assert orthonormality_error(layer.weight.detach()) < 1e-6
