"""moeflux: fast Mixture-of-Experts layers and Triton kernels for PyTorch.

Public API:

* :func:`moe` / :class:`MoE`: the DeepSeek-style MoE layer (router, routed + shared SwiGLU experts).
* :class:`MoEConfig`, :class:`MoEWeights`: its shapes and packed weights.
* :class:`RouterConfig`: the routing rule (softmax or sigmoid scores, renormalisation,
  DeepSeek-V3's correction bias and group-limited top-k, gpt-oss's softmax after top-k,
  scaling, jitter, capacity factor).
* :class:`MoEAux`: router probabilities, expert choices, loads and auxiliary losses
  (:mod:`moeflux.losses`).
* :mod:`moeflux.balancing`: :class:`ExpertBiasUpdater` (auxiliary-loss-free balancing) and
  :class:`ExpertUsageMonitor` (running load, dead experts).
* :func:`flash_expert` / :class:`FlashExpert`: many single-neuron experts (PEER-style),
  the primitive and a layer with a product-key router.
* :mod:`moeflux.ops`: the kernel primitives (routing, grouped matmul, flash expert), each
  with a PyTorch reference.
* :class:`moeflux.distributed.ExpertParallelMoE`: the layer with its routed experts sharded
  over a ``torch.distributed`` group (expert parallelism).
* :mod:`moeflux.gpumode`: the GPU MODE competition's input format, reference and entry point.
"""

from moeflux.balancing import ExpertBiasUpdater, ExpertUsageMonitor
from moeflux.config import MoEConfig, RouterConfig
from moeflux.distributed import ExpertParallelMoE
from moeflux.flash_expert_layer import FlashExpert
from moeflux.layer import MoE, MoEAux, moe
from moeflux.losses import batch_balance_loss, load_balancing_loss, router_z_loss, sequence_balance_loss
from moeflux.ops.flash_expert import flash_expert
from moeflux.weights import MoEWeights

__version__ = "0.1.0"

__all__ = [
    "ExpertBiasUpdater",
    "ExpertParallelMoE",
    "ExpertUsageMonitor",
    "FlashExpert",
    "MoE",
    "MoEAux",
    "MoEConfig",
    "MoEWeights",
    "RouterConfig",
    "batch_balance_loss",
    "flash_expert",
    "load_balancing_loss",
    "moe",
    "router_z_loss",
    "sequence_balance_loss",
]
