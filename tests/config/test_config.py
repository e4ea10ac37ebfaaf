"""The typed run config rejects every mistake with a ConfigError that names the dotted key.

Fast: no model, no data, no torch in this process. The CLI tests run
``python -m phoenix.train`` in subprocesses (started together, see ``cli_runs``).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phoenix.config import ConfigError, RunConfig, build_config, dump_config, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
PRESETS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
RECIPES = sorted(p for p in CONFIGS.rglob("*.y*ml")
                 if p.suffix in (".yaml", ".yml") and (CONFIGS / "model") not in p.parents)


def base(**sections) -> dict:
    """A small valid recipe (tiny preset; data/tokenizer paths are never opened here)."""
    data = {
        "output_dir": "/nonexistent/run",
        "model": {"preset": "tiny"},
        "tokenizer": {"model": "/nonexistent/tokenizer.model"},
        "data": {"seq_length": 64, "datasets": [{"prefix": "/nonexistent/web", "weight": 1.0}]},
        "train": {"steps": 10, "global_batch_size": 8, "micro_batch_size": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def explicit_model(**kw) -> dict:
    """Model section without a preset, for the layout checks."""
    model = {"preset": None, "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 4,
             "max_seq_length": 256, "reference_lr": 1e-3}
    model.update(kw)
    return model


def key(dotted: str) -> str:
    """Regex that finds ``dotted`` literally (brackets and dots escaped)."""
    return re.escape(dotted)


def test_base_is_valid():
    cfg = build_config(base())
    assert isinstance(cfg, RunConfig)
    assert cfg.train.steps == 10 and cfg.model.num_layers == 4


# -- unknown keys -------------------------------------------------------------------------

@pytest.mark.parametrize("data,dotted,hint", [
    (base(trian={"steps": 3}), "trian", "train"),
    (base(model={"hiden_size": 128}), "model.hiden_size", "hidden_size"),
    (base(optim={"lr": 1e-3, "warmup_step": 3}), "optim.warmup_step", "warmup_steps"),
    (base(data={"datasets": [{"prefix": "/x/web", "wieght": 0.5}]}), "data.datasets[0].wieght",
     "weight"),
    (base(data={"datasets": [{"prefix": "/x/a"}, {"prefix": "/x/b", "nme": "b"}]}),
     "data.datasets[1].nme", "name"),
])
def test_unknown_key_is_named_with_suggestion(data, dotted, hint):
    with pytest.raises(ConfigError, match=key(f"unknown config key '{dotted}'")) as e:
        build_config(data)
    assert f"did you mean '{hint}'" in str(e.value)


def test_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError, match=key("unknown config key 'train.zzzz'")) as e:
        build_config(base(train={"zzzz": 1}))
    assert "did you mean" not in str(e.value)


def test_renamed_key_names_its_new_name():
    d = base()
    d["data"]["num_workers"] = 1
    with pytest.raises(ConfigError, match=key("config key 'data.num_workers' was renamed to "
                                              "'data.prefetch_batches'")):
        build_config(d)


# -- wrong types --------------------------------------------------------------------------

@pytest.mark.parametrize("data,dotted,what", [
    (base(train={"steps": "ten"}), "train.steps", "expected an integer, got 'ten'"),
    (base(train={"steps": 10.5}), "train.steps", "expected an integer, got 10.5"),
    (base(train={"steps": True}), "train.steps", "expected an integer, got True"),
    (base(train={"steps": None}), "train.steps", "required (or give the run's stages)"),
    (base(logging={"tensorboard": 1}), "logging.tensorboard", "expected true/false, got 1"),
    (base(logging={"tensorboard": "no way"}), "logging.tensorboard", "expected true/false"),
    (base(optim={"lr": True}), "optim.lr", "expected a number, got True"),
    (base(optim={"lr": "fast"}), "optim.lr", "expected a number, got 'fast'"),
    (base(model={"num_query_groups": "two"}), "model.num_query_groups", "expected an integer"),
    (base(runtime={"device": "tpu"}), "runtime.device", "'tpu' is not one of 'cuda' | 'cpu'"),
    (base(model={"normalization": "rmsnorm"}), "model.normalization", "'rmsnorm' is not one of 'RMSNorm' | 'LayerNorm'"),
    (base(train={"precision": None}), "train.precision", "None is not one of"),
    (base(name=None), "name", "expected a string, got None"),
    (base(tokenizer={"model": 3}), "tokenizer.model", "expected a string, got 3"),
    (base(optim=None), "optim", "expected a mapping for OptimConfig, got None"),
    (base(data={"datasets": {"prefix": "/x/web"}}), "data.datasets", "expected a list"),
    (base(data={"datasets": ["/x/web"]}), "data.datasets[0]", "expected a mapping for DatasetEntry"),
    (base(data={"datasets": [{"prefix": "/x/web", "weight": None}]}), "data.datasets[0].weight",
     "expected a number, got None"),
])
def test_wrong_type_names_key(data, dotted, what):
    with pytest.raises(ConfigError, match=key(f"{dotted}: {what}")):
        build_config(data)


def test_float_is_refused_as_int_and_int_accepted_as_float():
    """An integer field refuses 4.0 (issue 23: a count written as a float is a slip), in
    the recipe and as an override; 1e6 is YAML's integer here, and a float field takes 1."""
    cfg = build_config(base(optim={"lr": 1}))
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    with pytest.raises(ConfigError, match=r"^train\.steps: expected an integer, got 10\.0 "
                                          r"\(write 10\)$"):
        build_config(base(train={"steps": 10.0}))
    with pytest.raises(ConfigError, match=r"^parallel\.tensor: expected an integer, got 4\.0"):
        build_config(base(), ["parallel.tensor=4.0"])


