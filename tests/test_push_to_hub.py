"""``push_to_hub`` (transformers' and TRL's fields): checked before anything loads, and after a real training run the
saved ``output_dir/model`` folder goes to the repo ``hub_model_id`` (default: the output folder's name)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import huggingface_hub
import pytest

from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import ConfigError
from otalign.trainers.sft import SFTConfig, SFTTrainer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PAIRS = str(Path(__file__).parent / "fixtures" / "sft_pairs.jsonl")


def sft_config(output_dir: Path, **overrides) -> SFTConfig:
    settings = dict(output_dir=str(output_dir), dataset_name=PAIRS, max_steps=1, progress_bar=False, push_to_hub=True)
    return SFTConfig(**{**settings, **overrides})


def train(config: SFTConfig) -> None:
    tokenizer = tiny_tokenizer()
    SFTTrainer(config, model=tiny_causal_lm(tokenizer), tokenizer=tokenizer).train()


class RecordingHfApi:
    """Stands in for ``huggingface_hub.HfApi`` (the Hub is unreachable here): records the calls and what the
    uploaded folder held at upload time."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id.split('/')[-1]}")

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))


def test_the_saved_model_folder_goes_to_the_output_dirs_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # passes the up-front token check; nothing reaches the Hub
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    RecordingHfApi.calls = []
    train(sft_config(tmp_path / "my-sft-run"))
    (create, repo), (upload, pushed) = RecordingHfApi.calls
    assert create == "create_repo" and repo == {"repo_id": "my-sft-run", "private": None, "exist_ok": True}
    assert upload == "upload_folder" and pushed["repo_id"] == "someone/my-sft-run"
    assert pushed["folder_path"] == str(tmp_path / "my-sft-run" / "model")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(pushed["files"])


def test_hub_model_id_and_private_are_passed_on(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    RecordingHfApi.calls = []
    train(sft_config(tmp_path / "run", hub_model_id="me/tiny-sft", hub_private_repo=True))
    assert RecordingHfApi.calls[0][1] == {"repo_id": "me/tiny-sft", "private": True, "exist_ok": True}


def test_bad_settings_fail_before_any_model_loads(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="push_to_hub uploads the saved model: it needs save_model"):
        sft_config(tmp_path, save_model=False)
    with pytest.raises(ConfigError, match="hub_model_id 'a/b/c' is not a Hub repo id"):
        sft_config(tmp_path, hub_model_id="a/b/c")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ConfigError, match="push_to_hub needs a Hugging Face token"):
        SFTTrainer(sft_config(tmp_path / "run"))  # the token check runs before the default model loads


def hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    not os.environ.get("HF_TOKEN") or not hub_reachable(), reason="needs HF_TOKEN (write access) and the Hub"
)
def test_push_to_the_real_hub(tmp_path):
    """Pushes a tiny model to a new private repo of the token's account and deletes it again. Skipped without a
    network path to huggingface.co or an ``HF_TOKEN`` (as on the development machine, which has neither)."""
    name = f"otalign-push-test-{uuid.uuid4().hex[:8]}"
    train(sft_config(tmp_path / name, hub_private_repo=True))
    api = huggingface_hub.HfApi()
    repo_id = f"{api.whoami()['name']}/{name}"
    try:
        assert "config.json" in api.list_repo_files(repo_id)
    finally:
        api.delete_repo(repo_id)
