"""The Triton kernels against float64 references and against the torch backend.

Without a GPU the kernels run in Triton's CPU interpreter on CPU tensors (``tests/conftest.py``
sets ``TRITON_INTERPRET=1`` before Triton is imported); with one, compiled, on the GPU.
"""

import math

import pytest
import torch
from helpers import TeacherStudentProblem
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from triton.runtime.interpreter import InterpretedFunction

from gradbalance import MultiObjectiveOptimizer
from gradbalance import _kernels as kernels
from gradbalance._kernels import torch_backend, triton_backend
from gradbalance.weighting import min_norm_weights

INTERPRETED = isinstance(triton_backend._combine_kernel, InterpretedFunction)
if INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no GPU, and TRITON_INTERPRET was off when Triton loaded", allow_module_level=True)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Around the Gram kernel's 4096-column chunks; the interpreter takes about 0.05 s per chunk.
FEW_CHUNKS_N = (0, 1, 7, 4095, 4097)
MANY_CHUNKS_N = (3 * 4096 + 5, 20011)
# Around combine's 1024-column tiles.
COMBINE_N = (0, 1, 7, 1023, 1025, 3 * 1024 + 5, 20011)
# |G - G_ref| ≤ tol · sqrt(G_ii G_jj): float32 arithmetic on exactly upcast half inputs.
GRAM_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def gradients(k: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """k rows with different means and scales, so that G has unequal entries and cancellations."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(k, dtype=torch.float64)[:, None]
    values = torch.randn(k, n, generator=generator, dtype=torch.float64) * (1 + rows) + rows / 10
    return values.to(dtype).to(DEVICE)


def assert_gram_close(gram: torch.Tensor, flat: torch.Tensor, rtol: float) -> None:
    """``gram`` against ``flat.double() @ flat.double().T``: exact products of the same values."""
    values = flat.double()
    reference = values @ values.T
    assert gram.dtype == torch.float64
    assert gram.shape == reference.shape
    scale = (reference.diagonal()[:, None] * reference.diagonal()[None, :]).sqrt()
    assert ((gram - reference).abs() <= rtol * scale).all()


def combine_error_bound(dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """Float32 arithmetic, then one rounding to ``dtype``; ``scale`` is Σ|c_i x_i| (+ |out|)."""
    if dtype == torch.float64:
        return 1e-14 * scale
    info = torch.finfo(dtype)
    # Half an ulp, relative; a whole one where Triton's interpreter truncates float32 to bfloat16
    # (GPUs round to nearest). Plus one ulp of the subnormals, where float16 results land.
    ulps = 1.0 if dtype == torch.bfloat16 and INTERPRETED else 0.5
    rounding = 0.0 if dtype == torch.float32 else ulps * info.eps
    return (1e-6 + rounding) * scale + info.smallest_normal * info.eps


def check_combine(
    flat: torch.Tensor, coefficients: torch.Tensor, *, accumulate: bool, seed: int = 1
) -> torch.Tensor:
    """Run the Triton combine; check it in place, against float64 and against the torch backend."""
    n = flat.shape[1]
    generator = torch.Generator().manual_seed(seed)
    initial = torch.randn(n, generator=generator, dtype=torch.float64).to(flat.dtype).to(DEVICE)
    out = initial.clone()
    pointer = out.data_ptr()
    result = triton_backend.combine(flat, coefficients, out, accumulate=accumulate)
    assert result is out
    assert out.data_ptr() == pointer
    assert out.dtype == flat.dtype and out.shape == (n,)

    values, weights = flat.double(), coefficients.double().to(DEVICE)
    reference = weights @ values
    scale = weights.abs() @ values.abs()
    if accumulate:
        reference = reference + initial.double()
        scale = scale + initial.double().abs()
    bound = combine_error_bound(flat.dtype, scale)
    assert ((out.double() - reference).abs() <= bound).all()

    expected = torch_backend.combine(flat, coefficients, initial.clone(), accumulate=accumulate)
    # The torch backend rounds the coefficients, Σ c_i x_i and the sum with out to flat's dtype.
    assert ((out.double() - expected.double()).abs() <= 4 * bound).all()
    return out


# --- gram -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n"),
    [(k, n) for k in range(1, 11) for n in FEW_CHUNKS_N]
    + [(k, n) for k in (1, 4, 10) for n in MANY_CHUNKS_N],
)
def test_gram_float32_matches_float64_and_torch_backend(k, n):
    flat = gradients(k, n, torch.float32, seed=k)
    gram = triton_backend.gram(flat)
    assert_gram_close(gram, flat, GRAM_RTOL[torch.float32])
    # The torch backend sums 4096 float32 products at a time, ours 16: a looser bound between them.
    scale = (gram.diagonal()[:, None] * gram.diagonal()[None, :]).sqrt()
    assert ((gram - torch_backend.gram(flat)).abs() <= 1e-5 * scale).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [7, 4097])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_gram_other_dtypes_match_float64_of_the_same_values(k, n, dtype):
    flat = gradients(k, n, dtype, seed=n)
    assert_gram_close(triton_backend.gram(flat), flat, GRAM_RTOL[dtype])


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, triton_backend.MAX_ROWS),
    n=st.integers(0, 3 * 4096 + 40),
    dtype=st.sampled_from(DTYPES),
    row_padding=st.sampled_from([0, 3, 16]),
    exponent=st.integers(-10, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_gram_any_shape_dtype_scale_and_row_stride(k, n, dtype, row_padding, exponent, seed):
    wide = gradients(k, n + row_padding, torch.float64, seed) * 2.0**exponent
    flat = wide.to(dtype)[:, :n]  # a row stride of n + row_padding, read in place
    assume(flat.isfinite().all())  # float16 overflows at 2^10 · 15 σ: no gradient to balance
    assert_gram_close(triton_backend.gram(flat), flat, GRAM_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_of_zero_gradients_is_exactly_zero(dtype):
    flat = torch.zeros(3, 5000, dtype=dtype, device=DEVICE)
    assert torch.equal(triton_backend.gram(flat).cpu(), torch.zeros(3, 3, dtype=torch.float64))


def test_gram_of_an_empty_buffer_is_zero():
    flat = torch.zeros(4, 0, device=DEVICE)
    assert torch.equal(triton_backend.gram(flat).cpu(), torch.zeros(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_of_identical_rows_has_all_entries_equal(dtype):
    row = gradients(1, 9000, dtype)[0]
    for flat in (row.expand(5, -1), row.repeat(5, 1)):  # row stride 0, and a real copy
        gram = triton_backend.gram(flat)
        assert (gram == gram[0, 0]).all()
        assert_gram_close(gram, flat, GRAM_RTOL[dtype])


def test_gram_is_exactly_symmetric_and_deterministic():
    flat = gradients(7, 3 * 4096 + 5, torch.float32)
    gram = triton_backend.gram(flat)
    assert torch.equal(gram, gram.T)
    assert torch.equal(gram, triton_backend.gram(flat))


def test_gram_reads_any_layout_like_its_contiguous_copy():
    wide = gradients(4, 9000, torch.float32)
    transposed = wide.T.contiguous().T  # column stride 4: copied first
    for flat in (wide[:, :8000], wide[:, ::2], transposed):
        assert torch.equal(triton_backend.gram(flat), triton_backend.gram(flat.contiguous()))


def test_gram_keeps_pi_accurate_where_one_float32_product_does_not():
    # cos(g_1, g_2) = 0.999: π divides by ‖g_1 − g_2‖² ≈ 0.002 ‖g‖², which amplifies G's relative
    # error 500-fold. One float32 product of 2e5 columns misses π by about 1e-4.
    n, cos = 200_000, 0.999
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(n, generator=generator, dtype=torch.float64) + 1.0
    other = torch.randn(n, generator=generator, dtype=torch.float64)
    other -= (first @ other) / (first @ first) * first
    other *= first.norm() / other.norm()
    flat = torch.stack([first, cos * first + math.sqrt(1 - cos**2) * other]).float()
    values = flat.double()
    expected = min_norm_weights(values @ values.T)
    single = min_norm_weights((flat @ flat.T).double())
    assert (single - expected).abs().max() > 1e-5  # the case is hard

    weights = min_norm_weights(triton_backend.gram(flat.to(DEVICE)).cpu())
    assert (weights - expected).abs().max() <= 1e-6


# --- combine --------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("n", COMBINE_N)
@pytest.mark.parametrize("k", range(1, 11))
def test_combine_float32(k, n, accumulate):
    flat = gradients(k, n, torch.float32, seed=k)
    coefficients = torch.softmax(torch.randn(k, dtype=torch.float64), dim=0)
    check_combine(flat, coefficients, accumulate=accumulate)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_dtypes(dtype, accumulate):
    flat = gradients(3, 3 * 1024 + 5, dtype)
    check_combine(flat, torch.tensor([0.3, -1.7, 2.25], dtype=torch.float64), accumulate=accumulate)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 16),
    n=st.integers(0, 3 * 1024 + 40),
    dtype=st.sampled_from(DTYPES),
    coefficient_dtype=st.sampled_from([torch.float32, torch.float64]),
    accumulate=st.booleans(),
    row_padding=st.sampled_from([0, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_combine_any_shape_and_dtype(k, n, dtype, coefficient_dtype, accumulate, row_padding, seed):
    flat = gradients(k, n + row_padding, dtype, seed)[:, :n]
    generator = torch.Generator().manual_seed(seed)
    coefficients = torch.randn(k, generator=generator, dtype=coefficient_dtype)
    check_combine(flat, coefficients, accumulate=accumulate, seed=seed)


def test_combine_reads_any_layout_like_its_contiguous_copy():
    wide = gradients(4, 3000, torch.float32)
    coefficients = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    for flat in (wide[:, :2500], wide[:, ::2], wide.T.contiguous().T):
        out = torch.zeros(flat.shape[1], device=DEVICE)
        expected = torch.zeros(flat.shape[1], device=DEVICE)
        triton_backend.combine(flat, coefficients, out, accumulate=False)
        triton_backend.combine(flat.contiguous(), coefficients, expected, accumulate=False)
        assert torch.equal(out, expected)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((10,), torch.float32, "must be a \\(k, n\\) tensor"),
        ((2, 3, 4), torch.float32, "must be a \\(k, n\\) tensor"),
        ((0, 5), torch.float32, "k ≥ 1"),
        ((17, 5), torch.float32, "at most MAX_ROWS = 16"),
        ((2, 5), torch.int32, "must be float16, bfloat16, float32 or float64"),
    ],
)
def test_gram_rejects_bad_input(shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        triton_backend.gram(torch.zeros(shape, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize(
    ("flat_shape", "coefficients", "out", "match"),
    [
        ((5,), torch.ones(1), torch.zeros(5), "must be a \\(k, n\\) tensor"),
        ((3, 5), torch.ones(2), torch.zeros(5), "coefficients must be a floating \\(k,\\)"),
        ((3, 5), torch.ones(3, 1), torch.zeros(5), "coefficients must be a floating \\(k,\\)"),
        ((3, 5), torch.ones(3, dtype=torch.int64), torch.zeros(5), "coefficients must be"),
        ((3, 5), torch.ones(3), torch.zeros(6), "out must be a \\(5,\\) torch.float32"),
        ((3, 5), torch.ones(3), torch.zeros(5, 1), "out must be a \\(5,\\) torch.float32"),
        ((3, 5), torch.ones(3), torch.zeros(5, dtype=torch.float64), "out must be a \\(5,\\)"),
        ((3, 5), torch.ones(3), torch.zeros(10)[::2], "out must be contiguous"),
    ],
)
def test_combine_rejects_bad_input(flat_shape, coefficients, out, match):
    flat = torch.zeros(flat_shape, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        triton_backend.combine(flat, coefficients, out.to(DEVICE), accumulate=False)


# --- the optimizer on the Triton path -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_the_optimizer_on_the_triton_backend_matches_the_torch_backend(mode, monkeypatch):
    def run(backend):
        monkeypatch.setattr(kernels, "backend_for", lambda flat: backend)
        problem = TeacherStudentProblem(dtype=torch.float64)
        opt = MultiObjectiveOptimizer(problem.model.parameters(), mode=mode, lr=1e-2)
        for micro_batches in (1, 2, 1):  # plain steps and an accumulated one
            opt.zero_grad()
            for index in range(micro_batches):
                opt.backward(problem.losses(), accumulate=index < micro_batches - 1)
            opt.step()
        return [p.detach().clone() for p in problem.model.parameters()], opt.weights

    reference_params, reference_weights = run(torch_backend)
    params, weights = run(triton_backend)
    torch.testing.assert_close(weights, reference_weights, rtol=1e-12, atol=1e-14)
    for param, reference in zip(params, reference_params):
        torch.testing.assert_close(param, reference, rtol=1e-12, atol=1e-14)
