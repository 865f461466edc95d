"""Kernel primitives, one family per folder, each with a plain-PyTorch ``naive.py`` beside
its Triton kernel."""

from moeflux.ops.experts import run_experts
from moeflux.ops.routing import Routing, route

__all__ = ["Routing", "route", "run_experts"]
