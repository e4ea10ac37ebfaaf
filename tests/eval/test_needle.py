"""Needle in a haystack: prompt construction, scoring proven with stub models, the
megatron greedy decoding (against a plain argmax, and TP=2 against one process), the
TensorBoard tags and heatmap during training, ``phoenix eval --needle`` and config errors."""

import json
import math

import numpy as np
import pytest

from phoenix.config import ConfigError
from phoenix.config.eval import EvalConfig, NeedleConfig
from phoenix.config.typed import from_dict
from phoenix.eval.needle import (
    NEEDLE_TEXT,
    NeedleResult,
    build_needle_tasks,
    default_lengths,
    extract_answer,
    format_needle_table,
    haystack_tokens_needed,
    read_haystack,
    score,
)
from phoenix.monitor.tensorboard import tensorboard_dir
from phoenix.testing.distributed import run_distributed
from phoenix.testing.needle import copy_passkey_fn, needle_greedy
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_with_eval

LENGTHS, DEPTHS, TRIALS = [96, 128], [0.0, 0.5, 1.0], 2


@pytest.fixture(scope="module")
def tok(tiny_data):
    from phoenix.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(tiny_data.tokenizer_model)


def _needle(tiny_data, **kw) -> NeedleConfig:
    return NeedleConfig(**{"haystack_prefix": tiny_data.prefixes["web"], "lengths": LENGTHS,
                           "depths": DEPTHS, "trials": TRIALS, **kw})


def _tasks(tok, cfg):
    hay = read_haystack(cfg.haystack_prefix, haystack_tokens_needed(cfg.lengths or [256]),
                        [tok.eod_id])
    return build_needle_tasks(tok, hay, cfg, 128)


def _find(seq, sub) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


# -- (a) prompts ---------------------------------------------------------------------
def test_tasks_place_one_needle_at_the_depth(tok, tiny_data):
    cfg = _needle(tiny_data, depths=[0.0, 0.25, 0.5, 0.75, 1.0], trials=3)
    tasks = _tasks(tok, cfg)
    assert len(tasks) == len(LENGTHS) * 5 * 3
    assert [t.length for t in tasks] == sorted(t.length for t in tasks)  # length-major
    question = tok.encode("What is the pass key? The pass key is")
    for t in tasks:
        needle = tok.encode(NEEDLE_TEXT.format(key=t.passkey))
        assert len(t.passkey) == cfg.digits and t.passkey[0] != "0"
        assert len(t.input_ids) + cfg.new_tokens == t.length  # the answer fits the length
        assert _find(t.input_ids, needle) == [t.needle_pos]  # exactly once, intact
        assert abs(t.needle_pos - t.depth * t.filler_len) <= 1
        assert t.input_ids[-len(question):] == question
        assert t.filler_len == t.length - cfg.new_tokens - len(needle) - len(question)
        text = tok.decode(t.input_ids)
        assert text.count(t.passkey) == 2  # twice in the needle, nowhere else
        assert tok.eod_id not in t.input_ids
    at_end = [t for t in tasks if t.depth == 1.0]
    assert all(t.input_ids[t.needle_pos + t.needle_len:][:len(question)] == question
               for t in at_end)
    assert all(t.needle_pos == 0 for t in tasks if t.depth == 0.0)
    # Deterministic; trials differ (passkey and filler).
    again = _tasks(tok, cfg)
    assert [(t.input_ids, t.passkey) for t in again] == [(t.input_ids, t.passkey) for t in tasks]
    cell = [t for t in tasks if t.length == 128 and t.depth == 0.5]
    assert len({t.passkey for t in cell}) == 3
    assert len({tuple(t.input_ids) for t in cell}) == 3
    other_seed = _tasks(tok, _needle(tiny_data, depths=[0.0, 0.25, 0.5, 0.75, 1.0], trials=3,
                                     seed=7))
    assert [t.passkey for t in other_seed] != [t.passkey for t in tasks]


