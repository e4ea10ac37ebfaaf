"""JSONL -> megatron-core indexed dataset, checked with megatron-core's own reader."""

from __future__ import annotations

import ast
import gzip
import itertools
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phoenix.data.preprocess import EmptyOutputError, GroupAdjacencyError, preprocess
from phoenix.testing.synthetic import generate_documents, write_corpus
from phoenix.tokenizer import SentencePieceTokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[2]
# megatron-core warns about optional GPU extras on import; irrelevant here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Transformer Engine and Apex:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpora")
    web = write_corpus(d / "web.jsonl", 120, seed=1, group_key="repo", docs_per_group=(1, 5))
    code = write_corpus(d / "code.jsonl.gz", 60, seed=2, domain="code", max_words=60)
    return {"web": Path(web), "code": Path(code)}


@pytest.fixture(scope="module")
def tok(corpora: dict[str, Path], tmp_path_factory) -> SentencePieceTokenizer:
    # Trained once per module: every test below tokenizes with this model.
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    model = train_sentencepiece(list(corpora.values()), prefix, 512, text_key="text")
    return SentencePieceTokenizer(model)


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_dataset(prefix: Path) -> tuple[list[np.ndarray], np.ndarray, type]:
    """Read back with megatron-core's IndexedDataset: (sequences, document_indices, dtype)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i]) for i in range(len(ds))], np.array(ds.document_indices), ds.index.dtype


def outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_roundtrip_against_megatron_reader(corpora, tok, tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import DType

    prefix = tmp_path / "out" / "mix"
    inputs = [corpora["web"], corpora["code"]]
    meta = preprocess(inputs, prefix, tok.model_file, name="mix", tags="a, b,")
    docs = read_jsonl(corpora["web"]) + read_jsonl(corpora["code"])
    seqs, doc_idx, dtype = read_dataset(prefix)

    assert dtype == DType.optimal_dtype(tok.vocab_size) == np.uint16
    # One sequence per document, in input order, each ending with exactly one eod.
    assert len(seqs) == len(docs) == meta["num_documents"]
    np.testing.assert_array_equal(doc_idx, np.arange(len(docs) + 1))
    for seq, doc in zip(seqs, docs):
        assert seq.tolist() == tok.encode(doc["text"]) + [tok.eod_id]
        assert tok.decode(seq[:-1].tolist()) == doc["text"]
    assert meta["num_tokens"] == sum(len(s) for s in seqs)
    on_disk = json.loads((tmp_path / "out" / "mix.meta.json").read_text())
    assert on_disk == meta
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    assert meta["tokenizer_vocab_size"] == tok.vocab_size
    assert (meta["dtype"], meta["tags"], meta["eod_id"]) == ("uint16", ["a", "b"], 2)
    assert (meta["skipped_lines"], meta["name"], meta["text_key"]) == (0, "mix", "text")
    assert meta["source_files"] == [str(corpora["web"]), str(corpora["code"])]
    # No group key: no groups sidecar and no temporary files.
    assert outputs(tmp_path / "out") == ["mix.bin", "mix.idx", "mix.meta.json"]


def test_no_append_eod(corpora, tok, tmp_path: Path) -> None:
    meta = preprocess(corpora["code"], tmp_path / "c", tok.model_file, append_eod=False)
    seqs, _, _ = read_dataset(tmp_path / "c")
    docs = read_jsonl(corpora["code"])
    assert [s.tolist() for s in seqs] == [tok.encode(d["text"]) for d in docs]
    assert (meta["append_eod"], meta["eod_id"]) == (False, None)


def test_groups_sidecar(corpora, tok, tmp_path: Path) -> None:
    meta = preprocess(corpora["web"], tmp_path / "w", tok.model_file, group_key="repo")
    groups = np.load(tmp_path / "w.groups.npy")
    repos = [d["repo"] for d in read_jsonl(corpora["web"])]
    assert groups.dtype == np.int64 and len(groups) == len(repos) == meta["num_documents"]
    # Ids are assigned in order of first appearance, and each group is one contiguous run.
    expected = {r: i for i, r in enumerate(dict.fromkeys(repos))}
    assert groups.tolist() == [expected[r] for r in repos]
    assert set(np.diff(groups).tolist()) <= {0, 1}
    assert meta["num_groups"] == groups.max() + 1 == len(expected) > 10
    # A later run without a group key must not leave a stale sidecar behind.
    preprocess(corpora["web"], tmp_path / "w", tok.model_file)
    assert not (tmp_path / "w.groups.npy").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_non_adjacent_group_is_an_error(tok, tmp_path: Path, workers: int) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {r}", "repo": r}) + "\n" for r in "aabcca"))
    (tmp_path / "out").mkdir()
    with pytest.raises(GroupAdjacencyError, match=r"in\.jsonl:6: group \"a\""):
        out = tmp_path / "out" / "g"
        preprocess(src, out, tok.model_file, group_key="repo", workers=workers, chunk_lines=1)
    assert outputs(tmp_path / "out") == []


@pytest.mark.parametrize("workers,chunk_lines", [(1, 256), (1, 3), (2, 2)])
def test_malformed_lines_are_counted_with_line_numbers(
    tok, tmp_path: Path, caplog, workers: int, chunk_lines: int
) -> None:
    lines = [
        b'{"text": "good one"}',  # 1
        b'{"text": "unterminated',  # 2 invalid JSON
        b"[1, 2]",  # 3 not an object
        b'{"id": 7}',  # 4 missing text
        b'{"text": 5}',  # 5 not a string
        b'{"text": ""}',  # 6 empty
        b"",  # 7 blank
        b'{"text": "good two"}',  # 8
        b'{"text": "\xff\xfe"}',  # 9 invalid UTF-8
        b'{"text": "  \\n\\t "}',  # 10 whitespace only
        b'{"text": "lone \\ud800 surrogate"}',  # 11 not encodable
        b'{"text": "good three", "extra": [1]}',  # 12, no trailing newline
    ]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="phoenix.data.preprocess"):
        meta = preprocess(src, tmp_path / "b", tok.model_file, workers=workers,
                          chunk_lines=chunk_lines)  # fmt: skip
    bad = [2, 3, 4, 5, 6, 7, 9, 10, 11]
    assert meta["skipped_lines"] == len(bad)
    numbers = [int(re.match(r".*bad\.jsonl:(\d+): ", e)[1]) for e in meta["skipped_examples"]]
    assert numbers == bad
    for n in bad:
        assert f"bad.jsonl:{n}: " in caplog.text
    assert "skipped 9 malformed" in caplog.text
    seqs, _, _ = read_dataset(tmp_path / "b")
    texts = [tok.decode(s[:-1].tolist()) for s in seqs]
    assert texts == ["good one", "good two", "good three"] and meta["num_documents"] == 3


def test_only_first_twenty_skips_listed(tok, tmp_path: Path, caplog) -> None:
    src = tmp_path / "many.jsonl"
    src.write_text("not json\n" * 30 + '{"text": "ok"}\n')
    with caplog.at_level(logging.WARNING, logger="phoenix.data.preprocess"):
        meta = preprocess(src, tmp_path / "m", tok.model_file)
    assert meta["skipped_lines"] == 30 and len(meta["skipped_examples"]) == 20
    assert "many.jsonl:20: " in caplog.text and "many.jsonl:21: " not in caplog.text
    assert "skipped 30 malformed" in caplog.text


def test_gzip_input_matches_plain(corpora, tok, tmp_path: Path) -> None:
    plain = tmp_path / "code.jsonl"
    plain.write_bytes(gzip.decompress(corpora["code"].read_bytes()))
    preprocess(plain, tmp_path / "p", tok.model_file)
    preprocess(corpora["code"], tmp_path / "g", tok.model_file)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"p{suffix}").read_bytes() == (tmp_path / f"g{suffix}").read_bytes()


def test_workers_give_identical_output(corpora, tok, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    # A malformed line and a document of a new group after it, to cross chunk boundaries.
    tail = b'oops\n{"text": "last", "repo": "zz"}\n'
    src.write_bytes(corpora["web"].read_bytes() + tail)
    kw = dict(group_key="repo", name="same", chunk_lines=7)
    m1 = preprocess(src, tmp_path / "one", tok.model_file, workers=1, **kw)
    m2 = preprocess(src, tmp_path / "two", tok.model_file, workers=2, **kw)
    for suffix in (".bin", ".idx", ".groups.npy"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    assert m1 == m2 and m1["skipped_lines"] == 1


def test_empty_output_raises_and_writes_nothing(tok, tmp_path: Path) -> None:
    src = tmp_path / "in" / "empty.jsonl"
    src.parent.mkdir()
    src.write_text('{"text": ""}\n\n{"other": "x"}\n')
    with pytest.raises(EmptyOutputError, match="no documents"):
        preprocess(src, tmp_path / "out" / "e", tok.model_file)
    assert outputs(tmp_path / "out") == []


def test_failure_midway_leaves_no_partial_files(
    corpora, tok, tmp_path: Path, monkeypatch
) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "x"
    preprocess(corpora["web"], prefix, tok.model_file)  # a previous good output
    before = {name: (tmp_path / name).read_bytes() for name in outputs(tmp_path)}

    real_add_item, calls = IndexedDatasetBuilder.add_item, []

    def flaky_add_item(self, tensor, mode=0):
        calls.append(1)
        if len(calls) == 50:
            raise RuntimeError("disk on fire")
        return real_add_item(self, tensor, mode)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_item", flaky_add_item)
    with pytest.raises(RuntimeError, match="disk on fire"):
        preprocess(corpora["web"], prefix, tok.model_file, group_key="repo")
    # The old outputs are untouched and no temporary or new PREFIX.* files remain.
    assert {name: (tmp_path / name).read_bytes() for name in outputs(tmp_path)} == before

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    calls.clear()
    with pytest.raises(RuntimeError, match="disk on fire"):
        preprocess(corpora["web"], fresh / "y", tok.model_file)
    assert outputs(fresh) == []


def test_missing_inputs_fail_before_any_work(corpora, tok, tmp_path: Path) -> None:
    out = tmp_path / "out" / "z"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        preprocess([corpora["web"], tmp_path / "missing.jsonl"], out, tok.model_file)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        preprocess(corpora["web"], out, tmp_path / "nope.model")
    assert not out.parent.exists()


def test_tokenizer_without_eos_needs_no_append_eod(corpora, tmp_path: Path) -> None:
    model = train_sentencepiece(
        [corpora["web"]], tmp_path / "noeos", 300, text_key="text", extra_options={"eos_id": -1}
    )
    with pytest.raises(ValueError, match="no EOS"):
        preprocess(corpora["web"], tmp_path / "n", model)
    meta = preprocess(corpora["web"], tmp_path / "n", model, append_eod=False)
    assert meta["num_documents"] == 120


def test_cli_help_and_real_run(corpora, tok, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def run(args: list[str]) -> subprocess.CompletedProcess:
        # cwd elsewhere: `phoenix preprocess` does not depend on the working directory.
        cmd = [sys.executable, "-m", "phoenix.cli", "preprocess", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)

    res = run(["--help"])
    assert res.returncode == 0
    assert "--output-prefix" in res.stdout and "--no-append-eod" in res.stdout

    args = ["--input", str(corpora["web"]), "--output-prefix", str(tmp_path / "cli"),
            "--tokenizer-model", tok.model_file, "--group-key", "repo",
            "--tags", "web,test"]  # fmt: skip
    res = run(args)
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "cli.meta.json").read_text())
    seqs, _, _ = read_dataset(tmp_path / "cli")
    assert meta["tags"] == ["web", "test"] and meta["num_documents"] == len(seqs) == 120
    assert len(np.load(tmp_path / "cli.groups.npy")) == 120

    res = run(args[:1] + ["nope.jsonl"] + args[2:])
    assert res.returncode == 2 and "input file not found: nope.jsonl" in res.stderr


# --- synthetic corpus: the input every other test relies on ---------------------------------


def test_synthetic_corpus_is_deterministic(tmp_path: Path) -> None:
    a = write_corpus(tmp_path / "a.jsonl.gz", 30, seed=5, group_key="repo")
    b = write_corpus(tmp_path / "b.jsonl.gz", 30, seed=5, group_key="repo")
    c = write_corpus(tmp_path / "c.jsonl.gz", 30, seed=6, group_key="repo")
    assert Path(a).read_bytes() == Path(b).read_bytes() != Path(c).read_bytes()
    assert outputs(tmp_path) == ["a.jsonl.gz", "b.jsonl.gz", "c.jsonl.gz"]


def test_synthetic_groups_are_adjacent_and_sized(tmp_path: Path) -> None:
    docs = list(generate_documents(200, seed=0, group_key="repo", docs_per_group=(2, 4)))
    runs = [len(list(g)) for _, g in itertools.groupby(d["repo"] for d in docs)]
    assert len(runs) == len({d["repo"] for d in docs})  # each group is one run
    assert all(2 <= n <= 4 for n in runs[:-1]) and 1 <= runs[-1] <= 4


def test_synthetic_domains_have_distinct_styles() -> None:
    for doc in generate_documents(20, seed=0, domain="math"):
        for line in doc["text"].splitlines():
            m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\.", line)
            if m:  # arithmetic statements are correct
                x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
                assert {"+": x + y, "-": x - y, "*": x * y}[op] == z
    for doc in generate_documents(20, seed=0, domain="code"):
        ast.parse(doc["text"])
        assert "def " in doc["text"] or "class " in doc["text"]
    for doc in generate_documents(20, seed=0, domain="web", min_words=50):
        assert "def " not in doc["text"] and " = " not in doc["text"]
        assert 50 <= len(doc["text"].split())