def test_null_allowed_where_optional():
    cfg = build_config(base(model={"num_query_groups": None}, checkpoint={"init_from": None}))
    assert cfg.model.num_query_groups is None and cfg.checkpoint.init_from is None


@pytest.mark.parametrize("data,dotted,what", [
    (base(train={"steps": 0}), "train.steps", "must be > 0, got 0"),
    (base(train={"micro_batch_size": -1}), "train.micro_batch_size", "must be > 0"),
    (base(model={"hidden_size": 0}), "model.hidden_size", "must be > 0"),
    (base(data={"datasets": [{"prefix": "/x/web", "weight": -1.0}]}), "data.datasets[0].weight",
     "must be >= 0"),
    (base(data={"datasets": []}), "data.datasets", "at least one dataset"),
    (base(data={"datasets": [{"prefix": "/x/a", "weight": 0.0}]}), "data.datasets",
     "weights sum to zero"),
    (base(optim={"decay_style": "WSD"}), "optim.wsd_decay_steps", "required with decay_style WSD"),
    # Inconsistent legacy schedule lengths (megatron would clamp them silently).
    (base(optim={"warmup_steps": 5, "decay_steps": 5}), "optim.decay_steps",
     "the decay would end at step 5, not after the warmup (5 steps)"),
    (base(optim={"warmup_steps": 10}), "optim.warmup_steps",
     "the decay would end at step 10, not after the warmup"),
    (base(optim={"warmup_steps": 11, "decay_style": "constant"}), "optim.warmup_steps",
     "is longer than the run (train.steps 10)"),
    (base(optim={"decay_steps": 20}), "optim.decay_steps", "past the end of the run"),
    (base(optim={"decay_style": "constant", "decay_steps": 5}), "optim.decay_steps",
     "not used with decay_style constant"),
    (base(optim={"wsd_decay_steps": 5}), "optim.wsd_decay_steps", "only used with decay_style WSD"),
    (base(model={"num_attention_heads": 3}), "model.num_attention_heads", "not divisible"),
    (base(model={"num_query_groups": 3}), "model.num_query_groups", "not divisible"),
])
def test_value_checks_name_key(data, dotted, what):
    with pytest.raises(ConfigError, match=key(dotted) + ".*" + key(what)):
        build_config(data)


# -- missing keys -------------------------------------------------------------------------

