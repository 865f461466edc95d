"""moeflux: fast Mixture-of-Experts layers and Triton kernels for PyTorch.

Public API:

* :func:`moe` / :class:`MoE`: the DeepSeek-style MoE layer (router, routed + shared SwiGLU experts).
* :class:`MoEConfig`, :class:`MoEWeights`: its shapes and packed weights.
* :class:`MoEAux`: router probabilities, expert choices, loads and auxiliary losses.
* :func:`flash_expert` / :class:`FlashExpert`: many single-neuron experts (PEER-style),
  the primitive and a layer with a product-key router.
* :mod:`moeflux.ops`: the kernel primitives (routing, grouped matmul, flash expert), each
  with a PyTorch reference.
* :mod:`moeflux.gpumode`: the GPU MODE competition's input format, reference and entry point.
"""

from moeflux.config import MoEConfig
from moeflux.flash_expert_layer import FlashExpert
from moeflux.layer import MoE, MoEAux, moe
from moeflux.losses import load_balancing_loss, router_z_loss
from moeflux.ops.flash_expert import flash_expert
from moeflux.weights import MoEWeights

__version__ = "0.1.0"

__all__ = [
    "FlashExpert",
    "MoE",
    "MoEAux",
    "MoEConfig",
    "MoEWeights",
    "flash_expert",
    "load_balancing_loss",
    "moe",
    "router_z_loss",
]
