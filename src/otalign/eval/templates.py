"""The WPR paper's pairwise judge prompts (Appendix C.4, from Chai et al. 2025), as format strings.

Placeholders: ``{prompt}`` (the article or the dialogue), ``{response_a}`` and ``{response_b}`` (the two
answers in the order shown). The paper prints ``Query: dialogue`` in the helpfulness prompt; the dialogue
itself goes there.
"""

from __future__ import annotations

SUMMARIZATION = """You will be given two summaries written for an article. Your task is to pick the better one \
between them, based on the four criteria. Please make sure you read and understand these instructions very carefully.

Relevance - selection of important content from the source. The summary should include only important information \
from the source document. Annotators were instructed to penalize summaries that contained redundancies and excess \
information.

Coherence - the collective quality of all sentences. We align this dimension with the DUC quality question of \
structure and coherence whereby "the summary should be well-structured and well-organized. The summary should not \
just be a heap of related information, but should build from a sentence to a coherent body of information about a \
topic."

Consistency - the factual alignment between the summary and the summarized source. A factually consistent summary \
contains only statements that are entailed by the source document. Annotators were also asked to penalize summaries \
that contained hallucinated facts.

Fluency - the quality of the summary in terms of grammar, spelling, punctuation, word choice, and sentence structure.

You should output a single character to indicate which summary you think is better. 'A' stands for Summary A and \
'B' stands for Summary B. If you think both summaries are equally good, output 'E'.

Article:
{prompt}

Summary A:
{response_a}

Summary B:
{response_b}

Your Choice (only a single character, you are allowed to think both summaries are equal and output 'E'):"""

HELPFULNESS = """For the following query to a chatbot assistant, which response is more helpful?

First provide a one-sentence comparison of the two responses and explain which you feel is more helpful. Second, \
on a new line, state only 'A' or 'B' to indicate which response is more helpful. If they are equally good or bad, \
state 'E'. Your response should use the json format, with "comparison" and "choice" as keys.

Query: {prompt}

Response A: {response_a}

Response B: {response_b}

Your Judgment:"""

TEMPLATES = {"summarization": SUMMARIZATION, "helpfulness": HELPFULNESS}


def render_judge_prompt(template: str, prompt: str, response_a: str, response_b: str) -> str:
    """The judge's input: ``template`` (a name in :data:`TEMPLATES` or a format string) filled in."""
    text = TEMPLATES.get(template, template)
    if template not in TEMPLATES and not all(f"{{{k}}}" in text for k in ("prompt", "response_a", "response_b")):
        raise ValueError(
            f"unknown judge template {template!r}: use one of {sorted(TEMPLATES)} or a format string with "
            "{prompt}, {response_a} and {response_b}"
        )
    return text.format(prompt=prompt, response_a=response_a, response_b=response_b)