@pytest.mark.parametrize("drop,dotted", [
    (("train",), "train"),
    (("output_dir",), "output_dir"),
    (("tokenizer",), "tokenizer"),
    (("train", "global_batch_size"), "train.global_batch_size"),
    (("tokenizer", "model"), "tokenizer.model"),
    (("data", "seq_length"), "data.seq_length"),
])
def test_missing_required_key(drop, dotted):
    data = base()
    node = data
    for part in drop[:-1]:
        node = node[part]
    del node[drop[-1]]
    with pytest.raises(ConfigError, match=key(f"missing required config key '{dotted}'")):
        build_config(data)


def test_missing_required_key_in_list_item_and_model():
    with pytest.raises(ConfigError, match=key("missing required config key 'data.datasets[0].prefix'")):
        build_config(base(data={"datasets": [{"weight": 1.0}]}))
    data = base()
    data["model"] = {"hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 4,
                     "max_seq_length": 256}
    with pytest.raises(ConfigError, match=key("missing required config key 'model.num_layers'")):
        build_config(data)


def test_lr_required_without_reference_lr():
    data = base()
    data["model"] = explicit_model(reference_lr=None)
    with pytest.raises(ConfigError, match=key("optim.lr: not set")):
        build_config(data)
    assert build_config(data, ["optim.lr=0.01"]).optim.lr == 0.01


# -- layout -------------------------------------------------------------------------------

@pytest.mark.parametrize("model,parallel,train,world,pattern", [
    (explicit_model(num_attention_heads=4), {"tensor": 3}, {}, 3,
     r"parallel\.tensor: model\.num_attention_heads 4 is not divisible by tensor parallel size 3"),
    (explicit_model(num_attention_heads=8, num_query_groups=2), {"tensor": 4}, {}, 4,
     r"parallel\.tensor: model\.num_query_groups 2 is not divisible by tensor parallel size 4"),
    (explicit_model(num_attention_heads=8, ffn_hidden_size=180), {"tensor": 8}, {}, 8,
     r"parallel\.tensor: model\.ffn_hidden_size 180 is not divisible"),
    (explicit_model(num_layers=4), {"pipeline": 3}, {}, 3,
     r"parallel\.pipeline: model\.num_layers 4 is not divisible by pipeline parallel size 3"),
    (explicit_model(), {"tensor": 2, "pipeline": 2}, {}, 6,
     r"parallel: world size 6 is not divisible by tensor\*pipeline\*context = 2\*2\*1"),
    (explicit_model(), {}, {"global_batch_size": 8, "micro_batch_size": 2}, 8,
     r"train\.global_batch_size: 8 is not divisible by micro_batch_size \* data_parallel_size = 2\*8"),
    (explicit_model(), {"tensor": 2}, {"global_batch_size": 6, "micro_batch_size": 2}, 4,
     r"train\.global_batch_size: 6 is not divisible by micro_batch_size \* data_parallel_size = 2\*2"),
])
def test_layout_errors_name_key(model, parallel, train, world, pattern):
    cfg = build_config(base(model=model, parallel=parallel, train=train))  # valid on its own
    with pytest.raises(ConfigError, match=pattern):
        cfg.validate_layout(world)


@pytest.mark.parametrize("parallel,world,dp", [
    ({"tensor": 2, "pipeline": 2}, 8, 2),
    ({"tensor": 4}, 4, 1),
    ({"pipeline": 4}, 4, 1),
    ({}, 4, 4),
])
def test_valid_layouts_pass(parallel, world, dp):
    cfg = build_config(base(model=explicit_model(num_attention_heads=4), parallel=parallel,
                            train={"global_batch_size": 16, "micro_batch_size": 2}))
    cfg.validate_layout(world)
    assert cfg.data_parallel_size(world) == dp


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(ConfigError, match=key("parallel.sequence_parallel: needs parallel.tensor > 1")):
        build_config(base(parallel={"sequence_parallel": True}))
    cfg = build_config(base(parallel={"sequence_parallel": True, "tensor": 2}))
    assert cfg.parallel.sequence_parallel


def test_seq_length_above_model_max():
    with pytest.raises(ConfigError, match=key("data.seq_length: 512 exceeds model.max_seq_length 256")):
        build_config(base(data={"seq_length": 512}))
    assert build_config(base(data={"seq_length": 256})).data.seq_length == 256


