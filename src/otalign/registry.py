"""One registry per extension point: regularizers, preference losses, reward functions, judges, analyses.

A registry maps a name to an :class:`Entry`: the class or factory that makes the thing, its defaults, and a
one-line help. The config fields that pick one (``regularizer``, ``loss_type``, ``reward_fn``, ``judge``, the
``analyze`` commands) take their choices from it, and the README tables are :meth:`Registry.table`. Adding an
extension is its own module plus one :meth:`Registry.add` call (see the README's "Extending otalign")::

    >>> from otalign.registry import Registry
    >>> colors = Registry("color")
    >>> entry = colors.add("red", lambda shade=1.0: ("red", shade), help="the colour red", defaults={"shade": 0.5})
    >>> colors.build("red")
    ('red', 0.5)
    >>> colors.names()
    ('red',)

A target may be given as ``"package.module:attribute"``, imported on first use, so that listing the names
(``--help``, validation) imports nothing heavy.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    """One registered extension.

    Attributes:
        name: what configs call it.
        target: the class or factory (or ``"module:attribute"`` naming it).
        help: one line for ``--help`` and the README table.
        defaults: keyword arguments :meth:`Registry.build` passes unless the caller does.
        info: other per-entry settings its users read (e.g. a regularizer's default ``beta``).
    """

    name: str
    target: object
    help: str
    defaults: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def resolve(self):
        """The target object (imported if it was given as a string)."""
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.target


class Registry(Mapping):
    """Named extensions of one kind; a read-only mapping ``name -> target`` (aliases resolve with a warning).

    Args:
        kind: what is registered, for messages (``regularizer``, ``loss_type``, ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, str] = {}

    def add(self, name: str, target: object, *, help: str, defaults: dict | None = None, **info) -> Entry:
        """Register ``target`` as ``name``; ``defaults`` are keyword arguments :meth:`build` passes, ``info`` other
        settings (:meth:`default` reads both)."""
        if name in self.entries or name in self.aliases:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self.entries[name] = Entry(name, target, help, dict(defaults or {}), info)
        return self.entries[name]

    def alias(self, old: str, new: str) -> None:
        """Accept the deprecated name ``old`` for ``new`` (with a ``FutureWarning``)."""
        self.aliases[old] = new

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (an alias is translated with a ``FutureWarning``); ``ValueError`` if
        unknown."""
        if name in self.aliases:
            warnings.warn(
                f"{self.kind} {name!r} is deprecated; use {self.aliases[name]!r}", FutureWarning, stacklevel=3
            )
            return self.aliases[name]
        if name not in self.entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {list(self.entries)}")
        return name

    def names(self) -> tuple[str, ...]:
        """Registered names and accepted aliases (a config field's ``choices``)."""
        return (*self.entries, *self.aliases)

    def entry(self, name: str) -> Entry:
        return self.entries[self.canonical(name)]

    def build(self, name: str, /, **kwargs):
        """``target(**{**defaults, **kwargs})`` of the entry ``name``."""
        entry = self.entry(name)
        return entry.resolve()(**{**entry.defaults, **kwargs})

    def default(self, name: str, key: str):
        """The registered setting ``key`` of ``name`` (e.g. its ``beta``): ``info`` first, then ``defaults``."""
        entry = self.entry(name)
        return entry.info[key] if key in entry.info else entry.defaults[key]

    def table(self, *columns: str) -> str:
        """Markdown table: name, the given default columns, help."""
        head = ["name", *columns, "what"]
        rows = [
            [f"`{e.name}`", *(str({**e.defaults, **e.info}.get(c, "")) for c in columns), e.help]
            for e in self.entries.values()
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    def __getitem__(self, name: str):
        if name not in self.entries and name not in self.aliases:
            raise KeyError(name)
        return self.entry(name).resolve()

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries or name in self.aliases


def readme_tables() -> dict[str, str]:
    """The README's table of each registry, keyed by the marker name (``<!-- registry:NAME -->``)."""
    from otalign.eval.analysis import ANALYSES
    from otalign.eval.config import JUDGES
    from otalign.losses import PREFERENCE_LOSSES
    from otalign.regularizers import REGULARIZERS
    from otalign.rewards import REWARD_FUNCTIONS

    return {
        "regularizers": REGULARIZERS.table("beta"),
        "preference_losses": PREFERENCE_LOSSES.table("paired"),
        "reward_functions": REWARD_FUNCTIONS.table(),
        "judges": JUDGES.table(),
        "analyses": ANALYSES.table(),
    }


def update_readme(path: str = "README.md") -> None:
    """Rewrite every ``<!-- registry:NAME -->`` ... ``<!-- /registry -->`` block of ``path`` from the registries."""
    import re
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    for name, table in readme_tables().items():
        text = re.sub(
            rf"(<!-- registry:{name} -->\n).*?(<!-- /registry -->)", rf"\g<1>{table}\n\g<2>", text, flags=re.S
        )
    Path(path).write_text(text, encoding="utf-8")
