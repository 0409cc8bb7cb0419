"""The README's registry tables are current, and every fenced Python block of it runs as pasted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from otalign.readme import TABLES, readme_tables

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def restored_registries():
    """The registries as they were before the test (the examples register extensions)."""
    saved = [(r, dict(r.entries), dict(r.aliases)) for r, _ in TABLES.values()]
    yield
    for registry, entries, aliases in saved:
        registry.entries, registry.aliases = entries, aliases


def test_registry_tables_in_the_readme_are_generated_from_the_registries():
    text = README.read_text(encoding="utf-8")
    for name, table in readme_tables().items():
        block = re.search(rf"<!-- registry:{name} -->\n(.*?)<!-- /registry -->", text, flags=re.S)
        assert block is not None, f"README has no registry:{name} block"
        assert block.group(1).strip() == table, f"README table {name} is stale: run python -m otalign.readme"


def extension_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Extending otalign", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_the_four_extension_examples():
    examples = extension_examples()
    assert len(examples) == 4
    for kind in ("REGULARIZERS.add", "PREFERENCE_LOSSES.add", "REWARD_FUNCTIONS.add", "JUDGES.add"):
        assert sum(kind in e for e in examples) == 1, kind


def python_blocks() -> list[tuple[int, str]]:
    """Every fenced Python block of the README as (line of its fence, code)."""
    text = README.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)
    ]


# The training blocks run 100 steps on the default model; here they run 2 steps with short responses. Each key must
# occur in its block (a README edit that drops it fails this test instead of silently training 100 steps).
SHORTENED = {"max_steps=100": "max_steps=2, response_length=4"}


@pytest.fixture
def tiny_default_model(tmp_path_factory, monkeypatch):
    """``"default"`` resolves to a tiny random model saved on disk (:mod:`otalign.models.tiny`), with a 32-slot
    Wasserstein top-k (its vocabulary has fewer than the default 128 tokens)."""
    import otalign.models.loading
    from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-default")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    tiny_causal_lm(tokenizer).save_pretrained(folder)
    monkeypatch.setattr(otalign.models.loading, "default_model_path", lambda: folder)
    return folder


@pytest.mark.parametrize("line, code", python_blocks(), ids=[f"line{line}" for line, _ in python_blocks()])
def test_readme_python_block_runs(line, code, tiny_default_model, restored_registries, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that train write runs/ here
    if ".train()" in code:
        for pasted, short in SHORTENED.items():
            assert pasted in code, f"README.md line {line}: a training block without {pasted}"
            code = code.replace(pasted, f"{short}, wpr_top_k=32, progress_bar=False")
    exec(compile(code, f"README.md line {line}", "exec"), {"__name__": "readme"})


def test_every_python_block_is_run():
    """The blocks above are all of the README's Python (a fence spelled differently would escape the test)."""
    text = README.read_text(encoding="utf-8")
    assert len(python_blocks()) == text.count("```python") == len(re.findall(r"^```py", text, flags=re.M))


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
