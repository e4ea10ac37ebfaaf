"""Bad inputs stop a run with an error naming what is wrong and where, before any model is built.

Uses the session's tiny data (``tiny_data``); everything that is damaged is a copy in
``tmp_path``. No training runs: the one CLI test fails in ``check_inputs``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from phoenix.checkpoint import CheckpointError, find_latest
from phoenix.checkpoint.store import STATE_FILE, resolve_checkpoint
from phoenix.config import ConfigError, build_config
from phoenix.data.indexed import DataError, check_prefix, read_meta
from phoenix.testing.tiny import tiny_config, tiny_config_dict

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.filterwarnings("ignore:Transformer Engine and Apex:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def check_inputs(cfg):
    from phoenix.train.trainer import check_inputs as _check_inputs

    return _check_inputs(cfg)


def copy_prefix(prefix: str, dest_dir: Path, name: str | None = None) -> str:
    """Copy ``prefix.{bin,idx,meta.json}`` into ``dest_dir``; return the new prefix."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    new = str(dest_dir / (name or Path(prefix).name))
    for suffix in (".bin", ".idx", ".meta.json"):
        if os.path.exists(prefix + suffix):
            shutil.copy(prefix + suffix, new + suffix)
    return new


def dict_with_datasets(tiny_data, out_dir, *prefixes) -> dict:
    # (tiny_config_dict's first parameter is called ``data``, so the data section is set here)
    cfg = tiny_config_dict(tiny_data, out_dir)
    cfg["data"]["datasets"] = [{"prefix": p, "weight": 1.0, "name": f"d{i}"}
                               for i, p in enumerate(prefixes)]
    return cfg


def with_datasets(tiny_data, tmp_path, *prefixes):
    return build_config(dict_with_datasets(tiny_data, tmp_path / "run", *prefixes))


def test_tiny_inputs_are_fine(tiny_data, tmp_path):
    tokenizer = check_inputs(tiny_config(tiny_data, tmp_path / "run"))
    assert tokenizer.vocab_size == 512
    facts = check_prefix(tiny_data.prefixes["web"])
    assert facts["num_sequences"] > 0 and facts["num_tokens"] > 0


# -- data prefixes ------------------------------------------------------------------------

def test_missing_prefix(tiny_data, tmp_path):
    missing = str(tmp_path / "nowhere" / "web")
    cfg = with_datasets(tiny_data, tmp_path, tiny_data.prefixes["code"], missing)
    with pytest.raises(DataError, match=re.escape(f"data prefix '{missing}': missing file {missing}.idx")):
        check_inputs(cfg)


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_missing_bin_or_idx(tiny_data, tmp_path, suffix):
    prefix = copy_prefix(tiny_data.prefixes["web"], tmp_path / "data")
    os.remove(prefix + suffix)
    cfg = with_datasets(tiny_data, tmp_path, prefix)
    with pytest.raises(DataError, match=re.escape(f"missing file {prefix}{suffix}")):
        check_inputs(cfg)


def test_bin_swapped_with_another_dataset(tiny_data, tmp_path):
    prefix = copy_prefix(tiny_data.prefixes["web"], tmp_path / "data")
    shutil.copy(tiny_data.prefixes["code"] + ".bin", prefix + ".bin")
    with pytest.raises(DataError) as e:
        check_prefix(prefix)
    msg = str(e.value)
    assert f"{prefix}.bin" in msg and f"{prefix}.idx" in msg
    assert "does not belong to this .bin" in msg
    # and through check_inputs, as a run would see it
    with pytest.raises(DataError, match=re.escape(f"{prefix}.bin has")):
        check_inputs(with_datasets(tiny_data, tmp_path, prefix))


def test_truncated_bin(tiny_data, tmp_path):
    prefix = copy_prefix(tiny_data.prefixes["web"], tmp_path / "data")
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(DataError, match=re.escape(
            f"{prefix}.bin has {size - 2} bytes but {prefix}.idx describes {size} bytes")):
        check_prefix(prefix)


def test_idx_from_another_dataset(tiny_data, tmp_path):
    prefix = copy_prefix(tiny_data.prefixes["web"], tmp_path / "data")
    shutil.copy(tiny_data.prefixes["code"] + ".idx", prefix + ".idx")
    with pytest.raises(DataError, match=re.escape(f"{prefix}.bin has")) as e:
        check_prefix(prefix)
    assert f"{prefix}.idx describes" in str(e.value)


