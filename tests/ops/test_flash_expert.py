"""Flash expert: Triton kernels and the torch path against float64 math written here,
token by token and slot by slot, plus input validation."""

import math

import pytest
import torch
import triton.language as tl

from moeflux.ops.flash_expert import flash_expert
from moeflux.ops.flash_expert import triton as kernels
from moeflux.ops.flash_expert.naive import flash_expert_torch

# The interpreter converts loaded loop bounds with a numpy call that numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

# (what it exercises, T, H, E, K, index pattern)
CASES = [
    ("one token, one slot", 1, 16, 8, 1, "uniform"),
    ("H = 33 not a multiple of the block, E = 10 not a power of two", 9, 33, 10, 3, "uniform"),
    ("K = 7 > E = 5: one token picks an expert several times", 8, 24, 5, 7, "uniform"),
    ("one expert picked by every token: a segment longer than one reduction step", 32, 16, 7, 4, "hot"),
    ("H = 100, E = 100: most experts unused, their gradient rows must be zero", 12, 100, 100, 2, "uniform"),
    ("T = 0", 0, 16, 6, 3, "uniform"),
]
CASE_IDS = [case[0] for case in CASES]
# rel-L2 error bounds: float32 is exact up to summation order; 16-bit rounds the outputs.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def make_inputs(T, H, E, K, pattern, dtype, weights_dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=generator)
    # Scores hidden . down of order one, so silu is exercised on both sides of zero.
    down = torch.randn(E, H, generator=generator) / math.sqrt(H)
    up = torch.randn(E, H, generator=generator)
    indices = torch.randint(0, E, (T, K), generator=generator)
    if pattern == "hot":
        indices[:, 0] = 3
    routing_weights = torch.randn(T, K, generator=generator)
    return hidden.to(dtype), down.to(dtype), up.to(dtype), indices, routing_weights.to(weights_dtype)


def reference64(hidden, down, up, indices, routing_weights, grad_out):
    """``(out, d_hidden, d_down, d_up, d_routing_weights)`` in float64, one (token, slot) at a time."""
    hidden, down, up, routing_weights = (
        t.detach().double().requires_grad_() for t in (hidden, down, up, routing_weights)
    )
    rows = []
    for t in range(hidden.shape[0]):
        row = torch.zeros(hidden.shape[1], dtype=torch.float64)
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            score = torch.dot(hidden[t], down[e])
            row = row + routing_weights[t, j] * score * torch.sigmoid(score) * up[e]
        rows.append(row)
    out = torch.stack(rows) if rows else hidden.new_zeros(0, hidden.shape[1])
    leaves = (hidden, down, up, routing_weights)
    loss = (out * grad_out.double()).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * 4
    return (out.detach(), *(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)))


def rel_l2(actual, expected):
    actual, expected = actual.detach().double(), expected.double()
    if expected.norm() == 0:
        return 0.0 if actual.norm() == 0 else math.inf
    return float((actual - expected).norm() / expected.norm())


def run(inputs, grad_out, **kwargs):
    """``(out, d_hidden, d_down, d_up, d_routing_weights)`` of ``flash_expert``."""
    hidden, down, up, indices, routing_weights = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, down, up, routing_weights)]
    out = flash_expert(leaves[0], leaves[1], leaves[2], indices, leaves[3], **kwargs)
    out.backward(grad_out)
    return (out.detach(), *(leaf.grad for leaf in leaves))


def check_against_reference(actual, inputs, grad_out, dtype):
    hidden, down, up, indices, routing_weights = inputs
    expected = reference64(hidden, down, up, indices, routing_weights, grad_out)
    names = ("out", "d_hidden", "d_down", "d_up", "d_routing_weights")
    reference_dtypes = (hidden.dtype, hidden.dtype, down.dtype, up.dtype, routing_weights.dtype)
    for name, a, e, want_dtype in zip(names, actual, expected, reference_dtypes):
        assert a.shape == e.shape and a.dtype == want_dtype, (name, a.shape, a.dtype)
        assert torch.isfinite(a).all(), f"{name} has non-finite entries (unwritten poisoned memory?)"
        error = rel_l2(a, e)
        assert error < TOLERANCE[dtype], f"{name}: rel-L2 {error:.2e}"
    # Experts nobody picked get exactly zero gradient.
    unused = torch.ones(down.shape[0], dtype=torch.bool)
    unused[indices.flatten()] = False
    assert (actual[2][unused] == 0).all() and (actual[3][unused] == 0).all()