def test_short_haystack_wraps_and_short_length_is_refused(tok, tiny_data):
    cfg = _needle(tiny_data, lengths=[128], depths=[0.5], trials=2)
    hay = np.arange(300, 310)  # 10 filler tokens: wrapped around
    tasks = build_needle_tasks(tok, hay, cfg, 128)
    for t in tasks:
        filler = t.input_ids[:t.needle_pos] + t.input_ids[t.needle_pos + t.needle_len:][:t.filler_len - t.needle_pos]
        assert len(filler) == t.filler_len and set(filler) <= set(range(300, 310))
        assert len(t.input_ids) + cfg.new_tokens == 128
    with pytest.raises(ConfigError, match=r"eval\.needle\.lengths: 64 tokens cannot hold"):
        build_needle_tasks(tok, hay, _needle(tiny_data, lengths=[64]), 64)


def test_default_lengths():
    assert default_lengths(4096) == [1024, 2048, 4096]
    assert default_lengths(3000) == [1024, 2048, 3000]
    assert default_lengths(1024) == [1024]
    assert default_lengths(512) == [512]


# -- (b) scoring -----------------------------------------------------------------------
def test_extract_answer():
    assert extract_answer(" 48291. Remember") == "48291"
    assert extract_answer("is 4829 1") == "4829"
    assert extract_answer("no digits") is None
    assert extract_answer("") is None


def test_copying_model_scores_one_everywhere(tok, tiny_data):
    tasks = _tasks(tok, _needle(tiny_data))
    result = score(tasks, copy_passkey_fn(tok), tok.decode, batch_size=3)
    assert result.lengths == LENGTHS and result.depths == DEPTHS
    assert np.array_equal(result.matrix, np.ones((3, 2)))
    assert result.counts.tolist() == [[TRIALS] * 2] * 3
    assert result.scalars() == {"96": 1.0, "128": 1.0, "mean": 1.0}
    assert len(result.answers) == len(tasks)


def test_wrong_answers_give_the_expected_matrix(tok, tiny_data):
    tasks = _tasks(tok, _needle(tiny_data))
    by_prompt = {tuple(t.input_ids): t for t in tasks}

    def answers(batch):  # right except: depth 0.5 always wrong, depth 1.0 trial 1 wrong,
        out = []          # and length 128 depth 0 answers with an extra digit
        for ids in batch:
            t = by_prompt[tuple(ids)]
            key = t.passkey
            if t.depth == 0.5 or (t.depth == 1.0 and t.trial == 1):
                key = str(int(key) + 1)
            if t.length == 128 and t.depth == 0.0:
                key = key + "7"
            out.append(tok.encode(f" {key}. Remember it, 12345 again"))
        return out

    result = score(tasks, answers, tok.decode, batch_size=4)
    expected = np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    assert np.array_equal(result.matrix, expected)
    assert result.accuracy_by_length() == {96: 3 / 6, 128: 1 / 6}
    assert math.isclose(result.mean, 4 / 12)
    table = format_needle_table(result)
    assert "0.500" in table and "mean 0.3333 (4/12)" in table
    back = NeedleResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert np.array_equal(back.matrix, expected)


def test_answer_format_variants(tok, tiny_data):
    tasks = _tasks(tok, _needle(tiny_data, lengths=[96], depths=[0.5], trials=4))
    variants = {0: "{k}", 1: "{k}0", 2: "pass key: {k} ok", 3: "{short}"}

    def answers(batch):
        out = []
        for ids, t in zip(batch, tasks):
            out.append(tok.encode(variants[t.trial].format(k=t.passkey, short=t.passkey[:-1])))
        return out

    result = score(tasks, answers, tok.decode, batch_size=4)
    assert result.hits.tolist() == [[2]] and result.counts.tolist() == [[4]]
    with pytest.raises(ValueError, match="returned 0 answers"):
        score(tasks, lambda batch: [], tok.decode)


