"""GGUF files to model folders vLLM loads, written atomically: the disk side of ``qwenrun model``.

:func:`import_gguf` dequantizes a GGUF file with transformers (``gguf_file=``,
``GgufConfig(dequantize=True)``) and saves safetensors, tokenizer and chat template. Every
folder is built in a hidden sibling (``.NAME.partial-*``) under a lock file (``.NAME.lock``) and
renamed into place, so another process never sees half a model and two writers of one folder
take turns; a full disk (checked before, or ENOSPC mid-way) is a :class:`DiskFullError` and
leaves nothing behind. A finished folder holds ``qwenrun-model.json`` (source, sha256, dtype).
torch, transformers and gguf are imported inside functions.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qwenrun.errors import DiskFullError, ModelError

__all__ = ["MARKER", "Report", "import_gguf", "is_complete"]

Report = Callable[[str], None]
MARKER = "qwenrun-model.json"
MB = 1_000_000
_MARGIN = 1.1  # free space asked for beyond the estimate
_MODEL_ERROR, _DISK_FULL = 2, 3  # exit codes of the conversion child


def quiet(message: str) -> None:
    """The default reporter: says nothing."""


def is_complete(directory: Path, sha256: str | None = None) -> bool:
    """True when ``directory`` is a finished qwenrun model folder (of the GGUF ``sha256``, if given)."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and (sha256 is None or marker.get("sha256") == sha256)


# -- import -----------------------------------------------------------------------------------


def import_gguf(
    gguf_file: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
    report: Report = quiet,
) -> list[Path]:
    """Convert a GGUF file into a new folder vLLM loads; return the files written.

    ``directory`` must not exist or be empty. The GGUF's chat template is kept.
    """
    source = Path(gguf_file).expanduser().absolute()
    target = Path(directory).expanduser().absolute()
    if not source.is_file():
        raise ModelError(f"{source}: no such GGUF file")
    estimate = _converted_size(source, dtype)
    with atomic_folder(target, report) as work:
        if target.exists() and any(target.iterdir()):
            raise ModelError(f"{target} exists and is not empty; give a new directory")
        check_free_space(target.parent, estimate, f"converting {source.name}")
        report(f"converting {source.name} to {dtype} safetensors")
        out = work / "model"
        convert(source, out, dtype)
        write_marker(out, recipe=None, gguf=source.name, sha256=_sha256(source), dtype=dtype)
        install(out, target)
    return sorted(target.iterdir())


def _converted_size(gguf: Path, dtype: str) -> int:
    """Bytes of the dequantized weights (from the GGUF's tensor table) plus room for the tokenizer."""
    try:
        from gguf import GGUFReader

        elements = sum(int(tensor.n_elements) for tensor in GGUFReader(gguf).tensors)
    except ImportError:
        raise ModelError("reading GGUF files needs the gguf package: pip install gguf") from None
    except Exception as exc:  # gguf raises ValueError, struct.error, ... on a file that is not GGUF
        raise ModelError(f"{gguf}: not a readable GGUF file: {exc}") from exc
    width = 4 if dtype == "float32" else 2
    return elements * width + 50 * MB


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 * MB):
            digest.update(chunk)
    return digest.hexdigest()


