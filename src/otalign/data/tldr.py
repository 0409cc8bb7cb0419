"""OpenAI summarize-from-feedback (TL;DR comparisons) -> plain-text ``prompt``/``chosen``/``rejected`` rows.

Published form (``openai/summarize_from_feedback``, config ``comparisons``)::

    {"info": {"id", "post", "title", "subreddit", "site", "article"}, "summaries": [{"text", "policy", "note"},
     {"text", ...}], "choice": 0 or 1, "worker", "batch", "split", "extra": {"confidence"}}

The prompt follows TRL's ``tldr_preference`` preprocessing: Reddit posts (``info.post`` set) become
``"SUBREDDIT: r/<subreddit>\\n\\nTITLE: <title>\\n\\nPOST: <post>\\n\\nTL;DR:"``, CNN/Daily Mail articles
(``info.article`` set, the out-of-distribution validation batches) ``"TITLE: <title>\\n\\n<article>\\n\\nTL;DR:"``,
with blank lines inside the post or article collapsed to single newlines. ``chosen`` is
``summaries[choice].text`` and ``rejected`` the other summary, both verbatim (they start with a space).
Problems: ``bad choice``, ``bad summaries``, ``identical responses``, plus the generic ones.
"""

from __future__ import annotations

from .conversion import Converted, RowError, convert_rows, get, text
from .preference import read_rows


def tldr_prompt(row: dict) -> str:
    """The summarization prompt of a row's ``info`` (rules in the module docstring)."""
    info = get(row, "info")
    if not isinstance(info, dict):
        raise RowError("not an object", "info", f"expected an object, got {type(info).__name__}")
    title = text(row, "info.title")
    if info.get("post") is not None:
        post = text(row, "info.post").replace("\n\n", "\n")
        return f"SUBREDDIT: r/{text(row, 'info.subreddit')}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    if info.get("article") is not None:
        article = text(row, "info.article").replace("\n\n", "\n")
        return f"TITLE: {title}\n\n{article}\n\nTL;DR:"
    raise RowError("missing field", "info.post", "missing (and no info.article either)")


def tldr_row(row: dict) -> dict:
    """One standard row from one comparison row; :class:`RowError` if unusable."""
    prompt = tldr_prompt(row)
    summaries = get(row, "summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise RowError("bad summaries", "summaries", f"expected a list of two summaries, got {summaries!r:.80}")
    texts = []
    for j, summary in enumerate(summaries):
        value = summary.get("text") if isinstance(summary, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise RowError("bad summaries", f"summaries[{j}].text", f"expected a non-empty string, got {value!r:.80}")
        texts.append(value)
    choice = get(row, "choice")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise RowError("bad choice", "choice", f"expected 0 or 1, got {choice!r:.80}")
    if texts[0].strip() == texts[1].strip():
        raise RowError("identical responses", "summaries", "the two summaries are identical")
    return {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice]}


def load_tldr(source: str, split: str = "train", *, on_error: str = "raise") -> Converted:
    """TL;DR comparison rows of a ``.jsonl``/``.json``/``.parquet`` file or a Hugging Face dataset, converted."""
    return convert_rows(read_rows(source, split, on_error=on_error), source, tldr_row, on_error=on_error)
