"""Hugging Face transformers' sparse-MoE blocks on moeflux, in one call.

Example:
    >>> from moeflux.integrations.transformers import apply_moeflux
    >>> model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-30B-A3B", dtype=torch.bfloat16, device_map="cuda")
    >>> apply_moeflux(model)         # every sparse-MoE block of this model, in place
    >>> apply_moeflux_to_qwen3_moe()  # or: the classes, for every Qwen3-MoE model built afterwards

A transformers 5 sparse-MoE block is a router module (``block.gate``: hidden states ->
``(router_logits, top_k_weights, top_k_index)``) and an experts module (``block.experts``:
fused parameters ``gate_up_proj [E, 2D, H]``, gate rows then up rows, and
``down_proj [E, H, D]``), glued by the block's own ``forward``. The patch gives the router
and the experts new forwards and leaves the block alone:

* router: the logits as the model computes them, then :func:`moeflux.ops.route` with the
  model's rule, a :class:`moeflux.RouterConfig` read from the router module (softmax or
  sigmoid, renormalisation, expert groups, correction bias, scaling; see ``ARCHITECTURES``);
* experts: :func:`moeflux.ops.run_experts` on transposed *views* of the fused parameters,
  ``[E, H, 2D]`` and ``[E, D, H]`` with unit stride along the reduction dimension, which the
  Triton kernels read in place. Nothing is copied or re-registered: ``state_dict``,
  ``save_pretrained`` and optimisers keep seeing the model's own parameters, and gradients
  land in them.

Since the block's forward is the model's, it returns what it returned and does what it did
around the experts: Qwen2-MoE's sigmoid-gated shared expert and DeepSeek-V3's shared experts
run through the model's own MLP modules beside moeflux's routed experts, Mixtral's input
jitter is applied as before. The router is still the module transformers hooks to record
``router_logits``, so ``output_router_logits=True`` (and the ``aux_loss`` built from them)
keeps working.

Differences from the original, all at the rounding level of the activations' dtype: experts
are ranked by float32 scores as in the models, but the chosen weights stay float32 into the
experts (Qwen and OLMoE cast them to the activations' dtype first), and each token's ``k``
expert outputs are summed in float32 in a fixed order. The patched router returns float32
weights and int64 ids.

A patched experts module caches the weight views and the address tables the Triton kernels
read; the cache is rebuilt when the parameters move (``model.to(...)`` drops it at once).
``copy.deepcopy`` of a patched model gives a patched copy; pickling the whole module
(``torch.save(model)``) needs :func:`revert_moeflux` first (``state_dict`` needs nothing).
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeflux.backends import BACKENDS, resolve_backend
from moeflux.config import RouterConfig
from moeflux.ops.experts import run_experts
from moeflux.ops.routing import route
from moeflux.weights import MoEWeights

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "apply_moeflux",
    "apply_moeflux_to_deepseek_v3",
    "apply_moeflux_to_mixtral",
    "apply_moeflux_to_olmoe",
    "apply_moeflux_to_qwen2_moe",
    "apply_moeflux_to_qwen3_moe",
    "revert_moeflux",
]


@dataclass(frozen=True)
class Architecture:
    """Where one transformers model family keeps its sparse-MoE block, and its routing rule.

    Attributes:
        model_type: transformers' ``config.model_type``.
        module: the modeling module that defines the classes.
        router: class name of the router, ``forward(hidden [..., H]) -> (logits [T, E],
            weights [T, k], ids [T, k])``, with parameter ``weight [E, H]`` and attribute ``top_k``.
        experts: class name of the experts, ``forward(hidden [T, H], ids [T, k], weights [T, k])
            -> [T, H]``, with parameters ``gate_up_proj [E, 2D, H]`` and ``down_proj [E, H, D]``.
        router_config: the routing rule of a router instance (read from its attributes).
        float32_logits: the router computes its logits in float32, input and weight upcast
            (DeepSeek-V3); otherwise in the activations' dtype.
    """

    model_type: str
    module: str
    router: str
    experts: str
    router_config: Callable[[nn.Module], RouterConfig]
    float32_logits: bool = False


def _softmax_topk(router: nn.Module) -> RouterConfig:
    """Qwen3-MoE, Qwen2-MoE, OLMoE: softmax, top-k, renormalised when ``norm_topk_prob``."""
    return RouterConfig(normalize_topk=bool(router.norm_topk_prob))


def _softmax_topk_normalized(router: nn.Module) -> RouterConfig:
    """Mixtral: softmax, top-k, always renormalised."""
    return RouterConfig(normalize_topk=True)


def _deepseek_v3(router: nn.Module) -> RouterConfig:
    """DeepSeek-V3: sigmoid scores, ``e_score_correction_bias`` on the choice only, the
    ``topk_group`` best of ``n_group`` groups (scored by their two best experts),
    renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``."""
    return RouterConfig(
        scoring="sigmoid", normalize_topk=bool(router.norm_topk_prob), num_groups=int(router.num_group),
        topk_groups=int(router.topk_group), scaling_factor=float(router.routed_scaling_factor), expert_bias=True,
    )  # fmt: skip


def _architecture(model_type: str, prefix: str, rule: Callable[[nn.Module], RouterConfig], **extra) -> Architecture:
    module = f"transformers.models.{model_type}.modeling_{model_type}"
    return Architecture(model_type, module, f"{prefix}TopKRouter", f"{prefix}Experts", rule, **extra)


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        _architecture("qwen3_moe", "Qwen3Moe", _softmax_topk),
        _architecture("qwen2_moe", "Qwen2Moe", _softmax_topk),
        _architecture("olmoe", "Olmoe", _softmax_topk),
        _architecture("mixtral", "Mixtral", _softmax_topk_normalized),
        # DeepSeek spells its router "Topk".
        Architecture(
            "deepseek_v3",
            "transformers.models.deepseek_v3.modeling_deepseek_v3",
            "DeepseekV3TopkRouter",
            "DeepseekV3Experts",
            _deepseek_v3,
            float32_logits=True,
        ),
    )
}

# The experts layout moeflux reads, as transformers' ``use_experts_implementation`` flags it.
_EXPERTS_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True}
_CACHE = "_moeflux_weights"  # instance attribute of a patched experts module
_PATCHED = "_moeflux_patched"  # instance attribute: the names patched on this instance
_ROLE_METHODS = {"router": ("forward",), "experts": ("forward", "_apply")}
_MISSING = object()
# class -> its attributes before the patch (_MISSING: defined by a base class only)
_patched_classes: dict[type, dict[str, object]] = {}


# --- the patched methods -----------------------------------------------------------------


def _router_methods(architecture: Architecture, backend: str) -> dict[str, Callable]:
    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.weight.shape[1])
        if architecture.float32_logits:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight)
        rule = architecture.router_config(self)
        bias = self.e_score_correction_bias.float() if rule.expert_bias else None
        # Ranked on float32 scores, as the models rank.
        routing = route(logits.float(), self.top_k, router=rule, expert_bias=bias,
                        backend=resolve_backend(backend, x.device))  # fmt: skip
        return logits, routing.expert_weights, routing.expert_ids

    return {"forward": forward}


def _experts_methods(backend: str, next_apply: Callable) -> dict[str, Callable]:
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        weights = _expert_weights(self)
        return run_experts(hidden_states, top_k_index, top_k_weights.float(), weights,
                           backend=resolve_backend(backend, hidden_states.device))  # fmt: skip

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the parameters: drop the views of the old storage at once, so
        # e.g. ``model.cpu()`` frees the GPU copy.
        self.__dict__.pop(_CACHE, None)
        return next_apply(self, fn, *args, **kwargs)

    return {"forward": forward, "_apply": _apply}


def _expert_weights(experts: nn.Module) -> MoEWeights:
    """The experts' fused parameters as :class:`moeflux.MoEWeights` views (no copy):
    ``gate_up_proj [E, 2D, H] -> gate_up [E, H, 2D]``, ``down_proj [E, H, D] -> down [E, D, H]``.

    Fresh views on every call (autograd records them), in one cached object whose address
    tables stay valid while the parameters stay where they are.
    """
    gate_up = experts.gate_up_proj.transpose(1, 2)
    down = experts.down_proj.transpose(1, 2)
    cached = getattr(experts.__dict__.get(_CACHE), "weights", None)
    if cached is not None and _same_memory(cached.gate_up, gate_up) and _same_memory(cached.down, down):
        cached.gate_up, cached.down = gate_up, down
        return cached
    _check_experts(experts)
    num_experts, hidden_size = gate_up.shape[0], gate_up.shape[1]
    # The experts never read the router; a zero-stride placeholder gives E and H.
    placeholder_router = gate_up.new_zeros(()).expand(num_experts, hidden_size)
    weights = MoEWeights(router=placeholder_router, gate_up=gate_up, down=down)
    weights.validate()
    experts.__dict__[_CACHE] = _WeightsCache(weights)
    return weights


class _WeightsCache:
    """Holds a patched experts module's :class:`MoEWeights` views. A copy of the module
    (``copy.deepcopy``, pickling) starts empty and builds its own: views of this module's
    storage are of no use to it, and views that autograd recorded cannot be deep-copied."""

    __slots__ = ("weights",)

    def __init__(self, weights: MoEWeights | None = None) -> None:
        self.weights = weights

    def __deepcopy__(self, memo: dict) -> "_WeightsCache":
        return _WeightsCache()

    def __reduce__(self):
        return (_WeightsCache, ())


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    def where(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device

    return where(a) == where(b)


def _check_experts(experts: nn.Module, where: str | None = None) -> None:
    """Raise ``ValueError`` unless moeflux can run this experts module: fused
    ``gate_up_proj`` / ``down_proj`` without biases, gate rows before up rows, SiLU.
    ``where`` names the module in the message (its path in the model)."""
    where = where or type(experts).__name__
    odd = {name: getattr(experts, name) for name, usual in _EXPERTS_LAYOUT.items()
           if getattr(experts, name, usual) != usual}  # fmt: skip
    if odd:
        settings = ", ".join(f"{name}={value}" for name, value in odd.items())
        raise ValueError(
            f"{where} has {settings}; moeflux runs experts stored as gate_up_proj [E, 2D, H] "
            "(gate rows, then up rows) and down_proj [E, H, D], without biases"
        )
    probe = torch.linspace(-4.0, 4.0, 9)
    activation = getattr(experts, "act_fn", None)
    if activation is None or not torch.allclose(activation(probe), F.silu(probe)):
        raise ValueError(
            f"{where} uses the activation {type(activation).__name__}; moeflux runs SwiGLU experts (hidden_act='silu')"
        )


def _check_router(router: nn.Module, architecture: Architecture, where: str) -> None:
    """Raise ``ValueError`` unless the router's rule can choose its ``top_k`` experts."""
    try:
        architecture.router_config(router).validate(router.weight.shape[0], router.top_k)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


