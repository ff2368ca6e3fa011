"""Tests of qwenrun-rag with the real (bundled, offline) all-MiniLM-L6-v2 model."""

import inspect
import itertools
import json
import os
import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import qwenrun_rag
from pydantic import ValidationError
from qwenrun_rag import MAX_K, RagError, RagSettings, chunk_text, search_documents

CORPUS = {
    "astronomy.md": (
        "# The Solar System\n\n"
        "The Sun is a star at the centre of the Solar System. Eight planets orbit it.\n"
        "Jupiter is the largest planet; Mars is the red planet.\n\n"
        "Light from the Sun takes about eight minutes to reach the Earth.\n"
    ),
    "recipes/bread.txt": (
        "Sourdough bread\n\n"
        "Mix flour, water and salt with an active starter. Knead the dough, let it rise\n"
        "overnight, then bake it in a hot oven at 230 degrees until the crust is dark.\n"
    ),
    "python.md": (
        "# Python tips\n\n"
        "Python is a programming language. Use list comprehensions and generators to\n"
        "iterate over data; functions are defined with the def keyword.\n"
    ),
    "garden/tomatoes.txt": (
        "Growing tomatoes\n\n"
        "Tomato plants need full sun, regular watering and support stakes. Prune the\n"
        "side shoots and harvest the fruit when it is red.\n"
    ),
}


def write_corpus(folder: Path, corpus: dict[str, str] = CORPUS) -> Path:
    for rel, text in corpus.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "docs")