def test_corrupt_idx(tiny_data, tmp_path):
    prefix = copy_prefix(tiny_data.prefixes["web"], tmp_path / "data")
    Path(prefix + ".idx").write_bytes(b"this is not an index" * 4)
    with pytest.raises(DataError, match=re.escape(f"data prefix '{prefix}': cannot read {prefix}.idx")):
        check_prefix(prefix)


def test_corrupt_idx_is_one_line_without_megatrons_del_error(tiny_data, tmp_path):
    """Issue 23: the half-built IndexedDataset's __del__ printed an AttributeError after
    the message, the last thing on screen. Now: the one line, saying how to fix it."""
    import subprocess
    import sys

    prefix = copy_prefix(tiny_data.prefixes["web"], tmp_path / "data")
    Path(prefix + ".idx").write_bytes(b"this is not an index" * 4)
    script = ("import gc, sys\n"
              "from phoenix.data.indexed import DataError, check_prefix\n"
              "try:\n    check_prefix(sys.argv[1])\n"
              "except DataError as e:\n    print(e, file=sys.stderr)\n"
              "gc.collect()\n")
    proc = subprocess.run([sys.executable, "-c", script, prefix], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines()
             if "Transformer Engine" not in line and "warn" not in line.lower()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"data prefix '{prefix}': cannot read {prefix}.idx: ")
    assert lines[0].endswith("; rebuild it with phoenix preprocess")


def test_idx_document_index_must_cut_the_sequences_into_documents(tmp_path):
    """Written with megatron-core's builder: a sequence after the last end_document
    (megatron's reader asserts; the message says which check failed), and a document
    index that runs backwards (megatron does not check; phoenix does)."""
    import numpy as np
    import torch

    from phoenix.data.indexed import indexed_dataset_module

    idx = indexed_dataset_module()

    def build(name, document_indices=None):
        prefix = str(tmp_path / name)
        builder = idx.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for sentence in ([5, 6, 7], [8, 9], [10, 2]):
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
        builder.add_item(torch.tensor([11, 12, 2]))
        if document_indices is not None:
            builder.end_document()
            builder.document_indices = document_indices
        builder.finalize(prefix + ".idx")
        return prefix

    prefix = build("open")  # no end_document after the last sequence
    with pytest.raises(DataError, match=re.escape(f"cannot read {prefix}.idx: AssertionError in ") +
                       r"indexed_dataset\.py:\d+: assert .*document_indices\[-1\]"):
        check_prefix(prefix)
    prefix = build("backwards", [0, 3, 1, 4])
    with pytest.raises(DataError, match=re.escape(
            f"data prefix '{prefix}': {prefix}.idx has an inconsistent document index (it must run "
            f"from sequence 0 to all 4 sequences, never backwards)")):
        check_prefix(prefix)
    assert check_prefix(build("fine", [0, 3, 4]))["num_documents"] == 2


def test_meta_json_not_json(tiny_data, tmp_path):
    prefix = copy_prefix(tiny_data.prefixes["web"], tmp_path / "data")
    Path(prefix + ".meta.json").write_text("{not json")
    with pytest.raises(DataError, match=re.escape(f"{prefix}.meta.json is not valid JSON")):
        check_inputs(with_datasets(tiny_data, tmp_path, prefix))


# -- tokenizer ----------------------------------------------------------------------------

