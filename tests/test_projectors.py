"""The projectors against explicit float64 formulas, closed forms and their documented behaviour."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradbalance import IndefiniteSubspaceProjector, VkDProjector

F64 = torch.float64
PROJECTORS = [IndefiniteSubspaceProjector, VkDProjector]
STIEFEL_NAMES = {
    IndefiniteSubspaceProjector: ("teacher_projection", "student_projection"),
    VkDProjector: ("projection",),
}


@pytest.fixture(autouse=True)
def single_thread():
    """The sizes here are tiny: one thread avoids OpenMP spin-waits when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def smooth_l1(residual: torch.Tensor) -> torch.Tensor:
    size = residual.abs()
    return torch.where(size < 1, 0.5 * residual**2, size - 0.5).mean()


def bilinear_form(proj) -> torch.Tensor:
    """M (n_t × n_s) with s = z_tᵀ M z_s: P_tᵀ D P_s, or VkD's P."""
    if isinstance(proj, VkDProjector):
        return proj.projection.detach().to(F64)
    p_t = proj.teacher_projection.detach().to(F64)
    p_s = proj.student_projection.detach().to(F64)
    return p_t.T @ torch.diag(proj.metric.detach().to(F64)) @ p_s


def embed_reference(proj, z_s: torch.Tensor, z_t: torch.Tensor):
    """(ẑ_s, ẑ_t) written from the definitions, for (B, C) features."""
    if isinstance(proj, VkDProjector):
        return z_s @ proj.projection.detach().T, z_t
    p_s, p_t = proj.student_projection.detach(), proj.teacher_projection.detach()
    return (p_s @ z_s.T).T * proj.metric.detach(), z_t @ p_t.T


def orthonormality_error(matrix: torch.Tensor) -> float:
    """max |XᵀX − I| over the orthonormal side (columns, or rows for a wide matrix)."""
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.T
    eye = torch.eye(matrix.shape[1], dtype=matrix.dtype)
    return (matrix.T @ matrix - eye).abs().max().item()


def randomize_metric(proj, generator: torch.Generator) -> None:
    """Give the indefinite metric entries of both signs, as training can."""
    if isinstance(proj, IndefiniteSubspaceProjector):
        with torch.no_grad():
            proj.metric.copy_(torch.randn(proj.dim, generator=generator, dtype=proj.metric.dtype))


