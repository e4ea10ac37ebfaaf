"""``phoenix score-data`` against transformers, the oracle nobody here wrote.

A tiny random Llama-3 (GQA, llama3 RoPE; vocabulary padded for the output layer) is
built with transformers and imported with ``hf-to-phoenix``. Documents of 1 to 63 tokens
(written with megatron's own ``IndexedDatasetBuilder``, in groups) are scored in windows
of 16 tokens, 8 apart; the reference feeds transformers the same windows, computed here
independently, and takes the log-softmax itself. One process, two (DP=2) and two (TP=2,
the vocabulary split with padding on the second rank) give the same arrays; the ``--keep``
prefix is read back with megatron's ``IndexedDataset``."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LENGTHS = [1, 2, 5, 16, 17, 40, 63, 9, 30, 3, 50, 12]
GROUPS = [0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6]
SEQ, STRIDE, MIN_K, KEEP = 16, 8, 20.0, 0.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from phoenix.convert.hf_import import hf_to_phoenix
    from phoenix.testing.hf_tiny import make_llama3_model, make_llama3_tokenizer

    root = tmp_path_factory.mktemp("score_data")
    texts = [f"the quick brown fox {i} jumps over {i * 7} lazy dogs" for i in range(200)]
    tok_dir = make_llama3_tokenizer(root / "hf", texts, vocab_size=300)
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 8
    make_llama3_model(root / "hf", vocab, max_positions=64)
    hf_to_phoenix(str(root / "hf"), str(root / "px"), progress=False)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, n) for n in LENGTHS]
    prefix = str(root / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    np.save(prefix + ".groups.npy", np.asarray(GROUPS, dtype=np.int64))
    return root, prefix, docs


_REFERENCE = """
import json, sys
import numpy as np, torch, transformers
folder, docs_file, seq, stride = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
out = []
for tokens in np.load(docs_file).values():
    n, loss, j = len(tokens), {}, 0
    while len(loss) < n - 1:  # window j: tokens [j * stride, j * stride + seq)
        s = j * stride
        ids = torch.as_tensor(tokens[s:s + seq], dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
        for i in range(ids.size(1)):
            t = s + i + 1  # the token output position i predicts; scored once, first time
            if t < n and t not in loss:
                loss[t] = -logp[i, int(tokens[t])].item()
        j += 1
    out.append([loss[t] for t in range(1, n)])
print(json.dumps(out))
"""


def _reference(root, docs) -> list[np.ndarray]:
    """Per document, the per-token losses transformers gives on the same windows, in a
    fresh interpreter: phoenix's CPU emulation of CUDA (entered by the in-process
    ``hf-to-phoenix`` and by every gloo rank) must not touch the oracle."""
    import subprocess
    import sys

    np.savez(root / "docs.npz", *docs)
    run = subprocess.run([sys.executable, "-c", _REFERENCE, str(root / "hf"), str(root / "docs.npz"),
                          str(SEQ), str(STRIDE)], capture_output=True, text=True, check=True)
    return [np.asarray(x, dtype=np.float64) for x in json.loads(run.stdout.strip().splitlines()[-1])]


def _cli(argv):
    from phoenix.cli.score_data import main

    return main([str(a) for a in argv])


def _args(root, prefix, out, *extra):
    return [root / "px", prefix, "--out", out, "--seq-length", SEQ, "--stride", STRIDE,
            "--micro-batch-size", 3, "--min-k", MIN_K, *extra]


@pytest.mark.slow
def test_scores_match_transformers_at_one_and_two_processes(setup):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from phoenix.testing.distributed import run_distributed

    root, prefix, docs = setup
    one, two = root / "one" / "scores", root / "two" / "scores"
    assert run_distributed(_cli, 1, _args(root, prefix, one, "--keep", KEEP, "--keep-out",
                                          root / "kept" / "docs")) == [0]
    assert run_distributed(_cli, 2, _args(root, prefix, two)) == [0, 0]
    tp2 = root / "tp2" / "scores"  # vocab 308 padded to 384: TP rank 1 holds 116 real ids
    assert run_distributed(_cli, 2, _args(root, prefix, tp2, "parallel.tensor=2")) == [0, 0]

    ref = _reference(root, docs)
    got = np.load(f"{one}.npz")
    for d, r in enumerate(ref):
        assert got["tokens"][d] == len(r)
        if not len(r):  # a one-token document: nothing to predict
            assert math.isnan(got["loss"][d]) and math.isnan(got["min_k"][d])
            continue
        k = max(1, int(len(r) * MIN_K / 100))
        assert got["loss"][d] == pytest.approx(r.mean(), rel=1e-5), d
        assert got["ppl"][d] == pytest.approx(math.exp(r.mean()), rel=1e-5), d
        assert got["min_k"][d] == pytest.approx(-np.sort(r)[::-1][:k].mean(), rel=1e-5), d
    for other in (two, tp2):
        scores = np.load(f"{other}.npz")
        for name in ("loss", "ppl", "min_k", "tokens"):
            np.testing.assert_allclose(scores[name], got[name], rtol=1e-5, equal_nan=True)
    sidecar = json.loads(open(f"{one}.json").read())
    assert sidecar["settings"] == {"seq_length": SEQ, "stride": STRIDE, "micro_batch_size": 3,
                                   "min_k": MIN_K}
    assert len(sidecar["tokenizer"]["fingerprint"]) > 8 and len(sidecar["checkpoint"]["fingerprint"]) == 16
    assert "dp=2" in json.loads(open(f"{two}.json").read())["layout"]
    assert "tp=2" in json.loads(open(f"{tp2}.json").read())["layout"]

    # --keep 0.5 by group: groups ranked by token-weighted mean loss, best first, until
    # at least 6 of the 12 documents are kept.
    groups = np.asarray(GROUPS)
    gloss = {g: sum(ref[d].sum() for d in np.flatnonzero(groups == g))
             / sum(len(ref[d]) for d in np.flatnonzero(groups == g)) for g in set(GROUPS)}
    kept_groups, count = [], 0
    for g in sorted(gloss, key=lambda g: (gloss[g], g)):
        if count >= math.ceil(KEEP * len(docs)):
            break
        kept_groups.append(g)
        count += int((groups == g).sum())
    kept_docs = [d for d in range(len(docs)) if GROUPS[d] in kept_groups]
    out = IndexedDataset(str(root / "kept" / "docs"), mmap=True)
    assert len(out.document_indices) - 1 == len(kept_docs) and len(kept_docs) < len(docs)
    for i, d in enumerate(kept_docs):
        np.testing.assert_array_equal(out[i], docs[d])
    new_groups = np.load(root / "kept" / "docs.groups.npy")
    _, expected = np.unique(groups[kept_docs], return_inverse=True)
    np.testing.assert_array_equal(new_groups, expected)
    meta = json.loads((root / "kept" / "docs.meta.json").read_text())
    assert meta["num_documents"] == len(kept_docs) and meta["subset"]["by"] == "group"


def test_score_data_refuses_bad_input(setup, tmp_path, capsys):
    root, prefix, _ = setup
    cases = {
        "--keep and --keep-out go together": _args(root, prefix, tmp_path / "s", "--keep", 0.5),
        "--keep 1.5": _args(root, prefix, tmp_path / "s", "--keep", 1.5, "--keep-out", tmp_path / "k"),
        "missing file": _args(root, tmp_path / "nothing", tmp_path / "s"),
        "checkpoint not found": [tmp_path / "nockpt", prefix, "--out", tmp_path / "s"],
        "--stride 40": _args(root, prefix, tmp_path / "s", "--stride", 40),
        "--seq-length 999": _args(root, prefix, tmp_path / "s", "--seq-length", 999),
        "--stride 0": _args(root, prefix, tmp_path / "s", "--stride", 0),  # not "the default"
        "--seq-length 0": _args(root, prefix, tmp_path / "s", "--seq-length", 0),
    }
    for message, argv in cases.items():
        assert _cli(argv) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_windows_score_every_token_once():
    from phoenix.eval.score_data import windows

    assert windows(40, 16, 8) == [(0, 16, 0), (8, 16, 8), (16, 16, 8), (24, 15, 8)]
    assert windows(1, 16, 8) == [] and windows(17, 16, 8) == [(0, 16, 0)]
    for n, seq, stride in ((100, 16, 5), (33, 8, 8), (7, 4, 1)):
        scored = [start + i + 1 for start, length, first in windows(n, seq, stride)
                  for i in range(first, length)]
        assert scored == list(range(1, n)) and all(length <= seq for _, length, _ in windows(n, seq, stride))


def test_keep_mask_by_document_and_by_group():
    from phoenix.eval.score_data import keep_mask

    loss = np.array([3.0, 1.0, np.nan, 2.0, 5.0, 4.0])
    tokens = np.array([10, 10, 0, 10, 10, 10])
    # by document: the 3 lowest losses, the unscored document counted among the kept
    assert keep_mask(loss, tokens, 0.5).tolist() == [False, True, True, True, False, False]
    # by group: {0, 1} mean 2.0 (token-weighted), {2} unscored, {3, 4, 5} mean 11/3
    groups = np.array([0, 0, 1, 2, 2, 2])
    assert keep_mask(loss, tokens, 0.5, groups).tolist() == [True, True, True, False, False, False]
    assert keep_mask(loss, tokens, 0.51, groups).all()


def test_compare_hf_folder_with_its_import(setup, tmp_path, capsys):
    """A Hugging Face folder is imported on the fly: against its own import nothing moved."""
    import csv

    from phoenix.cli.compare_checkpoints import main

    root, _, _ = setup
    assert main([str(root / "hf"), str(root / "px"), "--out", str(tmp_path / "cmp")]) == 0
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["state"] for r in rows} == {"weight"} and len(rows) > 10
    assert all(float(r["delta"]) == 0.0 and float(r["cosine"]) == pytest.approx(1.0) for r in rows)
