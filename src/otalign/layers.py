"""The layers of otalign, bottom to top: a module may import its own layer and the layers below, never above.

:data:`LAYERS` is the one copy of the table: ``tests/test_layers.py`` checks every import of every module under
``src/otalign`` against it (imports inside functions included), and docs/design.md shows :func:`markdown`.
Modules of one row may import each other, but never in a cycle.

A module belongs to the row that names its longest dotted prefix: ``otalign.eval.analysis.coherence`` is in
``eval``; the package ``otalign`` itself (its version) is in the bottom row, and a module no row names is in
none. Stdlib only, so that reading the table imports nothing else.
"""

from __future__ import annotations

from typing import NamedTuple


class Layer(NamedTuple):
    """One row of the table.

    Attributes:
        name: the row's name in docs/design.md.
        modules: the dotted module (or package) names in it.
        what: one line on what lives there.
        forbids: top-level packages its modules never import (``ot`` imports no ``transformers``).
    """

    name: str
    modules: tuple[str, ...]
    what: str
    forbids: tuple[str, ...] = ()


LAYERS: tuple[Layer, ...] = (
    Layer(
        "config, paths, registry, guard",
        ("otalign", "otalign.config", "otalign.paths", "otalign.registry", "otalign.guard", "otalign.layers"),
        "stdlib-light: config dataclasses and their parser, path checks, one registry per extension point, "
        "the numeric guards, this table",
    ),
    Layer(
        "data, models, runs",
        ("otalign.data", "otalign.models", "otalign.runs"),
        "dataset formats & one reader · model loading · reading run folders (metrics)",
    ),
    Layer(
        "ot",
        ("otalign.ot",),
        "pure optimal-transport math on tensors — no transformers import",
        forbids=("transformers", "accelerate"),
    ),
    Layer(
        "regularizers, losses",
        ("otalign.regularizers", "otalign.losses"),
        "per-token policy penalties (f-divergences, wasserstein) · preference losses",
    ),
    Layer(
        "scoring, generation",
        ("otalign.scoring", "otalign.generation"),
        "sampling; model outputs -> per-position scoring",
    ),
    Layer("rewards", ("otalign.rewards",), "reward models & functions · the code sandbox"),
    Layer("eval", ("otalign.eval",), "judges · win rates · policy evaluation · analyses & plots"),
    Layer("trainers", ("otalign.trainers",), "sft · reward · rl · preference: accelerate-native loops"),
    Layer("integrations", ("otalign.integrations",), "optional extras"),
    Layer(
        "pipeline, sweep, demos, readme",
        ("otalign.pipeline", "otalign.sweep", "otalign.demos", "otalign.readme"),
        "compositions of the commands below",
    ),
    Layer("cli", ("otalign.cli", "otalign.__main__"), "otalign <command>"),
)
"""The rows, bottom (rank 0) to top."""

RANKS: dict[str, int] = {module: rank for rank, layer in enumerate(LAYERS) for module in layer.modules}
"""Module prefix -> rank of its row in :data:`LAYERS`."""


def rank(module: str) -> int:
    """The rank of the row holding the dotted ``module`` (longest matching prefix); ``KeyError`` if none does."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        prefix = ".".join(parts[:end])
        if prefix in RANKS:
            return RANKS[prefix]
    if module == "otalign":
        return RANKS[module]
    raise KeyError(f"{module} is in no layer of otalign.layers.LAYERS")


def markdown() -> str:
    """The table as docs/design.md shows it: top row first, dependencies pointing down."""
    lines = ["| layer | modules | what |", "|---|---|---|"]
    for layer in reversed(LAYERS):
        modules = " ".join(f"`{m}`" for m in layer.modules)
        lines.append(f"| {layer.name} | {modules} | {layer.what} |")
    return "\n".join(lines)
