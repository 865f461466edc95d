"""Layer shapes the suite runs: presets, and the files shipped in ``moeflux/data``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources


@dataclass(frozen=True)
class Shape:
    """One MoE layer and batch, in the competition's vocabulary (``T = bs * seqlen``)."""

    name: str
    dhidden: int
    dexpert: int
    nroutedexperts: int
    nsharedexperts: int
    nexpertspertoken: int
    bs: int
    seqlen: int
    seed: int

    @property
    def tokens(self) -> int:
        return self.bs * self.seqlen

    def seed_args(self) -> dict[str, int]:
        """Keyword arguments of :func:`moeflux.gpumode.generate_input`."""
        args = asdict(self)
        del args["name"]
        return args

    def flops(self) -> int:
        """Forward FLOPs: router GEMM + k routed and S shared SwiGLU experts (3 GEMMs each)."""
        T, H, D = self.tokens, self.dhidden, self.dexpert
        router = 2 * T * H * self.nroutedexperts
        return router + 2 * T * H * 3 * D * (self.nexpertspertoken + self.nsharedexperts)


def _load(name: str) -> dict:
    return json.loads(resources.files("moeflux.data").joinpath(name).read_text())


def _from_entries(entries: list[dict], prefix: str) -> list[Shape]:
    shapes = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        name = entry.pop("name", None) or f"{prefix}-{i}-T{entry['bs'] * entry['seqlen']}-E{entry['nroutedexperts']}"
        shapes.append(Shape(name=name, **entry))
    return shapes


def competition_shapes(kind: str = "benchmarks") -> list[Shape]:
    """The competition's ``tests`` or ``benchmarks`` shapes."""
    return _from_entries(_load("competition.json")[kind], kind[:-1] if kind.endswith("s") else kind)


def model_shapes() -> list[Shape]:
    """Layer shapes of public MoE models (Qwen3, Mixtral, DeepSeek-V3 slices)."""
    return _from_entries(_load("models.json")["shapes"], "model")


def cpu_small_shapes() -> list[Shape]:
    """The competition's test shapes scaled down to run in seconds on a CPU."""
    scaled = []
    for i, shape in enumerate(competition_shapes("tests") + competition_shapes("benchmarks")[:1]):
        scaled.append(
            Shape(
                name=f"small-{i}-E{shape.nroutedexperts}-T{min(shape.tokens, 256)}",
                dhidden=256, dexpert=128, nroutedexperts=shape.nroutedexperts,
                nsharedexperts=shape.nsharedexperts, nexpertspertoken=shape.nexpertspertoken,
                bs=1, seqlen=min(shape.tokens, 256), seed=shape.seed,
            )
        )  # fmt: skip
    return scaled


PRESETS = {
    "cpu-small": cpu_small_shapes,
    "competition": lambda: competition_shapes("benchmarks"),
    "competition-tests": lambda: competition_shapes("tests"),
    "models": model_shapes,
}
