"""Device memory of the Triton paths: what a call needs, and a check before it launches.

Each ``*_bytes`` function returns a :class:`Workspace`: the peak of the device memory a call
allocates (its temporaries and the tensors it returns, not the caller's inputs), computed from
the shapes alone by following the allocations in the code. The estimates are upper bounds
(the GPU check ``benchmarks/reliability_gpu.py`` compares them with
``torch.cuda.max_memory_allocated``); ``docs/memory.md`` gives them per token.

Before launching anything, the Triton experts (forward and backward) and the Triton flash
expert (forward and backward) call :func:`check_fits`: on a CUDA device, a request larger
than the memory a new allocation can get raises :class:`torch.OutOfMemoryError` naming the
bytes required and available, instead of failing half-way through the kernels. Requests below
:data:`CHECK_MIN_BYTES` and calls made during a CUDA graph capture skip the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moeflux.ops.dispatch import plan_bytes

# Requests below this skip the free-memory query (one cudaMemGetInfo, a few microseconds):
# a small call that does not fit fails at its first allocation anyway, and small calls are
# the latency-bound ones.
CHECK_MIN_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Workspace:
    """Device bytes of one call.

    Attributes:
        peak: the most the call has allocated at any one time (temporaries and outputs).
        outputs: of which the tensors it returns (and, for a training forward, what it saves
            for the backward: ``saved``).
        saved: bytes a training forward keeps for its backward after it returns (0 otherwise).
    """

    peak: int
    outputs: int
    saved: int = 0

    @property
    def temporaries(self) -> int:
        """``peak`` beyond what the call returns or saves: freed when it returns."""
        return self.peak - self.outputs - self.saved


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def experts_forward_bytes(
    num_tokens: int,
    hidden_size: int,
    expert_size: int,
    top_k: int,
    num_experts: int,
    num_shared_experts: int,
    dtype: torch.dtype,
    *,
    training: bool = False,
) -> Workspace:
    """Device bytes of the Triton experts forward (:func:`moeflux.ops.experts.triton.experts_triton_tables`,
    or with ``training`` the forward of :func:`moeflux.ops.experts.autograd.experts_autograd`).

    With ``P = T k'`` pairs (``k' = k + S``) and ``b`` bytes an element: the dispatch plan
    (:func:`moeflux.ops.dispatch.plan_bytes`), the float32 pair weights (``8 P`` bound), the
    SwiGLU output ``[P, D]``, the scattered down projections ``[P, H]`` and the output
    ``[T, H]``, all alive at once. Training adds the saved gate|up pre-activations ``[P, 2D]``.
    """
    T, H, D, b = num_tokens, hidden_size, expert_size, _itemsize(dtype)
    P = T * (top_k + num_shared_experts)
    plan_peak, plan_kept = plan_bytes(T, top_k, num_experts, num_shared_experts)
    retiled = plan_kept  # a second tile schedule while a GEMM of another block_m runs (bound)
    pair_weights = 4 * T * top_k + 4 * P  # the float32 cast, padded with the shared slots
    tables = 5 * 8 * (num_experts + num_shared_experts)  # the weights' address tables (int64)
    out = T * H * b
    if not training:
        peak = max(plan_peak, plan_kept + retiled) + tables + pair_weights + P * D * b + P * H * b + out
        return Workspace(peak=peak, outputs=out)
    pre = 2 * P * D * b
    saved = plan_kept + 4 * P + pre
    gemms = max(P * D * b + P * H * b, P * H * b + out)  # hidden is freed before the combine
    peak = max(plan_peak, plan_kept + retiled) + tables + pair_weights + pre + gemms
    return Workspace(peak=peak, outputs=out, saved=saved)


def experts_backward_bytes(
    num_tokens: int,
    hidden_size: int,
    expert_size: int,
    top_k: int,
    num_experts: int,
    num_shared_experts: int,
    dtype: torch.dtype,
    *,
    recompute: bool = False,
) -> Workspace:
    """Device bytes the backward of :func:`moeflux.ops.experts.autograd.experts_autograd`
    allocates (what its forward saved is counted there), every input needing a gradient.

    Live at once, at worst: ``g [P, D]`` (then ``w h``, ``dW_down``'s operand) and
    ``d_down [E', D, H]`` (``dpre`` overwrites the forward's saved ``pre``); later
    ``d_gate_up [E', H, 2D]``, one band of the scattered input gradients (``[P, band]``, at
    most ``max(2D, 1024)`` columns) and ``dx [T, H]``. Outputs: ``dx``, ``d_gate_up``,
    ``d_down`` and the routing weights' gradient.

    With ``recompute`` (nothing saved by the forward): the weight gradients and a float32
    ``dx`` sum from the start, and per band of ``w`` expert columns the recomputed ``[P, 2w]``
    pre-activations with ``g [P, w]`` (then ``w h``), then with one band of scattered
    input gradients (``[P, max(2w, 1024)]`` at most).
    """
    T, H, D, b = num_tokens, hidden_size, expert_size, _itemsize(dtype)
    E_all = num_experts + num_shared_experts
    P = T * (top_k + num_shared_experts)
    _, retiled = plan_bytes(T, top_k, num_experts, num_shared_experts)
    d_out_copy = T * H * b  # when the incoming gradient is not in x's dtype
    d_down, d_gate_up = E_all * D * H * b, 2 * E_all * H * D * b
    d_x, d_weights = T * H * b, 4 * T * top_k
    d_pair_weights = 4 * P
    from moeflux.ops.experts.autograd import _column_bands, _expert_bands  # noqa: PLC0415 - it imports this module

    tables = 5 * 8 * E_all  # the transposed weights' address tables (int64)
    if recompute:
        widths = [last - first for first, last in _expert_bands(D)] or [0]
        bands = [max((b_ - a_ for a_, b_ in _column_bands(H, w)), default=0) for w in widths]
        per_band = max(P * b * max(3 * w, 2 * w + h_band) for w, h_band in zip(widths, bands))
        d_x_sum = 4 * T * H
        peak = (d_out_copy + 2 * d_pair_weights + retiled + tables + d_down + d_gate_up + d_weights + d_x_sum
                + max(per_band, d_x))  # fmt: skip
        return Workspace(peak=peak, outputs=d_x + d_down + d_gate_up + d_weights)
    band = max(last - first for first, last in _column_bands(H, D)) if H > 0 else 0
    stages = max(
        P * D * b + d_down,  # g (then w h), d_down
        d_down + d_gate_up + P * band * b + d_x,  # weight grads, one band of scattered dx, dx
    )
    peak = d_out_copy + d_pair_weights + retiled + tables + stages + d_weights
    return Workspace(peak=peak, outputs=d_x + d_down + d_gate_up + d_weights)


def _sort_bytes(num_pairs: int) -> int:
    """A stable ``torch.sort`` of ``num_pairs`` int32 keys with int64 indices, and its
    temporaries (key cast, radix-sort double buffers): a bound, ``36`` bytes a pair."""
    return 36 * num_pairs


def flash_expert_forward_bytes(
    num_tokens: int, hidden_size: int, num_experts: int, top_k: int, dtype: torch.dtype, *, sorted_dots: bool = False
) -> Workspace:
    """Device bytes of the Triton flash-expert forward: float32 scores and coefficients
    ``[T, K]``, the output ``[T, H]`` and, with ``sorted_dots``, the pairs sorted by expert.
    Contiguous copies of strided inputs are extra (:func:`input_copy_bytes`)."""
    T, H, K, b = num_tokens, hidden_size, top_k, _itemsize(dtype)
    out = T * H * b
    sort = _sort_bytes(T * K) if sorted_dots else 0
    return Workspace(peak=sort + 8 * T * K + out, outputs=out, saved=4 * T * K + (12 * T * K if sorted_dots else 0))


def flash_expert_backward_bytes(
    num_tokens: int,
    hidden_size: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    *,
    deterministic: bool = True,
    routing_weights_dtype: torch.dtype = torch.float32,
) -> Workspace:
    """Device bytes of the Triton flash-expert backward, every input needing a gradient:
    per-pair terms ``[T, K]``, ``d_hidden [T, H]``, the pool gradients ``2 x [E, H]`` and
    either the pairs sorted by expert (``deterministic``) or two float32 ``[E, H]``
    accumulators converted at the end. A copy of a strided incoming gradient is counted."""
    T, H, E, K, b = num_tokens, hidden_size, num_experts, top_k, _itemsize(dtype)
    grad_out_copy = T * H * b
    pair_terms = 8 * T * K + T * K * _itemsize(routing_weights_dtype)
    d_hidden, d_pools = T * H * b, 2 * E * H * b
    if deterministic:
        reduction = _sort_bytes(T * K) + 8 * (E + 1)  # sorted pairs, expert starts and their boundaries
    else:
        reduction = 2 * E * H * 4  # float32 accumulators, alive while converted into d_pools
    outputs = d_hidden + d_pools + T * K * _itemsize(routing_weights_dtype)
    return Workspace(peak=grad_out_copy + pair_terms + d_hidden + d_pools + reduction, outputs=outputs)


def input_copy_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the contiguous copies made of the ``tensors`` whose last dimension is strided."""
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0 and t.stride(-1) != 1 and t.numel() > 1)


