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

from phoenix.data.jsonl_input import InputError
from phoenix.data.preprocess import EmptyOutputError, GroupAdjacencyError, WorkerDiedError, preprocess
from phoenix.data.synthetic import generate_documents, write_corpus
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


# --- unusable input files: one error naming the file, nothing written ----------------------


def test_bz2_and_xz_inputs_match_plain(corpora, tok, tmp_path: Path) -> None:
    import bz2
    import lzma

    plain = gzip.decompress(corpora["code"].read_bytes())
    (tmp_path / "code.jsonl").write_bytes(plain)
    (tmp_path / "code.jsonl.bz2").write_bytes(bz2.compress(plain))
    (tmp_path / "code.jsonl.xz").write_bytes(lzma.compress(plain))
    for name in ("code.jsonl", "code.jsonl.bz2", "code.jsonl.xz"):
        preprocess(tmp_path / name, tmp_path / f"o-{name}", tok.model_file)
    for suffix in (".bin", ".idx"):
        ref = (tmp_path / f"o-code.jsonl{suffix}").read_bytes()
        for name in ("code.jsonl.bz2", "code.jsonl.xz"):
            assert (tmp_path / f"o-{name}{suffix}").read_bytes() == ref


def _bad_inputs(d: Path, code: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of unusable input file -> (path, regex its error must match)."""
    import bz2
    import lzma

    plain = gzip.decompress(code.read_bytes())
    gz, bz, xz = gzip.compress(plain), bz2.compress(plain), lzma.compress(plain)
    corrupt, corrupt_start = bytearray(gz), bytearray(gz)
    corrupt[len(gz) // 2: len(gz) // 2 + 2] = bytes(b ^ 0xFF for b in gz[len(gz) // 2: len(gz) // 2 + 2])
    corrupt_start[12:40] = bytes(28)
    files = {
        # The case from the issue: a .jsonl.gz cut short (e.g. a partial download).
        "truncated.jsonl.gz": (gz[: len(gz) // 2], r"gzip data is truncated or corrupt after line \d+ \(\d+ bytes decompressed\)"),
        "plain.jsonl.gz": (plain, r"named like a gzip file, but is not gzip data"),
        "empty.jsonl.gz": (b"", r"named like a gzip file, but is empty"),
        "corrupt.jsonl.gz": (bytes(corrupt), r"gzip data is truncated or corrupt after line \d+"),
        "corrupt_start.jsonl.gz": (bytes(corrupt_start), r"gzip data is truncated or corrupt after line 0 \(0 bytes decompressed\)"),
        "truncated.jsonl.bz2": (bz[: len(bz) // 2], r"bzip2 data is truncated or corrupt after line \d+"),
        "truncated.jsonl.xz": (xz[: len(xz) // 2], r"xz data is truncated or corrupt after line \d+"),
        "gzipped.jsonl": (gz, r"is gzip-compressed, but its name says plain JSONL \(name it \*\.gz\)"),
        "zstd.jsonl.zst": (b"\x28\xb5\x2f\xfd" + bytes(20), r"is zstd-compressed.*decompress it first"),
        "utf16.jsonl": ('{"text": "hi"}\n'.encode("utf-16"), r"is UTF-16 text \(byte-order mark\); JSONL input must be UTF-8"),
        "binary.jsonl": (b'{"text": "a"}\n\x01\x00\x02', r"has a NUL byte on line 2"),
    }
    out = {}
    for name, (data, pattern) in files.items():
        (d / name).write_bytes(data)
        out[name] = (d / name, pattern)
    (d / "adir.jsonl").mkdir()
    out["adir.jsonl"] = (d / "adir.jsonl", "is a directory, not a JSONL file")
    (d / "broken.jsonl").symlink_to(d / "nowhere")
    out["broken.jsonl"] = (d / "broken.jsonl", "is not a regular file")
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_unusable_input_files_are_errors_naming_them(corpora, tok, tmp_path: Path, workers) -> None:
    bad = _bad_inputs(tmp_path, corpora["code"])
    (tmp_path / "out").mkdir()
    prefix = tmp_path / "out" / "x"
    preprocess(corpora["web"], prefix, tok.model_file)  # a previous good output
    before = {name: (tmp_path / "out" / name).read_bytes() for name in outputs(tmp_path / "out")}
    for name, (path, pattern) in bad.items():
        # After a good file, so that damage found while reading comes after real work.
        with pytest.raises(InputError, match=re.escape(str(path)) + ": " + pattern):
            preprocess([corpora["code"], path], prefix, tok.model_file, workers=workers)
        after = {n: (tmp_path / "out" / n).read_bytes() for n in outputs(tmp_path / "out")}
        assert after == before, name


def test_unusable_tokenizer_model_is_an_error_naming_it(corpora, tmp_path: Path) -> None:
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    with pytest.raises(InputError, match=r"tokenizer model .*garbage\.model: not a SentencePiece model"):
        preprocess(corpora["web"], tmp_path / "o", tmp_path / "garbage.model")
    with pytest.raises(InputError, match="is a directory"):
        preprocess(corpora["web"], tmp_path / "o", tmp_path)
    assert outputs(tmp_path) == ["garbage.model"]


def test_bom_latin1_and_deep_nesting_lines(tok, tmp_path: Path) -> None:
    # A UTF-8 byte-order mark may open a file; a Latin-1 line and a JSON value nested past
    # the parser's recursion limit are malformed lines like any other (skipped, reported).
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "caf\xe9"}\n'
                    + b"[" * 100_000 + b"]" * 100_000 + b'\n{"text": "last"}\n')
    meta = preprocess(src, tmp_path / "u", tok.model_file)
    assert meta["num_documents"] == 2 and meta["skipped_lines"] == 2
    assert meta["skipped_examples"][0].endswith("in.jsonl:2: invalid UTF-8 (byte 13)")
    assert meta["skipped_examples"][1].endswith("in.jsonl:3: invalid JSON (nested too deeply)")


class FaultyTokenizer(SentencePieceTokenizer):
    """Raises on a text containing RAISE and kills its process on DIE: faults inside a real
    worker process (it pickles as itself, so spawned workers import this module)."""

    def encode(self, text: str) -> list[int]:
        if "RAISE" in text:
            raise RuntimeError("tokenizer exploded")
        if "DIE" in text:
            os._exit(9)
        return super().encode(text)

    def __reduce__(self):
        return (FaultyTokenizer._from_proto, (self._model_file, self._proto))


@pytest.mark.parametrize("workers", [1, 2])
def test_error_in_encoding_names_file_and_line(tok, tmp_path: Path, monkeypatch, workers) -> None:
    import phoenix.data.preprocess as pp

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10))
                   + '{"text": "RAISE here"}\n')
    monkeypatch.setattr(pp, "SentencePieceTokenizer", FaultyTokenizer)
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"in\.jsonl:11: cannot encode this line: "
                                         r"RuntimeError: tokenizer exploded$"):
        preprocess(src, tmp_path / "out" / "f", tok.model_file, workers=workers, chunk_lines=3)
    assert outputs(tmp_path / "out") == []


def test_dead_worker_is_an_error_not_a_hang(tok, tmp_path: Path, monkeypatch) -> None:
    import phoenix.data.preprocess as pp

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10))
                   + '{"text": "DIE here"}\n')
    monkeypatch.setattr(pp, "SentencePieceTokenizer", FaultyTokenizer)
    (tmp_path / "out").mkdir()
    with pytest.raises(WorkerDiedError, match=r"worker process died .*in\.jsonl lines \d+-\d+"):
        preprocess(src, tmp_path / "out" / "f", tok.model_file, workers=2, chunk_lines=3)
    assert outputs(tmp_path / "out") == []


def test_cli_truncated_and_fake_gzip_are_one_line(corpora, tok, tmp_path: Path) -> None:
    """The issue's case, as a real ``phoenix preprocess --workers 2``: exit 2, one line
    naming the file (and how far it was read), no traceback, no output files."""
    bad = _bad_inputs(tmp_path, corpora["code"])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    (tmp_path / "out").mkdir()
    for name in ("truncated.jsonl.gz", "plain.jsonl.gz"):
        path, pattern = bad[name]
        cmd = [sys.executable, "-m", "phoenix.cli", "preprocess", "--input", str(corpora["web"]),
               str(path), "--output-prefix", str(tmp_path / "out" / "o"), "--tokenizer-model",
               tok.model_file, "--workers", "2", "--no-progress"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert re.search(f"^phoenix preprocess: error: {re.escape(str(path))}: {pattern}", res.stderr)
        assert outputs(tmp_path / "out") == []


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


def test_cli_refuses_a_mostly_malformed_file(tok, tmp_path: Path) -> None:
    """Issue 23: half a file dropped used to exit 0. Above --max-skipped-fraction (default
    0.01) it is one line, exit 2 and nothing published; raising the limit keeps the rest."""
    from phoenix.cli import main as phoenix

    src = tmp_path / "half.jsonl"
    src.write_text("".join('{"text": "good %d"}\n{"txt": "bad"}\n' % i for i in range(50)))
    out = tmp_path / "half"
    args = ["--input", str(src), "--output-prefix", str(out), "--tokenizer-model",
            tok.model_file, "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "phoenix.cli", "preprocess", *args],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"phoenix preprocess: error: 50 of 100 input lines (50.0%) are malformed, "
                    f"more than --max-skipped-fraction 0.01 allows (first: {src}:2: missing "
                    f"key 'text'); nothing written to {out}.*")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.jsonl"]
    assert phoenix(["preprocess", *args, "--max-skipped-fraction", "0.5"]) == 0
    assert json.loads(out.with_suffix(".meta.json").read_text())["num_documents"] == 50
