"""Optional integrations of otalign's regularizers and losses into other training frameworks.

Each subpackage needs its own extra and imports its framework only when imported itself:
:mod:`otalign.integrations.trl` (``pip install "otalign[trl]"``). :mod:`otalign.integrations.verl` and
:mod:`otalign.integrations.openrlhf` are pure torch (the frameworks' recipes live in ``examples/``), on the shared
top-k core :mod:`otalign.integrations.topk` (policy logits + the reference's top-k -> penalty and surrogate).
"""