@pytest.fixture
def embed_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the texts of every call to the embedding function."""
    calls: list[list[str]] = []
    real = qwenrun_rag._embed

    def counting(texts: list[str], device: str) -> Any:
        calls.append(list(texts))
        return real(texts, device)

    monkeypatch.setattr(qwenrun_rag, "_embed", counting)
    return calls


def first_hit(answer: str) -> str:
    match = re.match(r"\[1\] (\S+) \(chunk \d+/\d+, lines? \d+(-\d+)?\) score=-?\d\.\d{3}\n", answer)
    assert match, answer
    return match.group(1)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("How long does sunlight take to reach Earth?", "astronomy.md"),
        ("which planet is the biggest", "astronomy.md"),
        ("how do I bake sourdough", "recipes/bread.txt"),
        ("oven temperature for baking", "recipes/bread.txt"),
        ("how to define a function in Python", "python.md"),
        ("iterate with a list comprehension", "python.md"),
        ("when to harvest tomatoes", "garden/tomatoes.txt"),
        ("how often should I water my plants", "garden/tomatoes.txt"),
    ],
)
def test_the_topical_file_ranks_first(docs: Path, query: str, expected: str) -> None:
    answer = search_documents(query, k=4, settings=RagSettings(documents=str(docs)))
    assert first_hit(answer) == expected
    assert answer.count("\n\n[") == 3  # four hits, one per file


def test_hits_cite_file_chunk_lines_and_score(docs: Path) -> None:
    answer = search_documents("Jupiter", k=1, settings=RagSettings(documents=str(docs)))
    header, body = answer.split("\n", 1)
    assert re.fullmatch(r"\[1\] astronomy\.md \(chunk 1/1, lines 1-6\) score=0\.\d{3}", header)
    assert body == CORPUS["astronomy.md"].strip()


def test_index_is_persisted_and_reused(docs: Path, embed_calls: list[list[str]]) -> None:
    settings = RagSettings(documents=str(docs))
    search_documents("bread", settings=settings)
    index = docs / ".qwenrun-index"
    manifest = json.loads((index / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(CORPUS)
    assert (index / manifest["embeddings"]).is_file()
    assert [len(call) for call in embed_calls] == [4, 1]  # four one-chunk files, then the query
    stamp = (index / "manifest.json").stat().st_mtime_ns

    embed_calls.clear()
    search_documents("planets", settings=settings)
    assert embed_calls == [["planets"]]  # only the query: nothing was re-embedded
    assert (index / "manifest.json").stat().st_mtime_ns == stamp  # and nothing rewritten


def test_changed_added_and_deleted_files_are_reindexed(docs: Path, embed_calls: list[list[str]]) -> None:
    settings = RagSettings(documents=str(docs))
    search_documents("bread", settings=settings)
    index = docs / ".qwenrun-index"
    before = json.loads((index / "manifest.json").read_text())

    python = docs / "python.md"
    python.write_text("# Rust tips\n\nThe borrow checker enforces ownership and lifetimes.\n")
    os.utime(python, ns=(python.stat().st_atime_ns, before["files"]["python.md"]["mtime_ns"] + 10**9))
    (docs / "garden" / "tomatoes.txt").unlink()
    (docs / "music.md").write_text("Mozart composed symphonies, operas and piano concertos.\n")
    embed_calls.clear()

    answer = search_documents("borrow checker and ownership", k=1, settings=settings)
    assert first_hit(answer) == "python.md" and "borrow checker" in answer
    new_chunks = sorted(chunk for call in embed_calls[:-1] for chunk in call)
    assert new_chunks == [
        "# Rust tips\n\nThe borrow checker enforces ownership and lifetimes.",
        "Mozart composed symphonies, operas and piano concertos.",
    ]  # only the changed and the new file; the query is the last call
    after = json.loads((index / "manifest.json").read_text())
    assert sorted(after["files"]) == ["astronomy.md", "music.md", "python.md", "recipes/bread.txt"]
    assert after["files"]["astronomy.md"]["mtime_ns"] == before["files"]["astronomy.md"]["mtime_ns"]
    assert [p.name for p in index.glob("embeddings-*.npy")] == [after["embeddings"]]  # old matrix gone
    assert first_hit(search_documents("opera composer", settings=settings)) == "music.md"


def test_custom_index_path_and_corrupt_index_rebuilt(docs: Path, tmp_path: Path) -> None:
    index = tmp_path / "elsewhere" / "idx"
    settings = RagSettings(documents=str(docs), index_path=str(index))
    search_documents("bread", settings=settings)
    assert (index / "manifest.json").is_file() and not (docs / ".qwenrun-index").exists()
    (index / "manifest.json").write_text("{not json")
    assert first_hit(search_documents("tomato", settings=settings)) == "garden/tomatoes.txt"
    manifest = json.loads((index / "manifest.json").read_text())
    matrix = index / manifest["embeddings"]
    matrix.write_bytes(matrix.read_bytes()[:100])  # a truncated .npy
    assert first_hit(search_documents("planets", settings=settings)) == "astronomy.md"
    assert len(list(index.glob("embeddings-*.npy"))) == 1


def test_new_chunk_settings_rebuild_the_index(docs: Path, embed_calls: list[list[str]]) -> None:
    search_documents("bread", settings=RagSettings(documents=str(docs)))
    embed_calls.clear()
    search_documents("bread", settings=RagSettings(documents=str(docs), chunk_size=400, chunk_overlap=50))
    assert [len(call) for call in embed_calls] == [4, 1]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", r"the documents folder '.*nowhere' does not exist"),
        ("file", r"the documents folder '.*a-file.txt' is not a folder"),
        ("empty", r"has no \.txt or \.md files"),
        ("other-files", r"has no \.txt or \.md files"),
        ("blank-files", r"contain no text"),
    ],
)
def test_folder_errors(tmp_path: Path, setup: str, message: str) -> None:
    folder = tmp_path / "nowhere"
    if setup == "file":
        folder = tmp_path / "a-file.txt"
        folder.write_text("hello")
    elif setup != "missing":
        folder.mkdir()
        if setup == "other-files":
            (folder / "paper.pdf").write_bytes(b"%PDF-1.7")
            (folder / ".hidden.md").write_text("secret")
        elif setup == "blank-files":
            (folder / "empty.md").write_text("\n\n   \n")
    with pytest.raises(RagError, match=message):
        search_documents("anything", settings=RagSettings(documents=str(folder)))


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1])
def test_k_out_of_range(docs: Path, k: int) -> None:
    with pytest.raises(RagError, match=rf"k must be between 1 and {MAX_K}, got {k}"):
        search_documents("bread", k=k, settings=RagSettings(documents=str(docs)))


def test_empty_query(docs: Path) -> None:
    with pytest.raises(RagError, match="the query is empty"):
        search_documents("  ", settings=RagSettings(documents=str(docs)))


def test_k_larger_than_the_collection_returns_everything(docs: Path) -> None:
    answer = search_documents("anything", k=MAX_K, settings=RagSettings(documents=str(docs)))
    assert len(re.findall(r"^\[\d+\] ", answer, flags=re.M)) == 4


def test_settings_validation() -> None:
    settings = RagSettings()
    assert (settings.documents, settings.index_path, settings.chunk_size, settings.chunk_overlap) == (
        "docs",
        None,
        800,
        100,
    )
    with pytest.raises(ValidationError):
        RagSettings.model_validate({"documents": "x", "top_k": 3})
    with pytest.raises(ValidationError, match="at most half"):
        RagSettings(chunk_size=200, chunk_overlap=150)


# -- chunking ----------------------------------------------------------------------------------


def test_chunking_packs_paragraphs_and_tracks_lines() -> None:
    text = "alpha beta\ngamma\n\n\ndelta\n\n" + "epsilon " * 10 + "\n"
    chunks = chunk_text(text, size=100, overlap=10)
    assert [text[s:e] for s, e, _, _ in chunks] == ["alpha beta\ngamma\n\n\ndelta", ("epsilon " * 10).strip()]
    assert [(first, last) for _, _, first, last in chunks] == [(1, 5), (7, 7)]


def test_long_paragraphs_are_cut_into_overlapping_windows() -> None:
    words = " ".join(f"word{i}" for i in range(400))  # one 2,7xx-character paragraph
    chunks = chunk_text(words, size=300, overlap=60)
    assert len(chunks) > 9
    for (s1, e1, _, _), (s2, _, _, _) in itertools.pairwise(chunks):
        assert e1 - s1 <= 300
        assert 0 < e1 - s2 <= 60  # consecutive windows overlap
        assert words[e1 - 1] != " " and (e1 == len(words) or words[e1] == " ")  # cut at a space
    assert chunks[-1][1] == len(words)
    cjk = "天气很好。" * 200  # no spaces: cut after sentence punctuation
    assert all(cjk[e - 1] == "。" for _, e, _, _ in chunk_text(cjk, size=100, overlap=10))


# -- model, threads and the contract -------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield


def test_model_loads_offline_once_per_process(
    docs: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    import sentence_transformers

    monkeypatch.setattr(qwenrun_rag, "_MODELS", {})  # force a fresh load, with sockets refused
    loads: list[dict[str, Any]] = []
    real = sentence_transformers.SentenceTransformer

    def counting(*args: Any, **kwargs: Any) -> Any:
        loads.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", counting)
    settings = RagSettings(documents=str(docs))
    with ThreadPoolExecutor(4) as pool:  # concurrent first searches: one load, one index build
        answers = list(pool.map(lambda q: search_documents(q, settings=settings), ["sun", "bread"] * 4))
    assert [first_hit(a) for a in answers] == ["astronomy.md", "recipes/bread.txt"] * 4
    assert loads == [{"device": "cpu", "local_files_only": True}]
    assert len(list((docs / ".qwenrun-index").glob("embeddings-*.npy"))) == 1


def test_signature_and_docstring_follow_the_tool_contract() -> None:
    signature = inspect.signature(search_documents, eval_str=True)
    assert list(signature.parameters) == ["query", "k", "settings"]
    settings = signature.parameters["settings"]
    assert settings.kind is inspect.Parameter.KEYWORD_ONLY and settings.annotation is RagSettings
    doc = inspect.getdoc(search_documents) or ""
    assert doc.split("\n\n")[0].startswith("Search the local document collection")
    assert "Args:\n    query:" in doc and "\n    k:" in doc


def test_entry_point_is_registered() -> None:
    (ep,) = [ep for ep in entry_points(group="qwenrun.tools") if ep.name == "search_documents"]
    assert ep.value == "qwenrun_rag:search_documents"
    assert ep.load() is search_documents