def test_min_lr_above_lr():
    with pytest.raises(ConfigError, match=key("optim.min_lr: 0.01 is above optim.lr 0.001")):
        build_config(base(optim={"lr": 0.001, "min_lr": 0.01}))
    # lr taken from the preset's reference_lr (tiny: 3e-3) is checked as well
    with pytest.raises(ConfigError, match=key("optim.min_lr: 0.01 is above optim.lr 0.003")):
        build_config(base(optim={"min_lr": 0.01}))
    cfg = build_config(base(optim={"lr": 0.001}))
    assert cfg.optim.min_lr == pytest.approx(1e-4)


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_non_finite_lr_rejected(value):
    with pytest.raises(ConfigError, match=key("optim.lr")):
        build_config(base(), [f"optim.lr={value}"])


# -- presets ------------------------------------------------------------------------------

def test_unknown_preset_lists_known_presets():
    with pytest.raises(ConfigError, match=key("model.preset: unknown preset '70b'")) as e:
        build_config(base(model={"preset": "70b"}))
    assert len(PRESETS) >= 2
    for name in PRESETS:
        assert name in str(e.value)


def test_preset_by_path(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text(yaml.safe_dump(explicit_model(num_layers=6)))
    cfg = build_config(base(model={"preset": str(preset)}))
    assert cfg.model.num_layers == 6


def test_preset_recipe_override_precedence():
    preset = yaml.safe_load((CONFIGS / "model" / "tiny.yaml").read_text())
    assert preset["num_layers"] == 4 and preset["hidden_size"] == 64
    only_preset = build_config(base())
    assert only_preset.model.num_layers == preset["num_layers"]
    recipe = base(model={"preset": "tiny", "num_layers": 8, "rope": {"base": 500000}})
    from_recipe = build_config(recipe)
    assert from_recipe.model.num_layers == 8                  # recipe beats preset
    assert from_recipe.model.hidden_size == preset["hidden_size"]
    from_cli = build_config(recipe, ["model.num_layers=2"])
    assert from_cli.model.num_layers == 2                     # CLI beats recipe
    assert from_cli.model.rope.base == 500000
    # a CLI override of a key only the preset sets beats the preset
    assert build_config(recipe, ["model.hidden_size=128"]).model.hidden_size == 128
    # and the CLI can switch the preset itself; recipe keys still win over it
    switched = build_config(recipe, ["model.preset=7b"])
    assert switched.model.hidden_size == 4096 and switched.model.num_layers == 8


# Layouts for validate_layout(8) per preset; presets not listed must fit one of CANDIDATES.
LAYOUTS_8 = {"tiny": (2, 2), "400m": (8, 1), "1.5b": (8, 1), "2b": (2, 2), "7b": (8, 1),
             "9b": (4, 2), "13b": (8, 1), "34b": (4, 2)}
CANDIDATES = [(8, 1), (4, 2), (2, 4), (4, 1), (2, 2), (2, 1), (1, 1)]


@pytest.mark.parametrize("name", PRESETS)
def test_model_preset_loads_and_fits_8_ranks(name, tmp_path):
    preset = yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())
    assert isinstance(preset, dict) and "preset" not in preset

    def recipe(tp, pp):
        data = base(model={"preset": name}, data={"seq_length": preset["max_seq_length"]},
                    parallel={"tensor": tp, "pipeline": pp, "sequence_parallel": tp > 1},
                    train={"global_batch_size": 64, "micro_batch_size": 1})
        if preset.get("reference_lr") is None:
            data["optim"] = {"lr": 3e-4}
        path = tmp_path / f"{name}-{tp}x{pp}.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path)

    layouts = [LAYOUTS_8[name]] if name in LAYOUTS_8 else CANDIDATES
    errors = []
    for tp, pp in layouts:
        cfg = recipe(tp, pp)
        try:
            cfg.validate_layout(8)
            break
        except ConfigError as e:
            errors.append(f"tp={tp} pp={pp}: {e}")
    else:
        pytest.fail(f"preset {name} fits no layout on 8 ranks: {errors}")
    for field_name, value in preset.items():  # every preset value reaches the config
        got = to_dict(getattr(cfg.model, field_name))  # a section (model.moe) as plain data
        assert got == value if not isinstance(value, dict) else \
            {k: got[k] for k in value} == value, field_name
    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_recipe_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)  # relative paths (presets, data) are resolved from the repo root
    cfg = load_config(path.relative_to(REPO))
    p = cfg.parallel
    # The smallest world it can run on: experts (ETP x EP) lie on the ranks of a stage.
    etp = p.expert_tensor if p.expert_tensor is not None else p.tensor
    cfg.validate_layout(p.pipeline * math.lcm(p.tensor * p.context, etp * p.expert))
    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_load_config_names_file_and_key(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base(model={"preset": "tiny", "hiden_size": 3})))
    with pytest.raises(ConfigError, match=key(f"{path}: unknown config key 'model.hiden_size'")):
        load_config(path)
    with pytest.raises(ConfigError, match=key(f"config file not found: {tmp_path / 'nope.yaml'}")):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1, 2\n")
    with pytest.raises(ConfigError, match=key(f"{bad}: invalid YAML")):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=key(f"{listed}: the top level must be a mapping")):
        load_config(listed)