def convert(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize ``gguf`` into ``out`` in a child Python (``python -m qwenrun.weights.convert``).

    The child holds the ~3 GB the conversion needs and gives them back when it exits, so a
    long-lived caller (a server, a test session) does not keep them; its progress goes to stderr.
    """
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ModelError(f"dtype must be bfloat16, float16 or float32, not {dtype!r}")
    command = [sys.executable, "-m", "qwenrun.weights.convert", str(gguf), str(out), dtype]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode == 0:
        return
    said = done.stdout.strip().splitlines()
    if done.returncode == _DISK_FULL:
        raise OSError(errno.ENOSPC, "No space left on device", str(out))
    if done.returncode == _MODEL_ERROR and said:
        raise ModelError(said[-1])
    if done.returncode < 0:
        signal = -done.returncode
        hint = " (out of memory? converting needs about 3 GB per GB of GGUF)" if signal == 9 else ""
        raise ModelError(f"{gguf.name}: the conversion was killed by signal {signal}{hint}")
    raise ModelError(f"{gguf.name}: the conversion failed (exit {done.returncode}); see its output above")


def _convert_here(gguf: Path, out: Path, dtype: str) -> None:
    """The conversion itself, with transformers (``gguf_file=``, ``GgufConfig(dequantize=True)``)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise ModelError(f"converting GGUF needs torch, transformers and gguf: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype),
            quantization_config=GgufConfig(dequantize=True),
        )  # fmt: skip
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except Exception as exc:
        if disk_full(exc):
            raise
        problem = f"{type(exc).__name__}: {exc}"
        raise ModelError(f"{gguf.name}: transformers could not convert it: {problem}") from exc
    if not (out / "chat_template.jinja").is_file() and "chat_template" not in (
        out / "tokenizer_config.json"
    ).read_text(encoding="utf-8"):
        raise ModelError(f"{gguf.name}: has no chat template (tokenizer.chat_template); agents need one")


def _child(argv: list[str]) -> int:
    """``python -m qwenrun.weights.convert GGUF OUT DTYPE``: the child of :func:`convert`. A ModelError's
    message goes to stdout (exit 2), a full disk is exit 3."""
    gguf, out, dtype = argv
    try:
        _convert_here(Path(gguf), Path(out), dtype)
    except ModelError as exc:
        print(str(exc).replace("\n", " "), flush=True)
        return _MODEL_ERROR
    except Exception as exc:
        if disk_full(exc):
            return _DISK_FULL
        raise
    return 0


def write_marker(out: Path, **fields: object) -> None:
    from qwenrun.version import __version__

    text = json.dumps({**fields, "qwenrun": __version__}, indent=2, ensure_ascii=False) + "\n"
    (out / MARKER).write_text(text, encoding="utf-8")


# -- disk: free space, staging, locking -------------------------------------------------------


def check_free_space(where: Path, needed: int, doing: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    wanted = int(needed * _MARGIN)
    if free < wanted:
        raise DiskFullError(
            f"not enough free space in {where} for {doing}: it needs about {wanted / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} GB are free (free some space, or give another directory / "
            "set QWENRUN_MODELS_DIR)"
        )


def disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or its cause says the disk is full (ENOSPC/EDQUOT, or safetensors' IoError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "StorageFull" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def atomic_folder(target: Path, report: Report) -> Iterator[Path]:
    """Hold the lock of ``target`` and yield a fresh hidden work folder beside it (always removed).

    A full disk becomes :class:`DiskFullError`, any other OS error a :class:`ModelError` naming
    ``target``; qwenrun's own errors pass through."""
    try:
        with _locked(target, report), _staging(target) as work:
            yield work
    except ModelError:
        raise
    except Exception as exc:
        if disk_full(exc):
            raise DiskFullError(f"no space left on device while writing {target}; nothing was kept") from exc
        if isinstance(exc, OSError):
            raise ModelError(f"could not write {target}: {exc}") from exc
        raise


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a killed process
        shutil.rmtree(stale, ignore_errors=True)  # (safe: we hold the lock of this target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _locked(target: Path, report: Report) -> Iterator[None]:
    """Hold ``.<target>.lock`` beside ``target`` (waits for another process writing the same folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"another process is writing {target}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def refuse_foreign(target: Path) -> None:
    """Never replace a folder that is not a qwenrun model (the user's own files)."""
    if target.exists() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise ModelError(f"{target} exists and is not a qwenrun model folder; give a new or empty directory")


def install(out: Path, target: Path) -> None:
    """Rename the finished ``out`` to ``target`` (an old qwenrun model folder there is replaced).

    The folder and its files become readable by all (safetensors writes its file 0600), so a
    cache shared between users or containers works."""
    out.chmod(0o755)
    for path in out.iterdir():
        path.chmod(0o644)
    if target.exists() and any(target.iterdir()):
        old = out.parent / "old"
        os.replace(target, old)
    os.replace(out, target)


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