# --- patching ----------------------------------------------------------------------------


def _role(cls: type) -> tuple[Architecture, str] | None:
    """``(architecture, "router" | "experts")`` of a module class (or a base of it), else None.
    Matched by module path and name, so no modeling module is imported to look."""
    for base in cls.__mro__:
        for architecture in ARCHITECTURES.values():
            if base.__module__ == architecture.module:
                if base.__name__ == architecture.router:
                    return architecture, "router"
                if base.__name__ == architecture.experts:
                    return architecture, "experts"
    return None


def _methods(architecture: Architecture, role: str, backend: str, next_apply: Callable) -> dict[str, Callable]:
    if role == "router":
        return _router_methods(architecture, backend)
    return _experts_methods(backend, next_apply)


def _class_apply(self: nn.Module, *args, **kwargs):
    """The ``_apply`` of the module's class (an instance patch defers to it)."""
    return type(self)._apply(self, *args, **kwargs)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _apply(architectures: list[Architecture], model: nn.Module | None, backend: str) -> nn.Module | None:
    _check_backend(backend)
    if model is None:
        for architecture in architectures:
            _patch_classes(architecture, backend)
        return None
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wanted = {architecture.model_type for architecture in architectures}
    found = []
    for name, module in model.named_modules():
        match = _role(type(module))
        if match is not None and match[0].model_type in wanted:
            found.append((name, module, *match))
    if not found:
        names = ", ".join(sorted(wanted))
        raise ValueError(f"{type(model).__name__} has no sparse-MoE block moeflux can run (looked for: {names})")
    for name, module, architecture, role in found:  # check everything before changing anything
        where = f"{name} ({type(module).__name__})"
        if role == "experts":
            _check_experts(module, where)
        else:
            _check_router(module, architecture, where)
    for _, module, architecture, role in found:
        _unpatch_instance(module)
        methods = _methods(architecture, role, backend, _class_apply)
        for name, function in methods.items():
            module.__dict__[name] = types.MethodType(function, module)
        module.__dict__[_PATCHED] = tuple(methods)
    return model