def train(proj, z_s: torch.Tensor, z_t: torch.Tensor, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(proj.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = proj.loss(z_s, z_t)
        loss.backward()
        opt.step()
    return loss.item()


# ---------------------------------------------------------------- construction


def test_dim_defaults_to_the_larger_feature_size():
    wide_teacher = IndefiniteSubspaceProjector(12, 5)
    assert wide_teacher.dim == 12
    assert wide_teacher.teacher_projection.shape == (12, 12)
    assert wide_teacher.student_projection.shape == (12, 5)
    assert torch.equal(wide_teacher.metric.detach(), torch.ones(12))
    assert IndefiniteSubspaceProjector(5, 12).dim == 12
    higher = IndefiniteSubspaceProjector(5, 12, dim=20)
    assert higher.teacher_projection.shape == (20, 5)
    assert higher.student_projection.shape == (20, 12)
    assert VkDProjector(12, 5).projection.shape == (12, 5)


@pytest.mark.parametrize(("teacher_dim", "student_dim"), [(8, 3), (3, 8)])
def test_dim_below_the_larger_feature_size_is_refused(teacher_dim, student_dim):
    message = r"dim=7 is smaller than max\(teacher_dim, student_dim\)=8"
    with pytest.raises(ValueError, match=message):
        IndefiniteSubspaceProjector(teacher_dim, student_dim, dim=7)


@pytest.mark.parametrize("cls", PROJECTORS)
@pytest.mark.parametrize(
    ("args", "kwargs", "culprit"),
    [
        ((0, 3), {}, "teacher_dim"),
        ((3, -2), {}, "student_dim"),
        ((3.0, 3), {}, "teacher_dim"),
        ((True, 3), {}, "teacher_dim"),
        ((3, 3), {"triv": "householder"}, "triv"),
        ((3, 3), {"tokens": "cls"}, "tokens"),
    ],
)
def test_bad_constructor_arguments_name_the_culprit(cls, args, kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        cls(*args, **kwargs)


def test_zero_dim_is_refused():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        IndefiniteSubspaceProjector(3, 3, dim=0)


# ---------------------------------------------------------------- the manifold


@pytest.mark.parametrize("triv", ["qr", "cayley", "expm"])
@pytest.mark.parametrize(
    ("cls", "dims"),
    [
        (IndefiniteSubspaceProjector, (24, 10, 30)),
        (IndefiniteSubspaceProjector, (10, 24, None)),
        (VkDProjector, (24, 10)),
        (VkDProjector, (10, 24)),
    ],
)
def test_stiefel_matrices_stay_orthonormal_after_training(cls, dims, triv):
    torch.manual_seed(0)
    proj = cls(*dims, triv=triv) if cls is VkDProjector else cls(*dims[:2], dims[2], triv=triv)
    z_s, z_t = torch.randn(64, proj.student_dim), torch.randn(64, proj.teacher_dim)
    before = {name: getattr(proj, name).detach().clone() for name in STIEFEL_NAMES[cls]}
    train(proj, z_s, z_t, steps=40, lr=0.05)
    for name, start in before.items():
        matrix = getattr(proj, name).detach()
        assert (matrix - start).abs().max() > 0.1, f"{name} did not train"
        assert orthonormality_error(matrix) < 1e-5, name


# ---------------------------------------------------------------- values


@settings(max_examples=40, deadline=None)
@given(
    teacher_dim=st.integers(1, 6),
    student_dim=st.integers(1, 6),
    extra=st.integers(0, 3),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_similarity_and_embeddings_equal_the_explicit_formula(
    teacher_dim, student_dim, extra, batch, seed
):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = max(teacher_dim, student_dim) + extra
    proj = IndefiniteSubspaceProjector(teacher_dim, student_dim, dim, dtype=F64)
    randomize_metric(proj, generator)
    z_s = torch.randn(batch, student_dim, generator=generator, dtype=F64)
    z_t = torch.randn(batch, teacher_dim, generator=generator, dtype=F64)

    s = proj.similarity(z_s, z_t)
    expected = torch.einsum("bi,ij,bj->b", z_t, bilinear_form(proj), z_s)
    torch.testing.assert_close(s, expected, rtol=1e-10, atol=1e-10)

    e_s, e_t = proj(z_s, z_t)
    ref_s, ref_t = embed_reference(proj, z_s, z_t)
    torch.testing.assert_close(e_s, ref_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e_t, ref_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((e_s * e_t).sum(-1), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("cls", "dims"),
    [
        (IndefiniteSubspaceProjector, (7, 4)),
        (IndefiniteSubspaceProjector, (4, 7)),
        (VkDProjector, (7, 4)),
        (VkDProjector, (4, 7)),
    ],
)
def test_similarity_and_loss_equal_the_explicit_formulas(cls, dims):
    generator = torch.Generator().manual_seed(3)
    proj = cls(*dims, dtype=F64)
    randomize_metric(proj, generator)
    # offset and scaled teacher features, so that the layer norm matters
    z_s = torch.randn(5, proj.student_dim, generator=generator, dtype=F64)
    z_t = 3 + 2 * torch.randn(5, proj.teacher_dim, generator=generator, dtype=F64)

    similarity = torch.einsum("bi,ij,bj->b", z_t, bilinear_form(proj), z_s)
    torch.testing.assert_close(proj.similarity(z_s, z_t), similarity, rtol=1e-10, atol=1e-10)

    e_s, target = embed_reference(proj, z_s, layer_norm(z_t))
    torch.testing.assert_close(proj.loss(z_s, z_t), smooth_l1(e_s - target), rtol=1e-10, atol=0)


def test_vkd_is_the_special_case_identity_teacher_projection_and_unit_metric():
    torch.manual_seed(0)
    vkd = VkDProjector(8, 5, dtype=F64)
    proj = IndefiniteSubspaceProjector(8, 5, dtype=F64)
    proj.teacher_projection = torch.eye(8, dtype=F64)
    proj.student_projection = vkd.projection.detach()
    z_s, z_t = torch.randn(6, 5, dtype=F64), 1 + torch.randn(6, 8, dtype=F64)

    for got, want in zip(proj(z_s, z_t), vkd(z_s, z_t), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(proj.similarity(z_s, z_t), vkd.similarity(z_s, z_t))
    torch.testing.assert_close(proj.loss(z_s, z_t), vkd.loss(z_s, z_t))
    # and VkD itself is smooth-L1(P z_s, LN(z_t))
    p = vkd.projection.detach()
    torch.testing.assert_close(vkd.loss(z_s, z_t), smooth_l1(z_s @ p.T - layer_norm(z_t)))


def test_teacher_target_keeps_its_norm_whatever_the_learned_embedding():
    """The loss target P_t·LN(z_t) is an isometric image: ‖P_t LN(z_t)‖² = n_t·var/(var+eps)."""
    torch.manual_seed(0)
    proj = IndefiniteSubspaceProjector(6, 3, dim=11, dtype=F64)
    proj.teacher_projection = torch.linalg.qr(torch.randn(11, 6, dtype=F64)).Q
    z_t = 5 + 3 * torch.randn(4, 6, dtype=F64)
    _, target = proj(torch.zeros(4, 3, dtype=F64), layer_norm(z_t))
    var = z_t.var(-1, unbiased=False)
    torch.testing.assert_close(target.norm(dim=-1) ** 2, 6 * var / (var + 1e-5))


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("cls", PROJECTORS)
@pytest.mark.parametrize(
    ("tokens", "student_shape", "teacher_shape", "embedded", "per_sample"),
    [
        ("pool", (3, 5), (3, 7), (3,), (3,)),
        ("pool", (3, 4, 5), (3, 9, 7), (3,), (3,)),  # token counts may differ when pooled
        ("pool", (3, 4, 5), (3, 7, 2, 2), (3,), (3,)),  # ViT student, CNN teacher
        ("each", (3, 5), (3, 7), (3,), (3,)),
        ("each", (3, 4, 5), (3, 4, 7), (3, 4), (3, 4)),
        ("each", (3, 5, 2, 3), (3, 7, 2, 3), (3, 6), (3, 6)),
        ("each", (3, 6, 5), (3, 7, 2, 3), (3, 6), (3, 6)),  # tokens against positions
    ],
)
def test_output_shapes(cls, tokens, student_shape, teacher_shape, embedded, per_sample):
    proj = cls(7, 5, tokens=tokens)
    z_s, z_t = torch.randn(student_shape), torch.randn(teacher_shape)
    e_s, e_t = proj(z_s, z_t)
    assert e_s.shape == e_t.shape == (*embedded, proj.dim)
    assert proj.similarity(z_s, z_t).shape == per_sample
    assert proj.loss(z_s, z_t).shape == ()


@pytest.mark.parametrize("cls", PROJECTORS)
def test_pooling_is_the_mean_over_tokens_and_maps_are_channels_first(cls):
    torch.manual_seed(0)
    each, pool = cls(7, 5, tokens="each"), cls(7, 5, tokens="pool")
    pool.load_state_dict(each.state_dict())
    tokens_s, tokens_t = torch.randn(2, 6, 5), torch.randn(2, 6, 7)
    maps_s = tokens_s.transpose(1, 2).reshape(2, 5, 2, 3)
    maps_t = tokens_t.transpose(1, 2).reshape(2, 7, 2, 3)

    for got, want in zip(each(maps_s, maps_t), each(tokens_s, tokens_t), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(each.loss(maps_s, maps_t), each.loss(tokens_s, tokens_t))
    for got, per_token in zip(pool(maps_s, maps_t), each(tokens_s, tokens_t), strict=True):
        torch.testing.assert_close(got, per_token.mean(dim=1))
    pooled_s, pooled_t = tokens_s.mean(1), tokens_t.mean(1)
    torch.testing.assert_close(pool.loss(tokens_s, tokens_t), pool.loss(pooled_s, pooled_t))


@pytest.mark.parametrize("cls", PROJECTORS)
@pytest.mark.parametrize(
    ("tokens", "student_shape", "teacher_shape", "message"),
    [
        ("pool", (4, 5), (3, 7), "batch sizes differ: student features 4, teacher 3"),
        ("pool", (3, 6), (3, 7), r"student features z_s has 6 channels \(shape \(3, 6\)\)"),
        ("pool", (3, 5), (3, 8), "teacher features z_t has 8 channels"),
        ("pool", (3, 4, 5), (3, 7, 4), "teacher features z_t has 4 channels"),
        ("pool", (3, 2, 2, 5), (3, 7), "student features z_s has 2 channels"),
        ("pool", (5,), (3, 7), r"student features z_s must have shape \(B, C\)"),
        ("pool", (3, 5), (3, 7, 1, 1, 1), r"teacher features z_t must have shape \(B, C\)"),
        ("pool", (0, 5), (0, 7), "student features z_s is an empty batch"),
        ("each", (3, 4, 5), (3, 9, 7), r"same tokens per sample: student \(4,\), teacher \(9,\)"),
        ("each", (3, 5), (3, 2, 7), r"same tokens per sample: student \(\), teacher \(2,\)"),
    ],
)
def test_mismatched_features_raise_value_errors(cls, tokens, student_shape, teacher_shape, message):
    proj = cls(7, 5, tokens=tokens)
    z_s, z_t = torch.randn(student_shape), torch.randn(teacher_shape)
    for method in (proj, proj.similarity, proj.loss):
        with pytest.raises(ValueError, match=message):
            method(z_s, z_t)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("cls", PROJECTORS)
def test_no_gradient_reaches_the_teacher_but_the_projections_learn(cls):
    torch.manual_seed(0)
    proj = cls(7, 5)
    z_s = torch.randn(4, 5, requires_grad=True)
    z_t = torch.randn(4, 7, requires_grad=True)
    (proj.loss(z_s, z_t) + proj.similarity(z_s, z_t).sum() + proj(z_s, z_t)[1].sum()).backward()
    assert z_t.grad is None
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    for name, param in proj.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_teacher_features_in_lower_precision_are_cast_to_the_student_dtype():
    torch.manual_seed(0)
    proj = IndefiniteSubspaceProjector(7, 5, dtype=F64)
    z_s, z_t = torch.randn(4, 5, dtype=F64), torch.randn(4, 7)
    reference = proj.loss(z_s, z_t.to(F64).to(torch.float32).to(F64))
    assert proj.loss(z_s, z_t).dtype == F64
    torch.testing.assert_close(proj.loss(z_s, z_t), reference)
    assert all(p.dtype == F64 for p in proj.parameters())


# ---------------------------------------------------------------- state, caching, freezing


@pytest.mark.parametrize("cls", PROJECTORS)
def test_state_dict_round_trip_restores_matrices_metric_and_outputs(cls):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(8, 5), torch.randn(8, 7)
    trained = cls(7, 5)
    train(trained, z_s, z_t, steps=5, lr=0.05)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)

    torch.manual_seed(1)
    restored = cls(7, 5)
    assert not torch.equal(restored(z_s, z_t)[0], trained(z_s, z_t)[0])
    restored.load_state_dict(torch.load(buffer))
    for name, tensor in trained.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    for name in STIEFEL_NAMES[cls]:
        assert torch.equal(getattr(restored, name), getattr(trained, name)), name
    assert torch.equal(restored.loss(z_s, z_t), trained.loss(z_s, z_t))


def count_matrix_computations(proj, cls) -> dict[str, int]:
    """Counts, per Stiefel matrix, how often geotorch computes it from its parameters."""
    counts = dict.fromkeys(STIEFEL_NAMES[cls], 0)
    for name in counts:

        def hook(_module, _inputs, _output, name=name):
            counts[name] += 1

        proj.parametrizations[name][0].register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("cls", PROJECTORS)
def test_each_matrix_is_computed_once_per_call_and_once_inside_cached(cls):
    proj = cls(7, 5)
    counts = count_matrix_computations(proj, cls)
    z_s, z_t = torch.randn(4, 5), torch.randn(4, 7)
    proj.loss(z_s, z_t)
    assert set(counts.values()) == {1}
    with proj.cached():
        loss = proj.loss(z_s, z_t) + proj.similarity(z_s, z_t).sum()
        proj(z_s, z_t)
    assert set(counts.values()) == {2}
    loss.backward()
    assert all(p.grad is not None for p in proj.parameters())


@pytest.mark.parametrize("cls", PROJECTORS)
def test_frozen_projector_reuses_its_matrices_until_unfrozen(cls):
    torch.manual_seed(0)
    proj = cls(7, 5)
    counts = count_matrix_computations(proj, cls)
    z_s, z_t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 7)
    live = proj.loss(z_s, z_t)
    assert not proj.frozen

    assert proj.freeze() is proj and proj.frozen
    frozen_counts = dict(counts)
    frozen = proj.loss(z_s, z_t)
    proj(z_s, z_t)
    proj.similarity(z_s, z_t)
    assert counts == frozen_counts
    assert torch.equal(frozen, live)
    frozen.backward()
    assert z_s.grad is not None
    for name, param in proj.named_parameters():
        assert (param.grad is not None) == (name == "metric"), name
    assert not any("frozen" in key for key in proj.state_dict())

    assert proj.unfreeze() is proj and not proj.frozen
    proj.loss(z_s, z_t)
    assert all(counts[name] == frozen_counts[name] + 1 for name in counts)


def test_frozen_matrices_follow_the_module_dtype():
    proj = IndefiniteSubspaceProjector(7, 5).freeze().to(F64)
    z_s, z_t = torch.randn(4, 5, dtype=F64), torch.randn(4, 7, dtype=F64)
    assert proj.loss(z_s, z_t).dtype == F64
    torch.testing.assert_close(proj.loss(z_s, z_t), proj.unfreeze().loss(z_s, z_t))


# ---------------------------------------------------------------- the motivating case


@pytest.mark.parametrize("dim", [None, 16])
def test_unknown_rotation_is_learned_while_unrelated_pairs_stay_far(dim):
    """Paper §1: student features are a rotation of the teacher's. The teacher is already
    layer-normed so that the loss target LN(z_t) is exactly a linear image of z_s."""
    torch.manual_seed(0)
    teacher = layer_norm(torch.randn(256, 8))
    rotation = torch.linalg.qr(torch.randn(8, 8)).Q
    student = teacher @ rotation.T
    proj = IndefiniteSubspaceProjector(8, 8, dim)
    start = proj.loss(student, teacher).item()

    final = train(proj, student, teacher, steps=200, lr=0.05)
    with torch.no_grad():
        unrelated = proj.loss(student.roll(1, dims=0), teacher).item()
        matched_s = proj.similarity(student, teacher).mean().item()
        unrelated_s = proj.similarity(student.roll(1, dims=0), teacher).mean().item()

    assert start > 0.3
    assert final < 1e-4
    assert unrelated > 0.3
    # trained, s(z_t, z_s) ≈ ⟨z_t, LN(z_t)⟩ ≈ n_t for matched pairs and ≈ 0 for unrelated ones
    assert matched_s == pytest.approx(8.0, rel=1e-2)
    assert abs(unrelated_s) < 1.0
