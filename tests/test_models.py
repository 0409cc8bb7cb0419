"""Model loading: critic value head, frozen reference, LoRA, the embedded default model (slow)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from otalign.models import AdapterDisabled, ValueModel, apply_lora, context_window, frozen_copy, torch_dtype
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_value_model_shapes_zero_init_and_independent_weights():
    tokenizer = tiny_tokenizer()
    lm = tiny_causal_lm(tokenizer)
    critic = ValueModel.from_causal_lm(lm)
    ids = torch.randint(3, len(tokenizer), (2, 5))
    values = critic(ids, torch.ones_like(ids))
    assert values.shape == (2, 5) and values.dtype == torch.float32 and values.abs().max() == 0
    assert all(p.requires_grad for p in critic.parameters())
    with torch.no_grad():
        next(critic.backbone.parameters()).add_(1.0)
    assert not torch.equal(next(critic.backbone.parameters()), next(lm.model.parameters()))
    frozen = ValueModel.from_causal_lm(lm, freeze_backbone=True)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["v_head.weight", "v_head.bias"]
    frozen.v_head.bias.data.fill_(1.0)
    frozen(ids, torch.ones_like(ids)).sum().backward()
    assert frozen.v_head.bias.grad.item() == 10.0


def test_value_model_from_pretrained_folder(tmp_path):
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path)
    critic = ValueModel.from_pretrained(tmp_path)
    assert critic(torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long)).shape == (1, 2)


def test_frozen_copy_has_no_gradients():
    lm = tiny_causal_lm(tiny_tokenizer())
    ref = frozen_copy(lm)
    assert not any(p.requires_grad for p in ref.parameters()) and all(p.requires_grad for p in lm.parameters())
    assert not ref.training


def test_lora_trains_only_adapters():
    pytest.importorskip("peft")
    lm = apply_lora(tiny_causal_lm(tiny_tokenizer()), r=2, alpha=4, target_modules=["all-linear"])
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_context_window_is_the_text_configs_position_limit():
    lm = tiny_causal_lm(tiny_tokenizer(), max_positions=96)
    assert context_window(lm) == 96
    assert context_window(AdapterDisabled(apply_lora(lm, r=2, alpha=4))) == 96  # the LoRA reference reads the same
    unlimited = SimpleNamespace(config=SimpleNamespace(get_text_config=SimpleNamespace))  # a config without one
    assert context_window(unlimited) is None


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown model dtype"):
        torch_dtype("float8")


@pytest.mark.slow
def test_default_model_converts_once_and_generates(tmp_path, monkeypatch):
    from otalign.models import default_model_path, load_causal_lm, load_tokenizer

    path = default_model_path()  # the shared cache: converted once, reused by the demo
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert default_model_path() == path
    tokenizer = load_tokenizer("default")
    model = load_causal_lm("default")
    assert model.config.vocab_size == 49152 and tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or tokenizer.eos_token_id in out[0]