def test_tokenizer_larger_than_model_vocab(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", model={"preset": "tiny", "vocab_size": 100})
    with pytest.raises(ConfigError, match=re.escape(
            f"model.vocab_size: the tokenizer {tiny_data.tokenizer_model} has 512 tokens, "
            f"more than the model's vocab_size 100")):
        check_inputs(cfg)
    # equal (or larger, e.g. padded) model vocab is fine
    check_inputs(tiny_config(tiny_data, tmp_path / "run", model={"preset": "tiny", "vocab_size": 512}))


def test_missing_tokenizer_model(tiny_data, tmp_path):
    missing = str(tmp_path / "nope" / "tokenizer.model")
    cfg = tiny_config(tiny_data, tmp_path / "run", tokenizer={"model": missing})
    with pytest.raises(ConfigError, match=re.escape(f"tokenizer.model: tokenizer model not found: {missing}")):
        check_inputs(cfg)


def test_unreadable_tokenizer_model(tiny_data, tmp_path):
    vocab = str(Path(tiny_data.tokenizer_model).with_suffix(".vocab"))
    assert os.path.isfile(vocab)
    cfg = tiny_config(tiny_data, tmp_path / "run", tokenizer={"model": vocab})
    with pytest.raises(ConfigError, match=re.escape("tokenizer.model") + ".*" + re.escape(vocab)):
        check_inputs(cfg)


def test_data_from_a_different_tokenizer(tiny_data, tmp_path):
    prefix = copy_prefix(tiny_data.prefixes["code"], tmp_path / "data")
    meta = read_meta(prefix)
    assert meta["tokenizer_fingerprint"]
    check_inputs(with_datasets(tiny_data, tmp_path, prefix))  # the untouched copy is fine
    meta["tokenizer_fingerprint"] = "0" * 64
    Path(prefix + ".meta.json").write_text(json.dumps(meta))
    cfg = with_datasets(tiny_data, tmp_path, tiny_data.prefixes["web"], prefix)
    with pytest.raises(ConfigError, match=re.escape(
            f"data.datasets[1]: '{prefix}' was tokenised with a different tokenizer than "
            f"tokenizer.model {tiny_data.tokenizer_model}")):
        check_inputs(cfg)


def _without_meta(tiny_data, dest: Path, bad_every: int = 0) -> str:
    """A copy of the web prefix as another builder leaves it (no .meta.json); with
    ``bad_every``, every that-many-th token is id 700 (outside the 512-id vocabulary)."""
    import numpy as np

    prefix = copy_prefix(tiny_data.prefixes["web"], dest)
    os.remove(prefix + ".meta.json")
    if bad_every:
        tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
        tokens[::bad_every] = 700
        tokens.flush()
    return prefix


def test_data_without_meta_warns_once_per_prefix(tiny_data, tmp_path, trainer_without_model, caplog):
    """The tokenizer of data without a fingerprint cannot be checked: said once per
    dataset, at set-up (from build_source, which the trainer calls), naming the prefix."""
    bare = _without_meta(tiny_data, tmp_path / "data")
    no_fingerprint = copy_prefix(tiny_data.prefixes["code"], tmp_path / "data")
    meta = read_meta(no_fingerprint)
    del meta["tokenizer_fingerprint"]
    Path(no_fingerprint + ".meta.json").write_text(json.dumps(meta))
    cfg = with_datasets(tiny_data, tmp_path, bare, tiny_data.prefixes["math"], no_fingerprint)
    with caplog.at_level("WARNING", logger="phoenix.data.plan_cache"), pytest.raises(ModelBuilt):
        trainer_without_model(cfg).setup()
    warned = [r.getMessage() for r in caplog.records if "cannot be checked" in r.getMessage()]
    assert warned == [
        f"data prefix '{bare}': no {bare}.meta.json (not written by phoenix preprocess), so its "
        f"tokenizer cannot be checked against tokenizer.model {tiny_data.tokenizer_model}; only "
        f"its token ids are checked, as samples are read",
        f"data prefix '{no_fingerprint}': no tokenizer_fingerprint in {no_fingerprint}.meta.json "
        f"(not written by phoenix preprocess), so its tokenizer cannot be checked against "
        f"tokenizer.model {tiny_data.tokenizer_model}; only its token ids are checked, as "
        f"samples are read"]


# -- checkpoints --------------------------------------------------------------------------

def make_ckpt(path: Path, complete: bool = True, state: bool = True, metadata: bool = True) -> Path:
    path.mkdir(parents=True)
    if complete or state:
        (path / STATE_FILE).write_bytes(b"state")
    if complete or metadata:
        (path / "metadata.json").write_text("{}")
    return path


def test_init_from_missing_directory(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint not found: {missing}")):
        resolve_checkpoint(missing)


@pytest.mark.parametrize("layout,point_at", [
    (layout, point_at)
    for layout in ("empty_step", "only_tmp", "state_only", "metadata_only")
    for point_at in ("run", "checkpoints", "step")
    if (layout, point_at) != ("only_tmp", "step")  # naming a .tmp-* dir explicitly is not covered
])
def test_init_from_without_complete_checkpoint(tmp_path, layout, point_at):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    if layout == "empty_step":
        step = ckpts / "step_000003"
        step.mkdir(parents=True)
    elif layout == "only_tmp":
        make_ckpt(ckpts / ".tmp-step_000003")  # complete files, but never renamed
        step = ckpts / ".tmp-step_000003"
    elif layout == "state_only":
        step = make_ckpt(ckpts / "step_000003", complete=False, metadata=False)
    else:
        step = make_ckpt(ckpts / "step_000003", complete=False, state=False)
    target = {"run": run, "checkpoints": ckpts, "step": step}[point_at]
    with pytest.raises(CheckpointError, match=re.escape(f"no complete checkpoint in {target}")) as e:
        resolve_checkpoint(target)
    assert STATE_FILE in str(e.value) and "metadata.json" in str(e.value)


def test_resolve_checkpoint_finds_complete_ones(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    make_ckpt(ckpts / "step_000002")
    make_ckpt(ckpts / "step_000004")
    (ckpts / "step_000006").mkdir()
    assert resolve_checkpoint(tmp_path / "run") == ckpts / "step_000004"
    assert resolve_checkpoint(ckpts) == ckpts / "step_000004"
    assert resolve_checkpoint(ckpts / "step_000002") == ckpts / "step_000002"


def test_find_latest_ignores_incomplete_and_tmp(tmp_path):
    root = tmp_path / "checkpoints"
    assert find_latest(root) is None  # missing directory
    root.mkdir()
    assert find_latest(root) is None  # empty directory
    make_ckpt(root / "step_000002")
    make_ckpt(root / ".tmp-step_000009")                          # unfinished save
    make_ckpt(root / "step_000008", complete=False, metadata=False)  # no metadata.json
    make_ckpt(root / "step_000007", complete=False, state=False)     # no phoenix_state.pt
    (root / "step_000006").mkdir()                                 # empty
    make_ckpt(root / "step_5")                                     # not a step_NNNNNN name
    make_ckpt(root / "backup_step_000010")
    (root / "step_000011").write_text("a file, not a directory")
    (root / "latest").write_text("step_000009\n")                 # latest file is not trusted
    assert find_latest(root) == root / "step_000002"
    make_ckpt(root / "step_000003")
    assert find_latest(root) == root / "step_000003"


def test_find_latest_orders_numerically(tmp_path):
    make_ckpt(tmp_path / "step_999999")
    make_ckpt(tmp_path / "step_1000000")
    assert find_latest(tmp_path) == tmp_path / "step_1000000"


# -- the trainer fails before building the model -------------------------------------------

class ModelBuilt(Exception):
    pass


@pytest.fixture
def trainer_without_model(monkeypatch):
    """A Trainer whose setup() raises ModelBuilt where it would build the model."""
    import phoenix.train.trainer as trainer_mod

    def no_model(*args, **kwargs):
        raise ModelBuilt("setup reached build_model")

    monkeypatch.setattr(trainer_mod, "build_model", no_model)
    monkeypatch.setattr(trainer_mod.dist, "barrier", lambda *a, **k: None)
    # A world of one: rank 0's word on the data plan needs no broadcast.
    monkeypatch.setattr(trainer_mod.dist, "broadcast_object_list", lambda *a, **k: None)
    layout = types.SimpleNamespace(rank=0, world_size=1, describe=lambda: "fake layout")
    return lambda cfg: trainer_mod.Trainer(cfg, layout, callbacks=[])


def test_setup_checks_data_before_model(tiny_data, tmp_path, trainer_without_model):
    missing = str(tmp_path / "nowhere" / "web")
    cfg = with_datasets(tiny_data, tmp_path, missing)
    with pytest.raises(DataError, match=re.escape(f"missing file {missing}.idx")):
        trainer_without_model(cfg).setup()
    assert not (tmp_path / "run" / "config.yaml").exists()
    # with good inputs the same harness does get to the model (so the check above can fail)
    with pytest.raises(ModelBuilt):
        trainer_without_model(tiny_config(tiny_data, tmp_path / "run")).setup()


@pytest.mark.parametrize("kind", ["missing", "empty_step"])
def test_setup_checks_init_from_before_model(tiny_data, tmp_path, trainer_without_model, kind):
    source = tmp_path / "other_run"
    if kind == "empty_step":
        (source / "checkpoints" / "step_000003").mkdir(parents=True)
    cfg = tiny_config(tiny_data, tmp_path / "run", checkpoint={"init_from": str(source)})
    with pytest.raises(CheckpointError, match=re.escape(str(source))):
        trainer_without_model(cfg).setup()


# -- the CLI ------------------------------------------------------------------------------

def _start_train_cli(recipe_data: dict, tmp_path, **extra_env) -> subprocess.Popen:
    """Start `python -m phoenix.train RECIPE train.steps=3` as a single process (3: longer
    than the tiny config's 2-step warmup, which a shorter run refuses)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra_env)
    return subprocess.Popen([sys.executable, "-m", "phoenix.train", str(recipe), "train.steps=3"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def cli_runs(tiny_data, tmp_path_factory):
    """Start both CLI runs together (each pays the torch/megatron import), then collect
    them: ``{name: (process, stdout + stderr, its directory)}``."""
    missing_dir = tmp_path_factory.mktemp("cli_missing")
    missing = dict_with_datasets(tiny_data, missing_dir / "run", str(missing_dir / "nowhere" / "web"))
    plan_dir = tmp_path_factory.mktemp("cli_plan_error")
    grouped = dict_with_datasets(tiny_data, plan_dir / "run", tiny_data.prefixes["web"])
    grouped["data"]["datasets"][0]["group_mode"] = "batch"  # web was preprocessed without groups
    bad_dir = tmp_path_factory.mktemp("cli_bad_token")
    bad_token = dict_with_datasets(tiny_data, bad_dir / "run",
                                   _without_meta(tiny_data, bad_dir / "data", bad_every=7))
    bad_token["data"]["prefetch_batches"] = 2  # read in the prefetch thread
    cuda_dir = tmp_path_factory.mktemp("cli_cuda")
    cuda = dict_with_datasets(tiny_data, cuda_dir / "run", tiny_data.prefixes["web"])
    cuda["runtime"] = {"device": "cuda"}
    procs = {"missing": (_start_train_cli(missing, missing_dir), missing_dir),
             "cuda_without_gpu": (_start_train_cli(cuda, cuda_dir, CUDA_VISIBLE_DEVICES=""),
                                  cuda_dir),
             "plan_error": (_start_train_cli(grouped, plan_dir), plan_dir),
             "bad_token": (_start_train_cli(bad_token, bad_dir), bad_dir)}
    results = {}
    for name, (proc, directory) in procs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = (proc, out + err, directory)
    return results


def test_cli_missing_data_prefix(cli_runs):
    proc, output, tmp_path = cli_runs["missing"]
    missing = str(tmp_path / "nowhere" / "web")
    out_dir = tmp_path / "run"
    assert proc.returncode != 0, output
    assert f"missing file {missing}.idx" in output
    assert not (out_dir / "config.yaml").exists()  # stopped before the run directory was set up


def test_cli_cuda_without_a_gpu_is_one_line(cli_runs):
    """runtime.device=cuda where no GPU is visible: exit 2 with one line that names the
    key and the fix, before any process group or run directory (no traceback)."""
    proc, output, tmp_path = cli_runs["cuda_without_gpu"]
    assert proc.returncode == 2, output
    lines = [line for line in output.splitlines() if line.startswith("phoenix:")]
    assert lines == ["phoenix: config error: runtime.device: 'cuda' but no GPU is visible to this "
                     "process (CUDA_VISIBLE_DEVICES, driver); set runtime.device=cpu to run on the "
                     "CPU"], output
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()


def test_cli_plan_error_stops_before_the_model(cli_runs):
    """A data input error found while building the plan (here: group_mode on a dataset
    preprocessed without --group-key) exits 2 with the file named, no traceback."""
    proc, output, _ = cli_runs["plan_error"]
    assert proc.returncode == 2, output
    assert "group_mode needs" in output and ".groups.npy" in output
    assert "Traceback" not in output


def test_cli_token_id_outside_the_vocabulary(cli_runs):
    """Data without .meta.json whose ids exceed the vocabulary: the warning at start-up,
    then exit 2 with one DataError line naming the dataset and sample (read in the
    prefetch thread), not an IndexError from the embedding at step 1."""
    proc, output, tmp_path = cli_runs["bad_token"]
    prefix = str(tmp_path / "data" / "web")
    assert proc.returncode == 2, output
    assert f"data prefix '{prefix}': no {prefix}.meta.json" in output
    assert re.search(rf"^phoenix: DataError: dataset 'd0' \({re.escape(prefix)}\): sample \d+ holds "
                     rf"token id 700, outside the vocabulary \[0, 512\) \(document \d+, token \d+ "
                     rf"of {re.escape(prefix)}\.bin\)", output, re.M), output
    assert "Traceback" not in output and "IndexError" not in output
