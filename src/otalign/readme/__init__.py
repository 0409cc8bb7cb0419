"""The README's generated tables (``<!-- registry:NAME -->`` blocks): each registry's table, and the "Differences
from TRL" table from :mod:`otalign.readme.trl_differences`.

Top layer: it reads every extension point's registry, from the regularizers up to the trainers' losses. Run
``python -m otalign.readme`` (or :func:`update_readme`) after registering a built-in or editing a differences row;
``tests/test_readme.py`` checks the README is current.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from otalign.eval.analysis import ANALYSES
from otalign.eval.config import JUDGES
from otalign.losses import PREFERENCE_LOSSES
from otalign.registry import Registry
from otalign.regularizers import REGULARIZERS
from otalign.rewards import REWARD_FUNCTIONS
from otalign.sweep import beta  # noqa: F401 (registers the analysis beta-sweep)

from . import trl_differences

TABLES: dict[str, tuple[Registry, tuple[str, ...]]] = {
    "regularizers": (REGULARIZERS, ("beta",)),
    "preference_losses": (PREFERENCE_LOSSES, ("paired",)),
    "reward_functions": (REWARD_FUNCTIONS, ()),
    "judges": (JUDGES, ()),
    "analyses": (ANALYSES, ()),
}
"""README marker name -> (the registry, the default columns its table shows)."""
DOCUMENTS: dict[str, Callable[[], str]] = {"trl_differences": trl_differences.markdown}
"""README marker name -> the function writing a table that is no registry's."""


def readme_tables() -> dict[str, str]:
    """The README's generated tables, keyed by the marker name (``<!-- registry:NAME -->``): each registry's, then
    :data:`DOCUMENTS`'."""
    tables = {name: registry.table(*columns) for name, (registry, columns) in TABLES.items()}
    return tables | {name: write() for name, write in DOCUMENTS.items()}


def update_readme(path: str | Path = "README.md") -> None:
    """Rewrite every ``<!-- registry:NAME -->`` ... ``<!-- /registry -->`` block of ``path`` (:func:`readme_tables`)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    for name, table in readme_tables().items():
        text = re.sub(
            rf"(<!-- registry:{name} -->\n).*?(<!-- /registry -->)", rf"\g<1>{table}\n\g<2>", text, flags=re.S
        )
    path.write_text(text, encoding="utf-8")
