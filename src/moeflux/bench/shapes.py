"""What the suite runs: layer shapes, their FLOP and byte counts, and the named presets.

Two workloads share the suite:

* ``moe``: the DeepSeek-style layer (:class:`Shape`, the competition's vocabulary).
* ``flash-expert``: a pool of rank-one experts (:class:`FlashExpertShape`).

A *preset* is a named list of shapes of one workload with the dtype it is meant for on a
GPU; ``PRESETS`` holds them all. Custom shapes come from :func:`custom_shapes` (command-line
flags) or :func:`shapes_from_file` (YAML or JSON).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

MODES = ("forward", "train")

# Backward of a GEMM is two GEMMs of the forward's size (input and weight gradients), so
# forward + backward costs three forwards. Routing and softmax are negligible beside them.
TRAIN_FLOP_FACTOR = 3


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

    workload = "moe"

    @property
    def tokens(self) -> int:
        return self.bs * self.seqlen

    @property
    def layer(self) -> str:
        """The layer without the batch, e.g. ``H7168 D2048 E32+1 k4`` (plots group by it)."""
        shared = f"+{self.nsharedexperts}" if self.nsharedexperts else ""
        return f"H{self.dhidden} D{self.dexpert} E{self.nroutedexperts}{shared} k{self.nexpertspertoken}"

    def seed_args(self) -> dict[str, int]:
        """Keyword arguments of :func:`moeflux.gpumode.generate_input`."""
        args = asdict(self)
        del args["name"]
        return args

    def params(self) -> dict[str, int]:
        """The shape's numbers, for result files."""
        return {**self.seed_args(), "tokens": self.tokens}

    def with_tokens(self, tokens: int, name: str | None = None) -> "Shape":
        """The same layer at ``tokens`` tokens (one sequence)."""
        return Shape(
            name or f"{self.name}-T{tokens}", self.dhidden, self.dexpert, self.nroutedexperts,
            self.nsharedexperts, self.nexpertspertoken, 1, tokens, self.seed,
        )  # fmt: skip

    def flops(self, mode: str = "forward") -> int:
        """Useful FLOPs of one call: router GEMM ``2·T·H·E`` plus, per token, ``k`` routed and
        ``S`` shared SwiGLU slices of width ``D``, three GEMMs each: ``2·T·H·3D·(k + S)``.
        ``mode="train"`` (forward + backward) counts three forwards."""
        T, H, D = self.tokens, self.dhidden, self.dexpert
        router = 2 * T * H * self.nroutedexperts
        experts = 2 * T * H * 3 * D * (self.nexpertspertoken + self.nsharedexperts)
        return (router + experts) * (TRAIN_FLOP_FACTOR if mode == "train" else 1)

    def bytes_moved(self, itemsize: int, active_experts: int | None = None, mode: str = "forward") -> int:
        """Fewest bytes one call must move through device memory: every weight it uses read
        once (router ``E·H``; ``3·H·D`` per routed expert that got a token and per shared
        slice), the input read and the output written (``T·H`` each).

        ``active_experts`` is how many routed experts got at least one token (known after
        routing); without it, ``min(E, T·k)``, the most that can. ``mode="train"`` reads the
        weights twice and writes their gradients (3x), and moves five ``T·H`` activations
        (input and output forward; output gradient, input and input gradient backward).
        """
        T, H, D, E = self.tokens, self.dhidden, self.dexpert, self.nroutedexperts
        if active_experts is None:
            active_experts = min(E, T * self.nexpertspertoken)
        weights = E * H + 3 * H * D * (active_experts + self.nsharedexperts)
        if mode == "train":
            return itemsize * (3 * weights + 5 * T * H)
        return itemsize * (weights + 2 * T * H)

    def memory_needed(self, itemsize: int) -> int:
        """Rough device memory to time every system on this shape: the seed-format weights, the
        packed copy and one system's copy (3x the weights), and for the activations
        of ``T·(k+S)`` pairs (gathered input, gate|up, hidden, down output) room for four."""
        T, H, D = self.tokens, self.dhidden, self.dexpert
        E, S, k = self.nroutedexperts, self.nsharedexperts, self.nexpertspertoken
        weights = E * H + 3 * H * D * (E + S)
        pairs = T * (k + S)
        activations = pairs * (H + 2 * D + D + H) + 4 * T * H
        return itemsize * (3 * weights + 4 * activations)


