"""otalign: aligning language models with optimal transport (WPR, OTPO, AOT)."""

__version__ = "0.1.0"
