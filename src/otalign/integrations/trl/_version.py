"""The TRL versions :mod:`otalign.integrations.trl` is tested against, and the check run before importing TRL."""

from __future__ import annotations

from importlib import metadata

SUPPORTED = (1, 16)
"""The TRL minor versions supported: ``>= 1.16, < 1.17`` (the ``otalign[trl]`` extra pins the same range)."""

SUPPORTED_RANGE = "trl>=1.16,<1.17"


def check_trl(version: str | None = None) -> str:
    """The installed TRL version (or ``version``) if it is in :data:`SUPPORTED_RANGE`.

    Raises:
        ImportError: one line naming the supported range, when TRL is missing or another minor version.
    """
    if version is None:
        try:
            version = metadata.version("trl")
        except metadata.PackageNotFoundError:
            raise ImportError(
                f"otalign.integrations.trl needs TRL ({SUPPORTED_RANGE}): pip install 'otalign[trl]'"
            ) from None
    parts = version.split(".")
    try:
        minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        minor = None
    if minor != SUPPORTED:
        raise ImportError(
            f"otalign.integrations.trl supports {SUPPORTED_RANGE}, found trl {version}: pip install 'otalign[trl]'"
        )
    return version
