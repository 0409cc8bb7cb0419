"""Tiny random models and a word-level tokenizer, built in memory: for tests and smoke runs, no download.

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0)        # LlamaForCausalLM, hidden 32, 2 layers

The vocabulary holds a few dozen English words (some clearly positive or negative, for sentiment
rewards), ``.``, ``,``, ``?`` and the special tokens ``<pad>``, ``<eos>``, ``<unk>``. The chat template
(:data:`CHAT_TEMPLATE`) renders each turn's content followed by a space, an assistant turn as
``answer : <content> <eos> ``, and the generation prompt as ``answer : ``.
"""

from __future__ import annotations

WORDS = tuple(
    " ".join(
        (
            "the a i you we it is was are be to of and in on at for with this that my your day",
            "good great happy love wonderful nice fine bad awful sad hate terrible poor",
            "cat dog house tree city rain sun food book friend work time weekend morning",
            "write tell describe about one sentence what think how answer : . , ?",
        )
    ).split()
)
SPECIALS = ("<pad>", "<eos>", "<unk>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}answer : {{ m['content'] }} <eos> "
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}answer : {% endif %}"
)
"""Prefix-preserving, as the conversational formats need: a conversation rendered with the generation prompt is a
prefix of it rendered with the next assistant turn, which ends in the EOS token (what the model learns to stop on)."""


def tiny_tokenizer(*, chat_template: bool = True, words: tuple[str, ...] = WORDS):
    """A ``PreTrainedTokenizerFast`` over ``SPECIALS + words`` (whitespace/punctuation pre-tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(tokenizer, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, max_positions: int = 128):
    """A randomly initialised ``LlamaForCausalLM`` for ``tokenizer`` (float32, eval mode, seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def save_tiny_model(folder, tokenizer=None, *, seed: int = 0) -> str:
    """Write :func:`tiny_causal_lm` and its tokenizer (default :func:`tiny_tokenizer`) to ``folder``, for code that
    loads models by path (commands, pipelines); returns the folder as a string."""
    tokenizer = tokenizer or tiny_tokenizer()
    tiny_causal_lm(tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
