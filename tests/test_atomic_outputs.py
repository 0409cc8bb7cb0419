"""Final outputs are whole or absent: a failed save (a full disk) leaves the previous output or nothing, never a
partial folder or a 0-byte file, and stops in one line naming the path."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

from otalign.paths import OutputError, write_text_atomically, written_atomically

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")))


def test_a_folder_is_replaced_only_once_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old weights")
    with written_atomically(target) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"new weights")
        assert (target / "model.safetensors").read_bytes() == b"old weights"  # not touched while writing
    assert (target / "model.safetensors").read_bytes() == b"new weights"
    assert leftovers(tmp_path) == []


def test_a_full_disk_mid_save_keeps_the_previous_folder_and_says_so_in_one_line(tmp_path):
    """safetensors' own error on a full disk (not an OSError) is recognised; the partial folder is removed."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old weights")

    class SafetensorError(Exception):
        pass

    with pytest.raises(OutputError) as caught, written_atomically(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"no space left to write {target}: ") and "free on its disk" in message
    assert f"{target} is as it was" in message
    assert (target / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert leftovers(tmp_path) == []


def test_a_full_disk_with_no_previous_file_leaves_nothing(tmp_path):
    target = tmp_path / "report.json"
    with pytest.raises(OutputError, match="nothing was left"), written_atomically(target) as tmp:
        tmp.write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_and_leave_the_previous_file(tmp_path):
    target = tmp_path / "winrates.json"
    write_text_atomically(target, "old")
    with pytest.raises(KeyError), written_atomically(target) as tmp:
        tmp.write_text("half")
        raise KeyError("a bug, not the disk")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_data_prepare_split_files_are_never_left_empty(tmp_path, monkeypatch):
    """A split file whose write fails keeps its previous content (the issue's 0-byte ``preferences.jsonl``)."""
    from otalign.data import conversion

    path = tmp_path / "preferences.jsonl"
    conversion.write_jsonl([{"a": 1}], path)

    def full(self, data, *args, **kwargs):  # the disk fills after the first byte
        with open(self, "w", encoding="utf-8") as f:
            f.write(data[:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", full)
    with pytest.raises(OutputError, match="preferences.jsonl is as it was"):
        conversion.write_jsonl([{"a": 2}], path)
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}\n'


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="mounts a small tmpfs in a private mount namespace: Linux, root, util-linux unshare",
)
def test_a_really_full_disk_keeps_the_previous_final_model(tmp_path):
    """``otalign sft`` on a 400 KiB tmpfs writes its model; the disk is then filled to ~40 KiB free and the run
    repeated with ``--overwrite_output_dir``: one line naming ``output_dir/model``, the first model intact, no
    temporary folder."""
    from otalign.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "disk"
    out.mkdir()
    run = out / "run"
    args = [
        sys.executable,
        "-m",
        "otalign.cli",
        "sft",
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        os.path.join(FIXTURES, "sft_pairs.jsonl"),
        "--output_dir",
        str(run),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--progress_bar",
        "false",
    ]
    shell = (
        'mount -t tmpfs -o size=400k tmpfs "$0" || exit 99; "$@" || exit 98; sha256sum "$0/run/model/"*; '
        'head -c $(( $(df -B1 --output=avail "$0" | tail -1) - 40960 )) /dev/zero > "$0/filler"; '
        '"$@" --overwrite_output_dir true; echo "exit=$?"; sha256sum "$0/run/model/"*; ls -A "$0/run"'
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", shell, str(out), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode == 99:
        pytest.skip(f"no private tmpfs here: {done.stderr[-500:]}")
    assert "exit=" in done.stdout, done.stderr[-3000:]
    before, after = done.stdout.split("exit=")
    errors = [line for line in done.stderr.splitlines() if line.startswith("otalign sft:")]
    assert len(errors) == 1 and after.startswith("2"), done.stderr[-3000:]
    assert errors[0].startswith(f"otalign sft: error: no space left to write {run}/model: ")
    assert f"{run}/model is as it was" in errors[0]
    sums = after.split("\n", 1)[1]
    first = [line for line in before.splitlines() if "/model/" in line]
    assert [line for line in sums.splitlines() if "/model/" in line] == first
    assert any(line.endswith("/model/model.safetensors") for line in first)
    assert not [name for name in sums.split() if name.startswith((".tmp-", ".old-"))]


def test_a_temporary_left_by_a_killed_write_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".tmp-999999-model"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with written_atomically(tmp_path / "model") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