def test_heatmap_png_and_missing_matplotlib(tmp_path, monkeypatch, caplog):
    import sys

    from phoenix.eval import needle_run

    result = NeedleResult([96, 128], [0.0, 1.0], np.array([[1, 0], [2, 1]]), np.array([[2, 2], [2, 2]]))
    path = tmp_path / "needle" / "step_0000004.png"
    image = needle_run.write_heatmap(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert needle_run.heatmap_path(tmp_path, 4) == path

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    monkeypatch.setattr(needle_run, "_warned_no_matplotlib", False)
    with caplog.at_level("WARNING", logger="phoenix.eval"):
        assert needle_run.write_heatmap(result, tmp_path / "x.png") is None
        assert needle_run.write_heatmap(result, tmp_path / "y.png") is None
    assert sum("matplotlib" in r.message for r in caplog.records) == 1
    assert not (tmp_path / "x.png").exists()


# -- (f) config errors -------------------------------------------------------------------
def test_needle_config(tiny_data, tmp_path):
    from phoenix.config import build_config

    cfg = from_dict(EvalConfig, {"needle": {"haystack_prefix": "/d/web"}}, "eval")
    assert cfg.sets == [] and cfg.needle.lengths is None and cfg.needle.trials == 4
    assert cfg.needle.depths == [0.0, 0.25, 0.5, 0.75, 1.0] and cfg.needle.new_tokens == 9
    bad = {
        "eval.sets: at least one eval set is required (or eval.needle)": {},
        "missing required config key 'eval.needle.haystack_prefix'": {"needle": {}},
        "eval.needle.lengths: must not be empty": {"needle": {"haystack_prefix": "a", "lengths": []}},
        "eval.needle.lengths[1]: must be > 0": {"needle": {"haystack_prefix": "a", "lengths": [8, 0]}},
        "eval.needle.lengths: [8, 8] lists a length twice": {"needle": {"haystack_prefix": "a", "lengths": [8, 8]}},
        "eval.needle.depths[0]: must be in [0, 1]": {"needle": {"haystack_prefix": "a", "depths": [1.5]}},
        "eval.needle.trials: must be >= 1": {"needle": {"haystack_prefix": "a", "trials": 0}},
        "eval.needle.digits: must be in [1, 18]": {"needle": {"haystack_prefix": "a", "digits": 0}},
        "eval.needle.answer_tokens: must be >= digits": {"needle": {"haystack_prefix": "a", "answer_tokens": 3}},
        "unknown config key 'eval.needle.lenghts'": {"needle": {"haystack_prefix": "a", "lenghts": [8]}},
        "eval.needle.lengths[0]: expected an integer": {"needle": {"haystack_prefix": "a", "lengths": ["x"]}},
        "eval.sets[0].name: 'needle' is the needle eval's": {"needle": {"haystack_prefix": "a"},
                                                            "sets": [{"prefix": "/d/needle"}]},
    }
    for message, data in bad.items():
        with pytest.raises(ConfigError) as e:
            from_dict(EvalConfig, data, "eval")
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    with pytest.raises(ConfigError, match=r"eval\.needle\.lengths\[0\]: 512 exceeds model\.max_seq_length 256"):
        build_config(tiny_config_dict(tiny_data, tmp_path, eval={"needle": {
            "haystack_prefix": tiny_data.prefixes["web"], "lengths": [512]}}))
    for key in ("pipeline", "context"):  # the message names the key that is wrong
        with pytest.raises(ConfigError, match=rf"^eval\.needle: .*needs parallel\.{key}=1 \(got 2\)"):
            build_config(tiny_config_dict(tiny_data, tmp_path, eval={"needle": {
                "haystack_prefix": tiny_data.prefixes["web"]}}), [f"parallel.{key}=2"])


def test_cli_needle_errors(tiny_data, tmp_path, capsys):
    import yaml

    from phoenix.eval.run import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tmp_path / "run")))
    cases = {("--needle",): "eval.needle.haystack_prefix: not set",
             ("--needle-haystack", tiny_data.prefixes["web"], "--needle-lengths", "96,x"):
                 "--needle-lengths: expected comma-separated numbers",
             ("--needle-haystack", tiny_data.prefixes["web"], "--needle-depths", "2"):
                 "eval.needle.depths[0]: must be in [0, 1]",
             ("--needle-haystack", tiny_data.prefixes["web"], "--needle-lengths", "1024"):
                 "eval.needle.lengths[0]: 1024 exceeds model.max_seq_length 256"}
    for flags, message in cases.items():
        assert main([str(tmp_path / "ckpt"), str(cfg), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)


def test_haystack_input_checks(tiny_data, tok, tmp_path):
    from phoenix.data.indexed import DataError
    from phoenix.eval.inputs import check_eval_inputs

    missing = EvalConfig(needle=NeedleConfig(haystack_prefix=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match=r"^eval\.needle\.haystack_prefix: data prefix .*missing"):
        check_eval_inputs(missing, tok)
    assert check_eval_inputs(EvalConfig(needle=_needle(tiny_data)), tok) == []


# -- (c, d, e) the model: training with the needle eval, phoenix eval --needle ------------
STEPS = 2


@pytest.fixture(scope="module")
def needle_run(tiny_data, tmp_path_factory):
    """One single-process job: 2 steps with the needle eval at every step (TensorBoard on,
    final checkpoint saved), then ``phoenix eval --needle`` on the checkpoint."""
    out = tmp_path_factory.mktemp("needle_run")
    config = tiny_config_dict(tiny_data, out, train={"steps": STEPS}, optim={"warmup_steps": 1},
                              checkpoint={"save_at_end": True},
                              logging={"tensorboard": True, "norm_interval": 0})
    section = {"interval": 1, "micro_batch_size": 2,
               "needle": {"haystack_prefix": tiny_data.prefixes["code"], "lengths": LENGTHS,
                          "depths": DEPTHS, "trials": TRIALS}}
    cli_json = out / "cli" / "needle.json"
    cli = [str(out), str(out / "config.yaml"), "--needle", "--needle-lengths", "96,128",
           "--needle-haystack", tiny_data.prefixes["code"],
           "--needle-trials", "1", "--needle-png", str(out / "cli" / "heat.png"),
           "--out", str(cli_json)]
    (result,) = run_distributed(train_with_eval, 1, config, [], section, False, cli)
    return out, config, result, json.loads(cli_json.read_text())


@pytest.mark.slow
def test_needle_logged_during_training(needle_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, result, _ = needle_run
    assert [step for step, _ in result["needle"]] == [1, 2]
    assert result["evals"] == [(1, {}), (2, {})]  # no sets: the needle eval only
    for _, r in result["needle"]:
        assert r["lengths"] == LENGTHS and r["depths"] == DEPTHS
        assert np.array(r["accuracy"]).shape == (3, 2)
        assert np.array(r["counts"]).tolist() == [[TRIALS] * 2] * 3
        assert all(0.0 <= a <= 1.0 for row in r["accuracy"] for a in row)
        assert 0.0 <= r["mean"] <= 1.0

    acc = EventAccumulator(str(tensorboard_dir(out, "tiny")),
                           size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for key in ("96", "128", "mean"):
        events = acc.Scalars(f"eval/needle/{key}")
        assert [e.step for e in events] == [1, 2], key
        for e, (_, r) in zip(events, result["needle"]):
            want = r["mean"] if key == "mean" else r["by_length"][key]
            assert math.isclose(e.value, want, abs_tol=1e-6), (key, e.value, want)
    images = acc.Images("eval/needle/heatmap")
    assert [e.step for e in images] == [1, 2]
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    for step in (1, 2):
        png = out / "needle" / f"step_{step:07d}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_phoenix_eval_needle_prints_the_table(needle_run):
    out, _, result, report = needle_run
    assert result["cli_rc"] == 0
    stdout = result["cli_stdout"]
    assert "needle accuracy (depth x length)" in stdout
    header = next(line for line in stdout.splitlines() if line.strip().startswith("depth"))
    assert header.split() == ["depth", "96", "128"]
    assert f"needle heatmap: {out / 'cli' / 'heat.png'}" in stdout
    assert (out / "cli" / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    needle = report["needle"]
    assert report["step"] == STEPS and report["sets"] == {}
    assert needle["lengths"] == LENGTHS and needle["counts"] == [[1, 1]] * 5
    # Every prompt: where the needle was, its passkey and what the model answered.
    prompts = needle["prompts"]
    assert len(prompts) == 10
    assert {(p["length"], p["depth"]) for p in prompts} == \
        {(n, d) for n in LENGTHS for d in needle["depths"]}
    for p in prompts:
        assert p["passkey"].isdigit() and isinstance(p["text"], str)
        assert p["hit"] == (p["answer"] == p["passkey"])
    assert sum(p["hit"] for p in prompts) == sum(map(sum, needle["hits"]))


@pytest.mark.slow
def test_greedy_generation_matches_plain_argmax_and_tp2(needle_run, tiny_data):
    """The megatron generate_fn on the trained checkpoint: shapes, ids in the real vocab,
    the same tokens as a plain argmax loop over the full logits, and the same tokens and
    accuracy at TP=2 (vocab-parallel argmax)."""
    out, config, _, _ = needle_run
    needle = {"haystack_prefix": tiny_data.prefixes["web"], "lengths": [96], "depths": [0.0, 1.0],
              "trials": 2}
    (one,) = run_distributed(needle_greedy, 1, config, [], str(out), needle, True)
    gen = one["generated"]
    assert len(gen) == 2 and all(len(g) == one["new_tokens"] == 9 for g in gen)
    assert all(0 <= i < one["vocab"] for g in gen for i in g)
    assert gen == one["reference"]
    assert np.array(one["result"]["accuracy"]).shape == (2, 1)
    assert 0.0 <= one["result"]["mean"] <= 1.0
    for layout in ("parallel.tensor=2", "parallel.tensor=1"):  # TP=2, then DP=2
        two = run_distributed(needle_greedy, 2, config, [layout], str(out), needle)
        assert two[0]["layout"].startswith("world=2 " + ("tp=2" if layout.endswith("2") else "tp=1"))
        for r in two:
            assert r["generated"] == gen
            # DP: each rank scored half of the prompts; the counts are summed over DP.
            assert r["result"]["hits"] == one["result"]["hits"]
            assert r["result"]["counts"] == one["result"]["counts"] == [[2], [2]]


def test_evaluator_lengths_follow_the_stage_and_layout_refusals(tok, tiny_data):
    """Without ``lengths`` the prompts follow the stage's seq_length (too short a stage
    fails when the callback builds its prompts at train start); PP and CP are refused."""
    from types import SimpleNamespace

    import torch

    from phoenix.eval.needle_run import NeedleEvaluator, check_needle_layout

    layout = SimpleNamespace(pp_size=1, tp_size=1, dp_size=1, dp_cp_size=1, dp_rank=0,
                             device=torch.device("cpu"), tp_group=None, dp_group=None)
    cfg = _needle(tiny_data, lengths=None)
    ev = NeedleEvaluator([None], layout, cfg, tok, vocab_size=tok.vocab_size, micro_batch_size=2)
    assert ev.lengths(2048) == [1024, 2048] and ev.lengths(200) == [200]
    assert {t.length for t in ev.tasks(200)} == {200}
    with pytest.raises(ConfigError, match=r"eval\.needle\.lengths: 64 tokens cannot hold"):
        ev.tasks(64)
    assert NeedleEvaluator([None], layout, _needle(tiny_data), tok, vocab_size=tok.vocab_size,
                           micro_batch_size=2).lengths(2048) == LENGTHS
    with pytest.raises(ConfigError, match=r"^eval\.needle: needs one pipeline stage"):
        check_needle_layout(SimpleNamespace(**(vars(layout) | {"pp_size": 2})))
    with pytest.raises(ConfigError, match=r"^eval\.needle: does not run with context"):
        check_needle_layout(SimpleNamespace(**(vars(layout) | {"dp_cp_size": 2})))
