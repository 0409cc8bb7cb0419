"""The embedding-matrix helper on a tiny randomly initialised Llama (built from a config, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from otalign.regularizers import WassersteinRegularizer, check_vocab_size, embedding_matrix, load_embedding_matrix

VOCAB = 64


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def test_input_and_output_embeddings_are_detached_copies(tiny_model):
    inputs = embedding_matrix(tiny_model)
    outputs = embedding_matrix(tiny_model, source="output", dtype=torch.float64)
    assert inputs.shape == (VOCAB, 16) and not inputs.requires_grad
    assert torch.equal(inputs, tiny_model.get_input_embeddings().weight)
    assert outputs.dtype == torch.float64 and torch.allclose(outputs.float(), tiny_model.lm_head.weight)
    assert not torch.equal(inputs, outputs.float())  # untied
    inputs[0] = 123.0
    assert tiny_model.get_input_embeddings().weight[0, 0] != 123.0


def test_vocabulary_mismatch_and_bad_source_are_rejected(tiny_model):
    assert embedding_matrix(tiny_model, vocab_size=VOCAB).shape[0] == VOCAB
    with pytest.raises(
        ValueError, match="vocabulary mismatch: the embedding matrix has 64 rows but the logits have 65"
    ):
        embedding_matrix(tiny_model, vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="source must be one of"):
        embedding_matrix(tiny_model, source="lm_head")
    with pytest.raises(ValueError, match="no input embedding matrix"):
        embedding_matrix(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\(V, d\) matrix"):
        check_vocab_size(torch.zeros(VOCAB), VOCAB)


def test_another_model_with_the_same_tokenizer_loads_from_disk(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = load_embedding_matrix(tmp_path, source="output", vocab_size=VOCAB)
    assert torch.allclose(loaded, tiny_model.lm_head.weight)


def test_wasserstein_penalty_on_the_models_own_logits(tiny_model):
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tiny_model(ids).logits[:, :-1]
        ref_logits = logits + 0.1 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    reg = WassersteinRegularizer(embedding_matrix(tiny_model, vocab_size=logits.shape[-1]), top_k=8)
    out = reg.penalty(logits.bfloat16(), ref_logits.bfloat16(), ids[:, 1:])
    assert out.per_token.shape == (2, 8) and torch.isfinite(out.per_token).all()


class _Holder(torch.nn.Module):
    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.embed.weight = weight

    def get_input_embeddings(self):
        return self.embed


def test_embeddings_that_are_not_whole_on_this_process_are_refused():
    """A reference model partitioned by DeepSpeed ZeRO-3 (a flat empty shard carrying ``ds_shape``) or left on
    the meta device by FSDP's low-memory loading has no usable cost matrix: refuse it by name, never build
    the penalty on a shard."""
    shard = torch.nn.Parameter(torch.empty(0))
    shard.ds_shape = torch.Size([VOCAB, 16])  # what deepspeed.zero.Init leaves on a partitioned parameter
    with pytest.raises(ValueError, match=r"not whole on this process \(shape \(0,\), DeepSpeed-partitioned\).*"):
        embedding_matrix(_Holder(shard))
    with pytest.raises(ValueError, match="zero3_init_flag: false, fsdp_cpu_ram_efficient_loading: false"):
        embedding_matrix(_Holder(torch.nn.Parameter(torch.empty(VOCAB, 16, device="meta"))))
