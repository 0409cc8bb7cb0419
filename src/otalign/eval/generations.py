"""Candidates' answers: read from generation files (JSONL ``prompt``/``response``) or sampled from a model."""

from __future__ import annotations

from pathlib import Path

from otalign.data import Prompt, render_prompt
from otalign.data.reading import numbered, read_file


def read_generations(path: str | Path) -> dict[str, str]:
    """``prompt -> response`` of a JSONL generation file, in file order (read by :mod:`otalign.data.reading`:
    blank lines skipped, rows numbered by their line).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a row that is not JSON, lacks a string ``prompt``/``response``, has an empty (whitespace-only)
            response, or repeats a prompt; the message names the file and the 1-based row.
    """
    rows = read_file(path, kind="generation", formats=("jsonl",))
    out: dict[str, str] = {}
    for i, row in numbered(rows):
        where = f"{rows.source}, row {i}"
        for key in ("prompt", "response"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise ValueError(f"{where}: field {key!r} missing or not a string")
        if not row["response"].strip():
            raise ValueError(f"{where}, field 'response': empty text (a judge would compare it as an answer)")
        if row["prompt"] in out:
            raise ValueError(f"{where}: prompt repeated from an earlier row: {row['prompt']!r:.80}")
        out[row["prompt"]] = row["response"]
    if not out:
        raise ValueError(f"{rows.source}: no generations")
    return out


def common_prompts(files: dict[str, dict[str, str]]) -> list[str]:
    """The prompts of the first file, checked to be exactly those of every other file (``name -> generations``).

    Raises:
        ValueError: a file missing a prompt of the first or holding one it lacks, naming both files.
    """
    (first, reference), *others = files.items()
    for name, generations in others:
        for missing, there, here in (
            (set(reference) - set(generations), first, name),
            (set(generations) - set(reference), name, first),
        ):
            if missing:
                raise ValueError(f"{there} has {len(missing)} prompt(s) that {here} lacks, e.g. {min(missing)!r:.80}")
    return list(reference)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as the judge reads it: the string, or a conversation as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def encode_for_sampling(tokenizer, prompts: list[Prompt], max_prompt_length: int) -> tuple[list[str], list[list[int]]]:
    """Prompts rendered with the tokenizer's chat template (when it has one) and their token ids."""
    from otalign.generation import encode_prompts

    texts = [render_prompt(p, tokenizer) for p in prompts]
    return texts, encode_prompts(tokenizer, texts, max_prompt_length=max_prompt_length)


def sample_responses(
    model, tokenizer, prompts: list[Prompt], seeds: list[int], params, *, batch_size: int, max_prompt_length: int
) -> list[str]:
    """One sampled response per prompt, prompt ``i`` with generator seed ``seeds[i]``, through the PPO
    evaluation's sampler :func:`~otalign.generation.sample_batches`."""
    from otalign.generation import sample_batches

    texts, ids = encode_for_sampling(tokenizer, prompts, max_prompt_length)
    batches = sample_batches(model, tokenizer, texts, ids, seeds, params, batch_size)
    return [text for rollout in batches for text in rollout.response_texts]