# -- overrides ----------------------------------------------------------------------------

def test_override_values_are_parsed_as_yaml():
    cfg = build_config(base(checkpoint={"init_from": "/some/run"}), [
        "train.steps=100", "optim.lr=0.001", "checkpoint.init_from=null", "logging.tensorboard=false",
        "runtime.device=cpu", "name=my-run", "optim.adam_eps=1.0e-6"])
    assert cfg.train.steps == 100 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    assert cfg.checkpoint.init_from is None
    assert cfg.logging.tensorboard is False
    assert cfg.runtime.device == "cpu" and cfg.train.precision == "fp32"
    assert cfg.name == "my-run"
    assert cfg.optim.adam_eps == 1e-6


@pytest.mark.parametrize("where", ["override", "recipe"])
@pytest.mark.parametrize("dotted,raw,expected", [
    ("optim.lr", "1e-3", 1e-3),
    ("model.norm_epsilon", "1e-6", 1e-6),
    ("train.steps", "1e6", 1_000_000),
])
def test_scientific_notation_without_dot(where, dotted, raw, expected, tmp_path):
    if where == "override":
        cfg = build_config(base(), [f"{dotted}={raw}"])
    else:
        section, name = dotted.split(".")
        path = tmp_path / "recipe.yaml"
        text = yaml.safe_dump(base(**{section: {name: 12345}}))
        path.write_text(text.replace(f"{name}: 12345", f"{name}: {raw}"))
        cfg = load_config(path)
    section, name = dotted.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected and type(value) is type(expected)


def test_override_creates_nested_keys():
    data = base()
    assert "checkpoint" not in data and "parallel" not in data
    cfg = build_config(data, ["checkpoint.init_from=/runs/a", "parallel.tensor=2"])
    assert cfg.checkpoint.init_from == "/runs/a" and cfg.parallel.tensor == 2
    assert "checkpoint" not in data  # the input is not modified


def test_override_wins_over_recipe_and_is_checked():
    assert build_config(base(train={"steps": 10}), ["train.steps=3"]).train.steps == 3
    with pytest.raises(ConfigError, match=key("unknown config key 'train.stepz' (did you mean 'steps'?)")):
        build_config(base(), ["train.stepz=3"])
    with pytest.raises(ConfigError, match=key("train.steps: expected an integer, got 'many'")):
        build_config(base(), ["train.steps=many"])


@pytest.mark.parametrize("item", ["trainsteps100", "=100", "--train.steps=3"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match=key(f"override '{item}': expected dotted.key=value")):
        build_config(base(), [item])


def test_override_into_a_scalar():
    with pytest.raises(ConfigError, match=key("override 'train.steps.x': 'steps' is not a section")):
        build_config(base(), ["train.steps.x=1"])


# -- dump round trip ----------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    [],
    ["runtime.device=cpu", "parallel.tensor=2", "parallel.sequence_parallel=true",
     "optim.decay_style=WSD", "optim.wsd_decay_steps=3", "checkpoint.init_from=/runs/a",
     "train.stop_at_step=5", "model.vocab_size=1000"],
])
def test_dump_config_round_trip(overrides):
    cfg = build_config(base(data={"datasets": [{"prefix": "/x/a", "weight": 0.25, "name": "a"},
                                               {"prefix": "/x/b", "weight": 0.75}]}), overrides)
    text = dump_config(cfg)
    assert build_config(yaml.safe_load(text)) == cfg
    assert yaml.safe_load(text) == to_dict(cfg)
    assert dump_config(build_config(yaml.safe_load(text))) == text


