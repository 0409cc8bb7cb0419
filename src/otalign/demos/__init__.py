"""Runnable demonstrations behind ``otalign demo``."""
