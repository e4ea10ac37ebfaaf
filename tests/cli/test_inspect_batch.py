"""``phoenix inspect-batch``: the documents of a global batch, from the run's data plan alone."""

import json

import numpy as np
import pytest

from phoenix.cli import inspect_batch

STEPS = 4


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    """A run directory as the trainer leaves it (config.yaml + cached plan), no training."""
    from phoenix.config import dump_config
    from phoenix.testing.tiny import tiny_config
    from phoenix.data.plan_cache import run_stage_plans

    out = tmp_path_factory.mktemp("inspect_run")
    cfg = tiny_config(tiny_data, out, train={"steps": STEPS})
    (out / "config.yaml").write_text(dump_config(cfg))
    [(_, plan)] = run_stage_plans(cfg)
    return out, cfg, plan


def _expected(cfg, plan, step):
    """Decode the plan's batch STEP-1 straight from the .bin files."""
    from phoenix.data.samples import build_sample_index
    from phoenix.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(cfg.tokenizer.model)
    out = []
    ds, ss = plan.batch(step - 1)
    for d, s in zip(ds.tolist(), ss.tolist()):
        entry = cfg.data.datasets[d]
        ix = build_sample_index(entry.prefix, cfg.data.seq_length, use_groups=False)
        stream = np.memmap(entry.prefix + ".bin", dtype=np.uint16, mode="r") \
            if tok.vocab_size < 65500 else None
        start, n = int(ix.starts[s]), int(ix.lengths[s])
        ids = stream[start:start + n].tolist()
        parts, cur = [], []
        for t in ids:
            if t == tok.eod_id:
                parts.append(cur)
                cur = []
            else:
                cur.append(t)
        parts.append(cur)
        first = int(np.searchsorted(ix.doc_starts, start, side="right") - 1)
        last = int(np.searchsorted(ix.doc_starts, start + n - 1, side="right") - 1)
        out.append({"dataset": entry.name, "sample_id": s, "documents": list(range(first, last + 1)),
                    "text": inspect_batch.EOD_MARK.join(tok.decode(p) for p in parts),
                    "ids": ids})
    return out


def test_prints_the_batch_of_a_step(run_dir, capsys):
    out, cfg, plan = run_dir
    step = 3
    assert inspect_batch.main([str(out), str(step), "--json", "--chars", "0"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = _expected(cfg, plan, step)
    assert len(shown) == cfg.train.global_batch_size == len(expected)
    for got, want in zip(shown, expected):
        assert (got["dataset"], got["sample_id"], got["document_ids"]) == \
            (want["dataset"], want["sample_id"], want["documents"])
        assert got["text"] == want["text"] and len(got["text"]) > 20
        assert got["token_ids"] == want["ids"] and len(got["token_ids"]) == got["tokens"]
        assert got["step"] == step
    # step STEP is plan batch STEP-1: a neighbouring batch would not match
    assert [s["sample_id"] for s in shown] != [w["sample_id"] for w in _expected(cfg, plan, step + 1)]

    # human-readable form: header with the plan's counts, truncated text
    assert inspect_batch.main([str(out), str(step), "--samples", "2", "--chars", "40"]) == 0
    text = capsys.readouterr().out
    counts = {n: int(plan.counts[step - 1, d]) for d, n in enumerate(plan.names)}
    assert text.startswith(f"step {step} = plan batch {step - 1} of {STEPS} (web {counts['web']}, "
                           f"code {counts['code']})")
    assert text.count("\n[") == 2 and f"sample {expected[1]['sample_id']}" in text
    assert expected[0]["text"][:40] + "..." in text.replace("\n    ", "\n")


@pytest.mark.parametrize("step", [0, STEPS + 1, -1])
def test_step_out_of_range(run_dir, capsys, step):
    out, _, _ = run_dir
    assert inspect_batch.main([str(out), str(step)]) == 2
    err = capsys.readouterr().err
    assert f"step {step} is not in [1, {STEPS}]" in err


def test_missing_run_dir_or_config(tmp_path, capsys):
    assert inspect_batch.main([str(tmp_path / "nope"), "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert inspect_batch.main([str(tmp_path), "1"]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err


def test_sentence_split_data_reports_documents_not_sentences(tiny_data, tmp_path, capsys):
    """Data from Megatron-LM's preprocessing with sentence splitting (one sequence per
    sentence, written by megatron-core's own builder): ``build-plan --dump-batch`` (a real
    process) and ``inspect-batch`` name documents, as the builder was given them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from phoenix.config import build_config, dump_config
    from phoenix.data.samples import build_sample_index
    from phoenix.testing.megatron_data import write_sentence_split
    from phoenix.data.synthetic import write_corpus
    from phoenix.testing.tiny import tiny_config_dict

    write_corpus(tmp_path / "web.jsonl", 80, 21, domain="web", max_words=80)
    split = write_sentence_split(tmp_path / "split", tmp_path / "web.jsonl", tiny_data.tokenizer_model)
    assert split.num_sequences > 3 * len(split.documents)
    data = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 3})
    data["data"].update(datasets=[{"prefix": split.prefix, "weight": 1.0, "name": "split"}],
                        cache_dir=str(tmp_path / "cache"))
    cfg = build_config(data)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump_config(cfg))
    doc_of = split.document_of_token()
    ix = build_sample_index(split.prefix, cfg.data.seq_length, use_groups=False)

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "phoenix.cli", "build-plan",
                          str(tmp_path / "run" / "config.yaml"), "--dump-batch", "1"],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert res.returncode == 0, res.stderr
    rows = res.stdout.split("\nbatch 1 ")[1].splitlines()[1:]
    assert len(rows) == cfg.train.global_batch_size
    for row in rows:
        _, name, sample, group, document = row.split()
        assert (name, group) == ("split", "-1")
        assert int(document) == doc_of[int(ix.starts[int(sample)])] < len(split.documents)

    assert inspect_batch.main([str(tmp_path / "run"), "2", "--json", "--chars", "0"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [s["sample_id"] for s in shown] == [int(r.split()[2]) for r in rows]
    for s in shown:
        start, n = int(ix.starts[s["sample_id"]]), int(ix.lengths[s["sample_id"]])
        assert s["document_ids"] == list(range(doc_of[start], doc_of[start + n - 1] + 1))


def test_token_ids_outside_the_vocabulary_are_shown(tiny_data, tmp_path, capsys):
    """inspect-batch is how one looks at bad data: an id the tokenizer does not have is
    shown as <|bad id N|> rather than failing the decode."""
    import shutil

    from phoenix.config import build_config, dump_config
    from phoenix.testing.tiny import tiny_config_dict

    prefix = str(tmp_path / "web")
    for suffix in (".bin", ".idx"):  # no .meta.json: data from another builder
        shutil.copy(tiny_data.prefixes["web"] + suffix, prefix + suffix)
    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    tokens[::5] = 700
    tokens.flush()
    data = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 3})
    data["data"].update(datasets=[{"prefix": prefix, "weight": 1.0, "name": "web"}],
                        cache_dir=str(tmp_path / "cache"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump_config(build_config(data)))
    assert inspect_batch.main([str(tmp_path / "run"), "1", "--json", "--chars", "0"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for s in shown:
        assert s["text"].count("<|bad id 700|>") >= (s["tokens"] - 1) // 5 > 5