def _patch_classes(architecture: Architecture, backend: str) -> None:
    try:
        modeling = importlib.import_module(architecture.module)
    except ImportError as error:
        raise ImportError(
            f"moeflux's {architecture.model_type} patch needs transformers >= 5 ({error}); pip install transformers"
        ) from error
    for role, class_name in (("router", architecture.router), ("experts", architecture.experts)):
        cls = getattr(modeling, class_name)
        before = {name: cls.__dict__.get(name, _MISSING) for name in _ROLE_METHODS[role]}
        originals = _patched_classes.setdefault(cls, before)  # a second patch keeps the first originals
        methods = _methods(architecture, role, backend, _base_apply(cls, originals.get("_apply", _MISSING)))
        for name, function in methods.items():
            setattr(cls, name, function)


def _base_apply(cls: type, original: object) -> Callable:
    """What a class patch's ``_apply`` defers to: the class's own, else its base's."""
    if original is not _MISSING:
        return original
    return lambda self, *args, **kwargs: super(cls, self)._apply(*args, **kwargs)


def _unpatch_instance(module: nn.Module) -> None:
    for name in module.__dict__.pop(_PATCHED, ()):
        module.__dict__.pop(name, None)
    module.__dict__.pop(_CACHE, None)


def apply_moeflux(model: nn.Module | None = None, *, backend: str = "auto") -> nn.Module | None:
    """Run the sparse-MoE blocks of ``model`` on moeflux (in place), or with ``model=None``
    those of every supported architecture's classes, for models built afterwards.

    Args:
        model: a transformers model (any module holding supported blocks: a causal LM, a
            bare decoder, a multimodal model around a supported text model), or ``None``.
        backend: ``"auto"`` (Triton on CUDA tensors, PyTorch elsewhere), ``"torch"`` or
            ``"triton"``; see :mod:`moeflux.backends`.

    Returns:
        ``model`` (``None`` when patching classes).

    Raises:
        ValueError: ``model`` holds no supported block; a block moeflux cannot run (experts
            with biases or another activation than SiLU); an unknown ``backend``.

    Example:
        >>> model = apply_moeflux(AutoModelForCausalLM.from_config(config))
        >>> model.generate(input_ids, max_new_tokens=20)
    """
    return _apply(list(ARCHITECTURES.values()), model, backend)