# -- CLI ----------------------------------------------------------------------------------

def _cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Start the CLI runs together (each pays the torch/megatron import), then collect them."""
    d = tmp_path_factory.mktemp("cli")
    good = d / "good.yaml"
    good.write_text(yaml.safe_dump(base(parallel={"tensor": 2})))
    runs = {
        "ok": ([str(good), "train.steps=7", "--dry-run"], {"WORLD_SIZE": "4"}),
        "typo": ([str(good), "model.hiden_size=128", "--dry-run"], {}),
        "layout": ([str(good), "--dry-run"], {"WORLD_SIZE": "3"}),
        "sp_cpu": ([str(good), "parallel.sequence_parallel=true", "runtime.device=cpu",
                    "--dry-run"], {"WORLD_SIZE": "2"}),
        "cp_cpu": ([str(good), "parallel.context=2", "parallel.tensor=1", "runtime.device=cpu",
                    "--dry-run"], {"WORLD_SIZE": "2"}),
        "te_cpu": ([str(good), "model.attention_backend=te", "runtime.device=cpu", "--dry-run"],
                   {"WORLD_SIZE": "2"}),
        "fp8_cpu": ([str(good), "train.fp8={format: e4m3}", "runtime.device=cpu", "--dry-run"],
                    {"WORLD_SIZE": "2"}),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "phoenix.train", *args], cwd=REPO,
                                    env=_cli_env(**env), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (args, env) in runs.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    results["good_path"] = good
    return results


def test_cli_dry_run_prints_resolved_config(cli_runs):
    rc, out, err = cli_runs["ok"]
    assert rc == 0, err
    expected = build_config(base(parallel={"tensor": 2}), ["train.steps=7"])
    printed = yaml.safe_load(out)
    assert printed == to_dict(expected)
    assert build_config(printed) == expected
    assert printed["model"]["num_layers"] == 4  # resolved from the preset


def test_cli_typo_exits_2_naming_key(cli_runs):
    rc, out, err = cli_runs["typo"]
    assert rc == 2, (out, err)
    assert "phoenix: config error:" in err
    assert "model.hiden_size" in err and "did you mean 'hidden_size'" in err
    assert str(cli_runs["good_path"]) in err
    assert "Traceback" not in err


def test_cli_dry_run_checks_layout(cli_runs):
    rc, out, err = cli_runs["layout"]
    assert rc == 2, (out, err)
    assert "phoenix: config error:" in err
    assert "parallel: world size 3 is not divisible" in err


def test_cli_dry_run_refuses_what_the_run_would(cli_runs):
    """Sequence parallelism without Transformer Engine on CUDA: refused by --dry-run, with
    the key, instead of an AssertionError on every rank of the real run."""
    rc, out, err = cli_runs["sp_cpu"]
    assert rc == 2, (out, err)
    assert "phoenix: config error:" in err and "Traceback" not in err
    assert "parallel.sequence_parallel: needs the Transformer Engine layer spec on CUDA " \
           "(runtime.device is cpu" in err


@pytest.mark.parametrize("run,line", [
    ("te_cpu", "model.attention_backend: te needs Transformer Engine on CUDA (runtime.device is "
               "cpu); use sdpa, unfused or auto"),
    ("fp8_cpu", "train.fp8: fp8 GEMMs are Transformer Engine's (runtime.device is cpu); remove "
                "train.fp8"),
])
def test_cli_dry_run_refuses_te_only_switches_on_cpu(cli_runs, run, line):
    rc, out, err = cli_runs[run]
    assert rc == 2 and "Traceback" not in err, (out, err)
    assert line in err, err


def test_cli_dry_run_refuses_context_parallel_on_cpu(cli_runs):
    rc, out, err = cli_runs["cp_cpu"]
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    assert "parallel.context: context parallelism needs Transformer Engine attention on CUDA " \
           "(runtime.device is cpu); set parallel.context=1" in err
