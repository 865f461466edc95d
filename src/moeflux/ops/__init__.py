"""Kernel primitives, one family per folder, each with a plain-PyTorch ``naive.py`` beside
its Triton kernel."""

from moeflux.ops.experts import run_experts
from moeflux.ops.flash_expert import flash_expert
from moeflux.ops.routing import Routing, route

__all__ = ["Routing", "flash_expert", "route", "run_experts"]