def revert_moeflux(model: nn.Module | None = None) -> None:
    """Undo :func:`apply_moeflux`: on the modules of ``model``, or with ``model=None`` on the
    patched classes. The parameters were never touched, so nothing else changes."""
    if model is not None:
        for module in model.modules():
            _unpatch_instance(module)
        return
    for cls, originals in list(_patched_classes.items()):
        for name, original in originals.items():
            if original is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
        del _patched_classes[cls]


def _per_architecture(architecture: Architecture) -> Callable[..., nn.Module | None]:
    def apply(model: nn.Module | None = None, *, backend: str = "auto") -> nn.Module | None:
        return _apply([architecture], model, backend)

    apply.__name__ = apply.__qualname__ = f"apply_moeflux_to_{architecture.model_type}"
    apply.__doc__ = (
        f"Run the {architecture.model_type} sparse-MoE blocks of ``model`` on moeflux (in place), or with "
        f"``model=None`` patch the classes {architecture.router} and {architecture.experts} for every model "
        "built afterwards. See :func:`apply_moeflux`."
    )
    return apply


apply_moeflux_to_qwen3_moe = _per_architecture(ARCHITECTURES["qwen3_moe"])
apply_moeflux_to_qwen2_moe = _per_architecture(ARCHITECTURES["qwen2_moe"])
apply_moeflux_to_olmoe = _per_architecture(ARCHITECTURES["olmoe"])
apply_moeflux_to_mixtral = _per_architecture(ARCHITECTURES["mixtral"])
apply_moeflux_to_deepseek_v3 = _per_architecture(ARCHITECTURES["deepseek_v3"])
