"""The README's registry tables are current, and its "Extending otalign" examples run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from otalign.registry import readme_tables

README = Path(__file__).resolve().parents[1] / "README.md"


def registries():
    from otalign.eval.analysis import ANALYSES
    from otalign.eval.config import JUDGES
    from otalign.losses import PREFERENCE_LOSSES
    from otalign.regularizers import REGULARIZERS
    from otalign.rewards import REWARD_FUNCTIONS

    return [REGULARIZERS, PREFERENCE_LOSSES, REWARD_FUNCTIONS, JUDGES, ANALYSES]


@pytest.fixture
def restored_registries():
    """The registries as they were before the test (the examples register extensions)."""
    saved = [(r, dict(r.entries), dict(r.aliases)) for r in registries()]
    yield
    for registry, entries, aliases in saved:
        registry.entries, registry.aliases = entries, aliases


def test_registry_tables_in_the_readme_are_generated_from_the_registries():
    text = README.read_text(encoding="utf-8")
    for name, table in readme_tables().items():
        block = re.search(rf"<!-- registry:{name} -->\n(.*?)<!-- /registry -->", text, flags=re.S)
        assert block is not None, f"README has no registry:{name} block"
        assert block.group(1).strip() == table, f"README table {name} is stale: run otalign.registry.update_readme()"


def extension_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Extending otalign", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_the_four_extension_examples():
    examples = extension_examples()
    assert len(examples) == 4
    for kind in ("REGULARIZERS.add", "PREFERENCE_LOSSES.add", "REWARD_FUNCTIONS.add", "JUDGES.add"):
        assert sum(kind in e for e in examples) == 1, kind


@pytest.mark.parametrize("index", range(4))
def test_extension_example_runs(index, restored_registries):
    exec(compile(extension_examples()[index], f"README.md example {index + 1}", "exec"), {"__name__": "readme"})


def test_registry_names_are_the_config_choices(restored_registries):
    from otalign.config import ConfigError
    from otalign.regularizers import REGULARIZERS
    from otalign.trainers import PPOConfig

    with pytest.raises(ConfigError, match="unknown regularizer 'mine'"):
        PPOConfig(regularizer="mine")
    REGULARIZERS.add("mine", object, help="x", beta=0.2)
    assert PPOConfig(regularizer="mine").beta_value == 0.2
    with pytest.raises(ValueError, match="registered already"):
        REGULARIZERS.add("mine", object, help="x")


def test_registry_docstring_example():
    import doctest

    import otalign.registry

    assert doctest.testmod(otalign.registry).failed == 0