@pytest.fixture
def poisoned_kernel_buffers(monkeypatch):
    """Every ``torch.empty`` the Triton launchers allocate starts as NaN, so elements a kernel
    was meant to write but did not show up in the results."""

    class PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            buffer = torch.empty(*args, **kwargs)
            return buffer.fill_(math.nan) if buffer.is_floating_point() else buffer.fill_(-(2**30))

    monkeypatch.setattr(kernels, "torch", PoisonedTorch())


@pytest.fixture
def interpreter_tensor_cores(monkeypatch):
    """Let the launchers take the tensor-core weight-gradient kernel on the CPU, with the
    interpreter's dot fixed: Triton 3.6's interpreter multiplies bfloat16 operands as their
    raw uint16 bits, so decode them to float32 first (the products are exact either way)."""
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(kernels, "_tensor_cores", lambda tensor: True)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 elements: the kernels loop over several chunks of H even at small H."""
    monkeypatch.setattr(kernels, "MAX_TILE_ELEMENTS", 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_matches_float64_reference(case, dtype, poisoned_kernel_buffers, small_tiles):
    _, T, H, E, K, pattern = case
    # bfloat16 also exercises routing weights in the hidden dtype; the others use float32.
    weights_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    inputs = make_inputs(T, H, E, K, pattern, dtype, weights_dtype)
    grad_out = torch.randn(T, H).to(dtype)
    actual = run(inputs, grad_out, backend="triton")
    check_against_reference(actual, inputs, grad_out, dtype)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASES[1][0], CASES[3][0]])
def test_triton_default_tiles(case, poisoned_kernel_buffers):
    _, T, H, E, K, pattern = case
    inputs = make_inputs(T, H, E, K, pattern, torch.float32)
    grad_out = torch.randn(T, H)
    check_against_reference(run(inputs, grad_out, backend="triton"), inputs, grad_out, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4]], ids=[CASES[2][0], CASES[3][0], CASES[4][0]])
def test_triton_atomic_weight_gradients(case, dtype, small_tiles):
    _, T, H, E, K, pattern = case
    inputs = make_inputs(T, H, E, K, pattern, dtype)
    grad_out = torch.randn(T, H).to(dtype)
    actual = run(inputs, grad_out, backend="triton", deterministic=False)
    check_against_reference(actual, inputs, grad_out, dtype)


def test_triton_deterministic_gradients_are_bitwise_reproducible(small_tiles):
    inputs = make_inputs(32, 16, 7, 4, "hot", torch.float32)
    grad_out = torch.randn(32, 16)
    first, second = run(inputs, grad_out, backend="triton"), run(inputs, grad_out, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("sorted_pairs", [False, True], ids=["token order", "expert order"])
def test_triton_launchers_write_every_element(sorted_pairs):
    """The launchers fill caller-given NaN buffers completely (the weight kernel included
    rows of unused experts, which it writes as zeros)."""
    T, H, E, K = 5, 40, 12, 3
    hidden, down, up, indices, routing_weights = make_inputs(T, H, E, K, "uniform", torch.float32)
    grad_out = torch.randn(T, H)
    pairs = kernels.sort_pairs(indices) if sorted_pairs else None

    def nan(*shape):
        return torch.full(shape, math.nan)

    out, scores, coef = nan(T, H), nan(T, K), nan(T, K)
    kernels.launch_dots(hidden, down, indices, routing_weights, scores, coef, pairs=pairs)
    kernels.launch_combine(up, indices, coef, out)
    grad_routing, grad_score, coef, grad_hidden = nan(T, K), nan(T, K), nan(T, K), nan(T, H)
    kernels.launch_dots(grad_out, up, indices, routing_weights, scores, coef, grad_score, grad_routing, pairs=pairs)
    kernels.launch_combine(down, indices, grad_score, grad_hidden)
    grad_down, grad_up = nan(E, H), nan(E, H)
    kernels.launch_expert_grads(hidden, grad_out, kernels.sort_pairs(indices), grad_score, coef, grad_down, grad_up)
    for name, buffer in locals().copy().items():
        if isinstance(buffer, torch.Tensor):
            assert torch.isfinite(buffer).all(), name
    expected = reference64(hidden, down, up, indices, routing_weights, grad_out)
    for actual, wanted in zip((out, grad_hidden, grad_down, grad_up, grad_routing), expected):
        assert rel_l2(actual, wanted) < 1e-5


def segment_indices(pattern, T, K, E, generator):
    """``[T, K]`` expert ids whose sorted segments are of the kind ``pattern`` names."""
    if pattern == "one expert":  # every pair on one expert: a single segment T * K long
        return torch.full((T, K), E // 2, dtype=torch.int64)
    if pattern == "long and empty":  # three hot experts, a few singles, the rest of E empty
        hot = torch.tensor([1, E - 1, 7])[torch.randint(0, 3, (T, K), generator=generator)]
        singles = torch.randperm(E, generator=generator)[:T]
        hot[:, 0] = singles
        return hot
    return torch.randint(0, E, (T, K), generator=generator)  # "sparse": E >> T * K


# (name, T, K, E, H)
SEGMENT_CASES = [
    ("one expert", 13, 4, 50, 24),
    ("long and empty", 16, 3, 120, 40),
    ("sparse", 5, 2, 200, 20),
    ("one token one slot", 1, 1, 70, 16),
]

# Weight-gradient tiles (rows, block_h, h_loop, long-segment threshold, block_p, dtype).
# Stepping kernel (block_p = 0): with threshold 1 every segment longer than one pair takes the
# blocked path, and rows = 1 turns that path into one pair per step. Tensor-core kernel
# (block_p > 0, bfloat16): the tile's pairs in dense steps of block_p, whatever the segments.
SEGMENT_TILES = [
    (2, 16, False, 1, 0, torch.float32),
    (4, 32, True, 3, 0, torch.float32),
    (8, 16, True, 1000, 0, torch.float32),
    (1, 16, False, 1, 0, torch.float32),
    (16, 16, False, 32, 16, torch.bfloat16),
    (32, 32, True, 32, 16, torch.bfloat16),
    (16, 16, None, 32, 32, torch.bfloat16),
]


def _tiles_id(t):
    kind = f"tensor-core,block_p={t[4]}" if t[4] else f"stepping,long>{t[3]}"
    return f"{kind},rows={t[0]},block_h={t[1]},h_loop={t[2]}"


@pytest.mark.parametrize("tiles", SEGMENT_TILES, ids=_tiles_id)
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=[c[0] for c in SEGMENT_CASES])
def test_expert_grads_segments(case, tiles, monkeypatch, interpreter_tensor_cores):
    """The per-expert reduction over the sorted pairs: long segments, empty ones (zero rows),
    E much larger than T * K, all pairs on one expert; every row of the NaN-poisoned outputs
    written, and the same bits on a second run."""
    rows, block_h, h_loop, long_segment, block_p, dtype = tiles
    name, T, K, E, H = case
    monkeypatch.setattr(kernels, "LONG_SEGMENT", long_segment)
    generator = torch.Generator().manual_seed(3)
    indices = segment_indices(name, T, K, E, generator)
    hidden = torch.randn(T, H, generator=generator).to(dtype)
    grad_out = torch.randn(T, H, generator=generator).to(dtype)
    grad_score, coef = torch.randn(T, K, generator=generator), torch.randn(T, K, generator=generator)
    base = kernels.default_config(H, K, dtype)
    config = base.replace(expert_grads=kernels.Tiles(rows, block_h, 4, 2, h_loop, block_p))

    def run_kernel():
        grad_down, grad_up = torch.full((E, H), math.nan).to(dtype), torch.full((E, H), math.nan).to(dtype)
        pairs = kernels.sort_pairs(indices)
        kernels.launch_expert_grads(hidden, grad_out, pairs, grad_score, coef, grad_down, grad_up, config=config)
        return grad_down, grad_up

    grad_down, grad_up = run_kernel()
    flat = indices.flatten()
    tokens = torch.arange(T).repeat_interleave(K)
    want_down = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, flat, grad_score.flatten().double()[:, None] * hidden.double()[tokens]
    )
    want_up = torch.zeros(E, H, dtype=torch.float64).index_add_(
        0, flat, coef.flatten().double()[:, None] * grad_out.double()[tokens]
    )
    assert torch.isfinite(grad_down).all() and torch.isfinite(grad_up).all()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16: the output rounding
    assert rel_l2(grad_down, want_down) < tolerance and rel_l2(grad_up, want_up) < tolerance
    unused = torch.ones(E, dtype=torch.bool)
    unused[flat] = False
    assert (grad_down[unused] == 0).all() and (grad_up[unused] == 0).all()
    again = run_kernel()
    assert torch.equal(again[0], grad_down) and torch.equal(again[1], grad_up)


def test_tensor_core_weight_grads_keep_float32_coefficients(interpreter_tensor_cores):
    """The tensor-core kernel feeds each float32 coefficient to the MMA as two bfloat16
    parts: 1 + 2**-12 (which bfloat16 alone rounds to 1) minus 1 must leave 2**-12."""
    indices = torch.tensor([[3], [3]])
    ones = torch.ones(2, 16, dtype=torch.bfloat16)
    grad_score = torch.tensor([[1 + 2**-12], [-1.0]])
    coef = -grad_score
    grad_down, grad_up = (torch.full((8, 16), math.nan, dtype=torch.bfloat16) for _ in range(2))
    config = kernels.default_config(16, 1).replace(expert_grads=kernels.Tiles(16, 16, 4, 2, None, 16))
    kernels.launch_expert_grads(ones, ones, kernels.sort_pairs(indices), grad_score, coef, grad_down, grad_up,
                                config=config)  # fmt: skip
    assert (grad_down[3] == 2**-12).all() and (grad_up[3] == -(2**-12)).all()
    assert (grad_down[torch.arange(8) != 3] == 0).all() and (grad_up[torch.arange(8) != 3] == 0).all()


def test_expert_grads_one_of_two_pools():
    """Only d_up wanted (d_down None): d_up still right, nothing else touched."""
    T, H, E, K = 6, 20, 9, 3
    hidden, _, _, indices, _ = make_inputs(T, H, E, K, "uniform", torch.float32)
    grad_out, grad_score, coef = torch.randn(T, H), torch.randn(T, K), torch.randn(T, K)
    grad_up = torch.full((E, H), math.nan)
    kernels.launch_expert_grads(hidden, grad_out, kernels.sort_pairs(indices), grad_score, coef, None, grad_up)
    tokens = torch.arange(T).repeat_interleave(K)
    want = torch.zeros(E, H).index_add_(0, indices.flatten(), coef.flatten()[:, None] * grad_out[tokens])
    torch.testing.assert_close(grad_up, want)


CONFIG_VARIANTS = [
    ("dots in expert order", dict(sorted_dots=True)),
    ("weight grads walk all of H", dict(expert_grads=kernels.Tiles(4, 16, 4, 1, True))),
    ("weight grads split H, stepping kernel", dict(expert_grads=kernels.Tiles(2, 16, 4, 2, False, 0))),
    ("weight grads, tensor-core kernel (bfloat16 only)", dict(expert_grads=kernels.Tiles(16, 16, 4, 2, None, 16))),
    ("one-stage loops", dict(token_dot=kernels.Tiles(1, 16, 4, 1), sorted_dot=kernels.Tiles(2, 32, 4, 1),
                             combine=kernels.Tiles(1, 16, 4, 1), sorted_dots=True)),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", CONFIG_VARIANTS, ids=[v[0] for v in CONFIG_VARIANTS])
@pytest.mark.parametrize("case", [CASES[3], CASES[4]], ids=[CASES[3][0], CASES[4][0]])
def test_triton_config_variants(case, variant, dtype, poisoned_kernel_buffers, interpreter_tensor_cores):
    """Every tile / ordering choice the config (and so the GPU sweep) can make is correct."""
    _, T, H, E, K, pattern = case
    inputs = make_inputs(T, H, E, K, pattern, dtype)
    grad_out = torch.randn(T, H).to(dtype)
    config = kernels.default_config(H, K, dtype).replace(**variant[1])
    actual = run(inputs, grad_out, backend="triton", config=config)
    check_against_reference(actual, inputs, grad_out, dtype)


@pytest.mark.parametrize("H, K", [(1024, 16), (2048, 64), (33, 7), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_config_tiles(H, K, dtype):
    config = kernels.default_config(H, K, dtype)
    for tiles in (config.token_dot, config.sorted_dot, config.combine, config.expert_grads):
        assert tiles.rows >= 1 and tiles.block_h >= 16 and tiles.num_stages >= 1
        assert tiles.rows & (tiles.rows - 1) == 0 and tiles.block_h & (tiles.block_h - 1) == 0
    # Gathered elements per step stay within the budget (a token-dot tile covers all K slots).
    block_k = max(2, 1 << (K - 1).bit_length())
    assert config.token_dot.rows * block_k * config.token_dot.block_h <= max(
        kernels.MAX_TILE_ELEMENTS, block_k * 16
    )


def test_triton_non_contiguous_inputs_and_int32_indices(small_tiles):
    T, H, E, K = 6, 20, 9, 3
    hidden, down, up, indices, routing_weights = make_inputs(T, H, E, K, "uniform", torch.float32)
    # Rows with a stride larger than H, and a transposed weight tensor.
    wide_hidden = torch.randn(T, H + 7)
    wide_hidden[:, 3 : 3 + H] = hidden
    strided = (wide_hidden[:, 3 : 3 + H], down, up, indices.to(torch.int32), routing_weights.t().contiguous().t())
    grad_out = torch.randn(T, H)
    actual = run(strided, grad_out, backend="triton")
    check_against_reference(actual, (hidden, down, up, indices, routing_weights), grad_out, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_path_matches_float64_reference(case, dtype):
    _, T, H, E, K, pattern = case
    inputs = make_inputs(T, H, E, K, pattern, dtype, torch.float64 if dtype == torch.float64 else torch.float32)
    grad_out = torch.randn(T, H).to(dtype)
    actual = run(inputs, grad_out, backend="torch")
    check_against_reference(actual, inputs, grad_out, dtype)


def test_torch_path_gradcheck():
    hidden, down, up, indices, routing_weights = make_inputs(4, 6, 5, 3, "uniform", torch.float64, torch.float64)
    indices[1, 2] = indices[1, 0]  # a repeated expert within one token
    leaves = tuple(t.requires_grad_() for t in (hidden, down, up, routing_weights))
    assert torch.autograd.gradcheck(
        lambda x, d, u, w: flash_expert_torch(x, d, u, indices, w), leaves, eps=1e-6, atol=1e-8
    )


def test_auto_backend_on_cpu_is_torch_and_float64_rejected_by_triton():
    inputs = make_inputs(3, 8, 4, 2, "uniform", torch.float64, torch.float64)
    assert flash_expert(*inputs).dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        flash_expert(*inputs, backend="triton")


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        flash_expert(*make_inputs(3, 8, 4, 2, "uniform", torch.float32), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        flash_expert(*make_inputs(3, 8, 4, 2, "uniform", torch.float32), backend="cuda")


@pytest.mark.parametrize("bad_id", [4, 1000, -1])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_indices_raise(bad_id, backend):
    hidden, down, up, indices, routing_weights = make_inputs(3, 8, 4, 2, "uniform", torch.float32)
    indices[2, 1] = bad_id
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        flash_expert(hidden, down, up, indices, routing_weights, backend=backend)


def _replace(inputs, position, value):
    return tuple(value if i == position else t for i, t in enumerate(inputs))


BAD_INPUTS = [
    # (what is wrong, builder from good inputs, error type, message fragment)
    ("hidden 1-D", lambda x: _replace(x, 0, x[0][0]), ValueError, "hidden_states must be 2-D"),
    ("down width != H", lambda x: _replace(x, 1, x[1][:, :-1]), ValueError, "down_weights and up_weights"),
    ("up rows != down rows", lambda x: _replace(x, 2, x[2][:-1]), ValueError, "down_weights and up_weights"),
    ("indices T mismatch", lambda x: _replace(x, 3, x[3][:-1]), ValueError, "indices"),
    ("routing weights shape", lambda x: _replace(x, 4, x[4][:, :-1]), ValueError, "routing_weights"),
    ("pool dtype != hidden dtype", lambda x: _replace(x, 1, x[1].double()), TypeError, "share a dtype"),
    ("float indices", lambda x: _replace(x, 3, x[3].float()), TypeError, "int64"),
    ("integer routing weights", lambda x: _replace(x, 4, x[3]), TypeError, "floating point"),
    ("integer hidden", lambda x: _replace(x, 0, x[3][:, :1].expand(-1, 8)), TypeError, "hidden_states has dtype"),
    ("not a tensor", lambda x: _replace(x, 2, x[2].tolist()), TypeError, "up_weights must be a torch.Tensor"),
    ("device mismatch", lambda x: _replace(x, 2, x[2].to("meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise(case):
    _, build, error, fragment = case
    inputs = build(make_inputs(3, 8, 4, 2, "uniform", torch.float32))
    with pytest.raises(error, match=fragment):
        flash_expert(*inputs)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize(
    "trainable", [("routing_weights",), ("down", "up"), ("hidden",), ("up", "routing_weights")], ids=str
)
def test_triton_gradients_of_a_subset_of_inputs(trainable, deterministic, small_tiles):
    """Frozen inputs get no gradient and the others are still right (the kernels skip work)."""
    names = ("hidden", "down", "up", "routing_weights")
    hidden, down, up, indices, routing_weights = make_inputs(6, 20, 9, 3, "uniform", torch.float32)
    grad_out = torch.randn(6, 20)
    inputs = (hidden, down, up, routing_weights)
    leaves = [t.clone().requires_grad_(name in trainable) for name, t in zip(names, inputs)]
    out = flash_expert(*leaves[:3], indices, leaves[3], backend="triton", deterministic=deterministic)
    out.backward(grad_out)
    expected = reference64(hidden, down, up, indices, routing_weights, grad_out)[1:]
    for name, leaf, wanted in zip(names, leaves, expected):
        if name in trainable:
            assert rel_l2(leaf.grad, wanted) < 1e-5, name
        else:
            assert leaf.grad is None, name
