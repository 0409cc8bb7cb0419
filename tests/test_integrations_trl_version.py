"""The TRL version check: one-line ImportError naming the supported range when TRL is missing or out of range."""

from __future__ import annotations

from importlib import metadata

import pytest

pytest.importorskip("trl")  # importing the subpackage checks the installed TRL

from otalign.integrations.trl._version import SUPPORTED_RANGE, check_trl  # noqa: E402


@pytest.mark.parametrize("version", ["1.16.0", "1.16.3", "1.16.0.dev0"])
def test_supported_versions_pass(version):
    assert check_trl(version) == version


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "0.16.0", "2.0.0", "garbage"])
def test_other_versions_are_refused_in_one_line(version):
    with pytest.raises(ImportError, match=r"supports trl>=1\.16,<1\.17, found trl") as error:
        check_trl(version)
    assert "\n" not in str(error.value) and version in str(error.value)


def test_missing_trl_is_refused_in_one_line(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(ImportError, match="otalign\\[trl\\]") as error:
        check_trl()
    assert SUPPORTED_RANGE in str(error.value) and "\n" not in str(error.value)


def test_the_extras_pin_the_same_range():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    extras = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    assert f'trl = ["{SUPPORTED_RANGE}"]' in extras
    dev = extras.split("dev = [", 1)[1].split("]", 1)[0]
    assert f'"{SUPPORTED_RANGE}"' in dev
