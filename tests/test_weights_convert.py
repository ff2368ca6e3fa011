"""GGUF import for real (the tiny model written as GGUF, converted back with transformers), the
free-space check, the atomic folder (hidden sibling + rename, lock) and a full disk mid-way."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner
from tinygguf import write_tiny_gguf

from qwenrun.cli import main
from qwenrun.errors import DiskFullError, ModelError
from qwenrun.weights import convert


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-qwen2-f32.gguf")


def write_some(out: Path) -> None:
    """What a conversion leaves in its folder, in small (for the tests of the folder's handling)."""
    out.mkdir()
    (out / "config.json").write_text("{}", encoding="utf-8")
    (out / "model.safetensors").write_bytes(b"\0" * 1024)
    (out / "model.safetensors").chmod(0o600)  # as safetensors writes it


def leftovers(parent: Path) -> list[str]:
    """Hidden work folders left beside the targets (lock files are kept on purpose)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and ".partial-" in p.name)


def test_import_round_trips_the_tiny_model(tiny_gguf: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "imported"
    result = CliRunner().invoke(main, ["model", "import", str(tiny_gguf), str(target), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    names = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
             "qwenrun-model.json", "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    assert sorted(p.name for p in target.iterdir()) == names
    for name in names:  # it prints what it wrote
        assert str(target / name) in result.stdout
    marker = json.loads((target / "qwenrun-model.json").read_text(encoding="utf-8"))
    assert marker["gguf"] == tiny_gguf.name and marker["dtype"] == "float32" and len(marker["sha256"]) == 64
    assert leftovers(tmp_path) == []

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    converted = AutoTokenizer.from_pretrained(target)
    assert converted.chat_template == original.chat_template
    text = '广州天气情况如何? <tool_call>{"name": "x"}</tool_call><|im_end|>'
    ids = original(text).input_ids
    assert converted(text).input_ids == ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(torch.tensor([ids])).logits
        got = AutoModelForCausalLM.from_pretrained(target)(torch.tensor([ids])).logits
    assert torch.equal(want, got)  # float32 in, float32 out: the same model


def test_import_refuses_a_folder_with_files(tiny_gguf: Path, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ModelError, match=r"mine exists and is not empty; give a new directory"):
        convert.import_gguf(tiny_gguf, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert leftovers(tmp_path) == []


def test_import_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"missing\.gguf: no such GGUF file"):
        convert.import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all" * 10)
    with pytest.raises(ModelError, match=r"fake\.gguf: not a readable GGUF file"):
        convert.import_gguf(fake, tmp_path / "out")
    result = CliRunner().invoke(main, ["model", "import", str(fake), str(tmp_path / "out")])
    assert result.exit_code == 1 and "Error: " in result.output and "not a readable GGUF file" in result.output
    assert not (tmp_path / "out").exists()


def test_a_gguf_transformers_cannot_convert(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nonesuch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = CliRunner().invoke(main, ["model", "import", str(path), str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "\nError: odd.gguf: transformers could not convert it: " in result.output, result.output
    assert "nonesuch" in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_killed_conversion_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nkill -9 $$\n", encoding="utf-8")
    python.chmod(0o755)
    monkeypatch.setattr(convert.sys, "executable", str(python))
    with pytest.raises(ModelError, match=r"^m\.gguf: the conversion was killed by signal 9 \(out of memory\? "):
        convert.convert(tmp_path / "m.gguf", tmp_path / "out", "bfloat16")


def test_free_space_is_checked_before_converting(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(convert, "convert", pytest.fail)  # must not start
    with pytest.raises(DiskFullError, match=r"not enough free space in .* for converting tiny-qwen2-f32\.gguf: "
                       r"it needs about 0\.\d GB, 0\.0 GB are free"):  # fmt: skip
        convert.import_gguf(tiny_gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_full_disk_mid_way_leaves_nothing(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fills_the_disk(gguf: Path, out: Path, dtype: str) -> None:
        write_some(out)  # half a folder, then the disk is "full"
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "convert", fills_the_disk)
    result = CliRunner().invoke(main, ["model", "import", str(tiny_gguf), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "Error: no space left on device while writing" in result.output and "nothing was kept" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_other_os_errors_name_the_folder(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(gguf: Path, out: Path, dtype: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(out))

    monkeypatch.setattr(convert, "convert", refused)
    result = CliRunner().invoke(main, ["model", "import", str(tiny_gguf), str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"\nError: could not write {tmp_path / 'out'}: [Errno 13] Permission denied: " in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    ],
)
def test_disk_full_is_recognised(exc: BaseException) -> None:
    assert convert.disk_full(exc)
    try:
        raise ValueError("wrapped") from exc
    except ValueError as wrapped:
        assert convert.disk_full(wrapped)
    assert not convert.disk_full(OSError(errno.EACCES, "Permission denied"))


def test_the_folder_appears_only_when_complete(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out"
    seen: dict[str, Any] = {}
    def watched(gguf: Path, out: Path, dtype: str) -> None:
        write_some(out)  # (the real conversion is in test_import_round_trips_the_tiny_model)
        seen["target_during"] = target.exists()
        seen["work"] = out.parent.name
        seen["lock_held"] = _lock_is_held(tmp_path / ".out.lock")

    monkeypatch.setattr(convert, "convert", watched)
    stale = tmp_path / ".out.partial-killed"  # left by a process that was killed mid-way
    stale.mkdir()
    convert.import_gguf(tiny_gguf, target)
    assert seen == {"target_during": False, "work": seen["work"], "lock_held": True}
    assert seen["work"].startswith(".out.partial-")
    assert convert.is_complete(target) and leftovers(tmp_path) == []
    assert not _lock_is_held(tmp_path / ".out.lock")
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    assert {oct(p.stat().st_mode & 0o777) for p in target.iterdir()} == {"0o644"}


def _lock_is_held(path: Path) -> bool:
    """Ask another process whether it can take the lock (flock is per open file, not per process)."""
    code = (
        "import fcntl, sys\n"
        f"f = open({str(path)!r}, 'a')\n"
        "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n"
    )
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 3


def test_import_stays_light() -> None:
    code = "import sys, qwenrun.cli, qwenrun.weights.fetch, qwenrun.weights.convert; print(sorted({'torch', 'transformers', 'gguf', 'vllm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"
