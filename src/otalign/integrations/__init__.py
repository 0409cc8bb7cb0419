"""Optional integrations of otalign's regularizers and losses into other training frameworks.

Each subpackage needs its own extra and imports its framework only when imported itself:
:mod:`otalign.integrations.trl` (``pip install "otalign[trl]"``).
"""