@dataclass(frozen=True)
class FlashExpertShape:
    """One flash-expert call: ``T`` tokens of width ``H``, each mixing ``K`` of ``E`` rank-one
    experts (rows of two ``[E, H]`` pools)."""

    name: str
    tokens: int
    hidden: int
    num_experts: int
    top_k: int
    seed: int = 0

    workload = "flash-expert"

    @property
    def layer(self) -> str:
        return f"H{self.hidden} E{self.num_experts} K{self.top_k}"

    def params(self) -> dict[str, int]:
        return {"tokens": self.tokens, "hidden": self.hidden, "num_experts": self.num_experts,
                "top_k": self.top_k, "seed": self.seed}  # fmt: skip

    def flops(self, mode: str = "forward") -> int:
        """Per (token, slot): a dot product with the down row and a scaled add of the up row,
        ``2·H`` each: ``4·T·K·H``. ``mode="train"`` counts three forwards."""
        forward = 4 * self.tokens * self.top_k * self.hidden
        return forward * (TRAIN_FLOP_FACTOR if mode == "train" else 1)

    def bytes_moved(self, itemsize: int, active_experts: int | None = None, mode: str = "forward") -> int:
        """``K`` gathered rows of both pools per token (``2·T·K·H``) plus the input and output
        (``T·H`` each). ``mode="train"`` adds the rows' gradients written (``2·T·K·H``) and
        the output gradient read and the input gradient written (``2·T·H``)."""
        T, H, K = self.tokens, self.hidden, self.top_k
        forward = 2 * T * K * H + 2 * T * H
        if mode == "train":
            return itemsize * (2 * forward)
        return itemsize * forward

    def memory_needed(self, itemsize: int) -> int:
        """Both pools, and the torch path's gathered ``[T, K, H]`` rows of both pools in float32."""
        T, H, K, E = self.tokens, self.hidden, self.top_k, self.num_experts
        return 2 * E * H * itemsize + 2 * T * K * H * 4 + 4 * T * H * itemsize


AnyShape = Shape | FlashExpertShape


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


def layers() -> dict[str, Shape]:
    """Named layer shapes (the batch is a placeholder): the competition's ranked layer and
    each model of ``models.json`` (its first entry, e.g. ``qwen3-30b-a3b``)."""
    named = {"competition": competition_shapes("benchmarks")[0]}
    for shape in model_shapes():
        model = shape.name.rsplit("-", 1)[0]  # "qwen3-30b-a3b-prefill" -> "qwen3-30b-a3b"
        named.setdefault(model, shape)
    return {name: shape.with_tokens(1, name) for name, shape in named.items()}


def token_sweep(layer: Shape, tokens: list[int]) -> list[Shape]:
    """``layer`` at each token count, named ``<layer>-T<tokens>``; seeds differ per count."""
    return [
        Shape(f"{layer.name}-T{t}", layer.dhidden, layer.dexpert, layer.nroutedexperts, layer.nsharedexperts,
              layer.nexpertspertoken, 1, t, seed=1000 + t)
        for t in tokens
    ]  # fmt: skip


# Model presets: the model's layer from a decode step to a long prefill; T=32 and T=4096 are
# the decode and prefill points of models.json.
MODEL_TOKENS = [1, 8, 32, 128, 512, 2048, 4096, 8192]
DECODE_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128]
SWEEP_TOKENS = [2**i for i in range(15)]  # 1 ... 16384


def custom_layer(*, hidden: int, expert_dim: int, experts: int, top_k: int, shared: int = 0) -> Shape:
    """A layer from command-line flags (one token; sweeps and :func:`custom_shapes` set T)."""
    layer = Shape("custom", hidden, expert_dim, experts, shared, top_k, 1, 1, 0)
    return layer.with_tokens(1, "custom-" + layer.layer.replace(" ", "-"))


def custom_shapes(
    *, hidden: int, expert_dim: int, experts: int, top_k: int, shared: int = 0, tokens: list[int], seed: int = 0
) -> list[Shape]:
    """Shapes from command-line flags: one layer at each token count."""
    layer = custom_layer(hidden=hidden, expert_dim=expert_dim, experts=experts, top_k=top_k, shared=shared)
    return [Shape(f"{layer.name}-T{t}", hidden, expert_dim, experts, shared, top_k, 1, t, seed + i)
            for i, t in enumerate(tokens)]  # fmt: skip


# Friendly keys accepted in shape files, mapped to the competition's.
_FILE_KEYS = {"hidden": "dhidden", "expert_dim": "dexpert", "experts": "nroutedexperts",
              "shared": "nsharedexperts", "top_k": "nexpertspertoken"}  # fmt: skip