def available_bytes(device: torch.device, at_least: int = 0) -> int | None:
    """Bytes a new allocation on ``device`` can get: the driver's free memory
    (``torch.cuda.mem_get_info``) and, when that is below ``at_least``, what PyTorch's caching
    allocator holds reserved but unallocated (it serves those first; they may be fragmented).
    ``None`` off CUDA, where nothing is checked."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if free >= at_least:
        return free
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_fits(
    required: int, device: torch.device, what: str, *, per_token: Callable[[], int] | None = None
) -> None:
    """Raise :class:`torch.OutOfMemoryError` if ``required`` bytes cannot be allocated on
    ``device``, before anything launches. No query below :data:`CHECK_MIN_BYTES`, off CUDA
    (unless a test patches :func:`available_bytes`), or during a CUDA graph capture.

    ``per_token``: returns the bytes one more token adds, named in the message to suggest a
    batch size; called only when raising, so the hot path does not pay for it.
    """
    if required < CHECK_MIN_BYTES:
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    available = available_bytes(device, at_least=required)
    if available is None or required <= available:
        return
    hint = ""
    if per_token is not None and (bytes_a_token := per_token()):
        hint = f"; it takes about {bytes_a_token:,} bytes a token: split the batch into chunks that fit"
    raise torch.OutOfMemoryError(
        f"{what} needs {required:,} bytes ({required / 2**30:.2f} GiB) of device memory for its workspace and "
        f"outputs, but {device} has {available:,} bytes ({available / 2**30:.2f} GiB) free, counting memory "
        f"PyTorch's caching allocator holds unallocated{hint}"
    )


def per_token_bytes(bytes_of_tokens, num_tokens: int) -> int:
    """The bytes one token adds to ``bytes_of_tokens(T)`` (a function of the token count),
    averaged over ``num_tokens`` tokens."""
    if num_tokens <= 0:
        return 0
    return max(0, -(-(bytes_of_tokens(num_tokens) - bytes_of_tokens(0)) // num_tokens))


# (name, T, H, D, E, k, S, dtype): the layer shapes of docs/memory.md (moeflux/data/*.json).
LAYER_SHAPES = (
    ("competition (bs 1, seq 8192)", 8192, 7168, 2048, 32, 4, 1, torch.float16),
    ("qwen3-30b-a3b-prefill", 4096, 2048, 768, 128, 8, 0, torch.bfloat16),
    ("mixtral-8x7b-prefill", 4096, 4096, 14336, 8, 2, 0, torch.bfloat16),
    ("deepseek-v3-slice-prefill", 4096, 7168, 2048, 64, 8, 1, torch.bfloat16),
)
# (name, T, H, E, K, dtype): the flash-expert shapes of the README's table.
FLASH_SHAPES = (
    ("flash H=1024 K=16 E=65536", 8192, 1024, 65536, 16, torch.bfloat16),
    ("flash H=2048 K=64 E=1048576", 8192, 2048, 2**20, 64, torch.bfloat16),
)


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def per_token_table() -> list[list[str]]:
    """The rows of docs/memory.md's table for the Triton experts: per token (KiB, averaged
    over ``T`` tokens) the inference forward, the training forward's peak and what it saves,
    the backward's peak, the recomputing backward's peak (``recompute=True``, whose forward
    is the inference one); and the backward's fixed part (MiB: the weight gradients)."""
    rows = []
    for name, T, H, D, E, k, S, dtype in LAYER_SHAPES:
        def forward(t, training=False):
            return experts_forward_bytes(t, H, D, k, E, S, dtype, training=training)

        def backward(t, recompute=False):
            return experts_backward_bytes(t, H, D, k, E, S, dtype, recompute=recompute).peak

        rows.append([
            name, str(T), str(dtype).removeprefix("torch."),
            _kib(per_token_bytes(lambda t: forward(t).peak, T)),
            _kib(per_token_bytes(lambda t: forward(t, True).peak, T)),
            _kib(per_token_bytes(lambda t: forward(t, True).saved, T)),
            _kib(per_token_bytes(backward, T)),
            _kib(per_token_bytes(lambda t: backward(t, True), T)),
            _mib(backward(0)),
        ])  # fmt: skip
    return rows


def flash_per_token_table() -> list[list[str]]:
    """The rows of docs/memory.md's flash-expert table: per token (KiB) the forward and the
    backward (deterministic), and the backward's fixed part (MiB: the two ``[E, H]`` pool
    gradients)."""
    rows = []
    for name, T, H, E, K, dtype in FLASH_SHAPES:
        def backward(t):
            return flash_expert_backward_bytes(t, H, E, K, dtype).peak

        rows.append([
            name, str(T), str(dtype).removeprefix("torch."),
            _kib(per_token_bytes(lambda t: flash_expert_forward_bytes(t, H, E, K, dtype).peak, T)),
            _kib(per_token_bytes(backward, T)),
            _mib(backward(0)),
        ])  # fmt: skip
    return rows


if __name__ == "__main__":  # python3 -m moeflux.memory: the tables of docs/memory.md
    for table in (per_token_table(), flash_per_token_table()):
        print("\n".join("| " + " | ".join(row) + " |" for row in table) + "\n")