def shapes_from_file(path: str | Path) -> list[AnyShape]:
    """Shapes listed in a YAML (needs pyyaml) or JSON file: a list of entries, or a mapping
    with a ``shapes`` list. An entry names a MoE layer with the competition's keys
    (``dhidden, dexpert, nroutedexperts, nsharedexperts, nexpertspertoken, bs, seqlen``) or
    the friendly ones (``hidden, expert_dim, experts, shared, top_k, tokens``), or a
    flash-expert call with ``workload: flash-expert, tokens, hidden, num_experts, top_k``.
    ``name`` and ``seed`` are optional."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise SystemExit(f"reading {path} needs pyyaml (pip install pyyaml), or give the shapes as JSON") from error
        document = yaml.safe_load(text)
    else:
        document = json.loads(text)
    entries = document["shapes"] if isinstance(document, dict) else document
    shapes: list[AnyShape] = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        if entry.pop("workload", "moe") == "flash-expert":
            entry.setdefault("name", f"file-{i}-flash-expert-T{entry['tokens']}")
            shapes.append(FlashExpertShape(**entry))
            continue
        entry = {_FILE_KEYS.get(key, key): value for key, value in entry.items()}
        if "tokens" in entry:
            entry["bs"], entry["seqlen"] = 1, entry.pop("tokens")
        entry.setdefault("nsharedexperts", 0)
        entry.setdefault("bs", 1)
        entry.setdefault("seed", i)
        entry.setdefault("name", f"file-{i}-T{entry['bs'] * entry['seqlen']}-E{entry['nroutedexperts']}")
        shapes.append(Shape(**entry))
    return shapes


def flash_expert_shapes() -> list[FlashExpertShape]:
    """T = 8192 tokens, H in {1024, 2048}, K in {16, 64}, E in {65536, 1048576}."""
    return [
        FlashExpertShape(f"flash-T8192-H{h}-K{k}-E{e}", 8192, h, e, k, seed=i)
        for i, (h, k, e) in enumerate((h, k, e) for h in (1024, 2048) for k in (16, 64) for e in (65536, 1048576))
    ]


@dataclass(frozen=True)
class Preset:
    """A named list of shapes of one workload.

    Attributes:
        name: what ``--preset`` takes.
        description: one line for ``moeflux bench --list`` and error messages.
        build: returns the shapes (``layer`` is the ``--layer`` choice, used by sweeps).
        gpu_dtype: the dtype the shapes are meant for on a GPU (``--dtype`` overrides).
        workload: ``"moe"`` or ``"flash-expert"``.
        takes_layer: a sweep over token counts at a layer the user picks (``--layer`` or the
            custom-shape flags); the other presets ignore ``layer``.
    """

    name: str
    description: str
    build: Callable[[Shape], list[AnyShape]] = field(repr=False)
    gpu_dtype: str = "bf16"
    workload: str = "moe"
    takes_layer: bool = False

    def shapes(self, layer: str | None = None) -> list[AnyShape]:
        named = layers()
        if layer is not None and layer not in named:
            raise SystemExit(f"unknown layer {layer!r}; valid: {', '.join(sorted(named))}")
        return self.build(named[layer or "competition"])


def _model_preset(model: str) -> Preset:
    return Preset(
        model, f"{model} layer (models.json) at T = {', '.join(map(str, MODEL_TOKENS))}",
        lambda _layer: token_sweep(layers()[model], MODEL_TOKENS),
    )  # fmt: skip


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in [
        Preset("cpu-small", "competition shapes scaled to H=256, D=128, T<=256 (the default without a GPU)",
               lambda _layer: cpu_small_shapes(), gpu_dtype="fp16"),
        Preset("competition", "the six GPU MODE shapes: 3 tests + 3 ranked benchmarks (the default on a GPU)",
               lambda _layer: competition_shapes("tests") + competition_shapes("benchmarks"), gpu_dtype="fp16"),
        Preset("competition-tests", "the competition's 3 test shapes",
               lambda _layer: competition_shapes("tests"), gpu_dtype="fp16"),
        Preset("competition-benchmarks", "the competition's 3 ranked benchmark shapes",
               lambda _layer: competition_shapes("benchmarks"), gpu_dtype="fp16"),
        _model_preset("qwen3-30b-a3b"),
        _model_preset("mixtral-8x7b"),
        _model_preset("deepseek-v3-slice"),
        Preset("models", "every shape of models.json (prefill and decode of each model)",
               lambda _layer: model_shapes()),
        Preset("decode", f"--layer (default competition) at decode sizes T = {', '.join(map(str, DECODE_TOKENS))}",
               lambda layer: token_sweep(layer, DECODE_TOKENS), takes_layer=True),
        Preset("token-sweep", "--layer (default competition) at T = 1, 2, 4, ..., 16384",
               lambda layer: token_sweep(layer, SWEEP_TOKENS), takes_layer=True),
        Preset("flash-expert", "flash expert: T=8192, H in {1024, 2048}, K in {16, 64}, E in {65536, 1048576}",
               lambda _layer: flash_expert_shapes(), workload="flash-expert"),
        Preset("flash-expert-small", "flash expert at CPU size: T=64, H=64, K=4, E=4096",
               lambda _layer: [FlashExpertShape("flash-small-T64-H64-K4-E4096", 64, 64, 4096, 4)],
               workload="flash-expert"),
    ]
}  # fmt: skip


def unknown_preset_message(name: str) -> str:
    listed = "\n".join(f"  {preset.name:<24} {preset.description}" for preset in PRESETS.values())
    return f"unknown preset {name!r}; valid presets:\n{listed}"
