"""Per-group LR multipliers and freezing by parameter name, on real megatron objects.

The model-building checks run inside spawned ranks (gloo on CPU): one process for the
reference (global names, LR multipliers against an unmultiplied twin, a short frozen
training loop, a checkpoint round trip, bad patterns), two for pipeline parallelism
(global names, a tied embedding under a freeze) and two for data parallelism with the
distributed optimizer. The config and scheduler checks run in this process.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from phoenix.config.typed import ConfigError, from_dict
from phoenix.config.optim import FreezeConfig, ParamGroupRule
from phoenix.config.schedule import PhaseConfig, ScheduleConfig, resolve
from phoenix.optim.schedule import MultiPhaseScheduler

VOCAB = 512
SEQ, MBS, MICRO = 32, 2, 2
LR = 0.05  # large: a first Adam step moves weights by ~LR, far above fp32 rounding
FREEZE_STEPS = 2
EMBEDDING = "embedding.word_embeddings.weight"

# First match wins: layer 1's MLP gets x0.25 (rule 1), the other MLPs x1 (rule 2), the
# rest of the layers x3 (rule 3).
RULES = [
    dict(params=["embedding.*"], lr_mult=2.0, name="embeddings"),
    dict(params=["decoder.layers.1.*", "decoder.final_layernorm.weight"], lr_mult=0.25),
    dict(params=["decoder.layers.*.mlp.*"], lr_mult=1.0, name="mlp"),
    dict(params=["decoder.layers.*"], lr_mult=3.0),
]


def expected_mult(name: str) -> float:
    """RULES written out by hand, independently of fnmatch."""
    if name.startswith("embedding."):
        return 2.0
    if name.startswith("decoder.layers.1.") or name == "decoder.final_layernorm.weight":
        return 0.25
    if re.match(r"decoder\.layers\.\d+\.mlp\.", name):
        return 1.0
    if name.startswith("decoder.layers."):
        return 3.0
    return 1.0


# ------------------------------------------------------------- helpers run in ranks


def _setup(out_dir, overrides=(), **sections):
    from phoenix.runtime import init_runtime
    from phoenix.testing.tiny import TinyData, tiny_config

    # The model and optimizer never read the tokenizer or the data: placeholder paths.
    files = TinyData("/unused/tokenizer.model", {"web": "/unused/web", "code": "/unused/code"})
    optim = {"warmup_steps": 0, "lr": LR, **sections.pop("optim", {})}
    cfg = tiny_config(files, out_dir, list(overrides), optim=optim, **sections)
    return cfg, init_runtime(cfg)


def _model(cfg, layout):
    from phoenix.model import build_model

    return build_model(cfg, layout, VOCAB)


def _named(model):
    from phoenix.optim.param_groups import global_param_names

    names = global_param_names(model)
    return {names[id(p)]: p for chunk in model for p in chunk.parameters()}


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(MICRO):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                    "position_ids": torch.arange(SEQ).expand(MBS, SEQ).contiguous(),
                    "loss_mask": torch.ones(MBS, SEQ)})
    return out


def _forward_backward(model, optimizer, batches):
    """One step's gradients, as the trainer computes them (reduced into main_grad)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from phoenix.train.step import forward_step

    config = model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model[0].no_sync
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model,
        num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=MBS, forward_only=False)


def _group_of(optimizer, param) -> dict | None:
    """The optimizer param group that updates model parameter ``param`` (None: with the
    distributed optimizer, no part of it is in this rank's shard)."""
    for opt in optimizer.chained_optimizers:
        index = getattr(opt, "model_param_group_index_map", {}).get(param)
        if index is not None:
            return opt.optimizer.param_groups[index[0]]
        for group in opt.param_groups:
            if any(p is param for p in group["params"]):
                return group
    return None


def _group_keys(optimizer) -> list[tuple]:
    return [(g["wd_mult"], g["lr_mult"], g.get("frozen_steps"), g["default_config"])
            for g in optimizer.param_groups]


def _freeze_loop(cfg, layout, model, freeze, steps, seed, record=None):
    """Train ``steps`` steps with ``freeze``; per step: which weights changed, the grad
    norm megatron reports, the norms of all and of the unfrozen grads before zeroing."""
    from phoenix.optim.builder import build_optimizer, build_scheduler
    from phoenix.optim.param_groups import frozen_model_params, zero_frozen_grads

    optimizer = build_optimizer(cfg, model, layout, freeze=freeze)
    scheduler = build_scheduler(cfg, optimizer)
    assert isinstance(scheduler, MultiPhaseScheduler)  # picked from the param groups alone
    named = _named(model)
    frozen = frozen_model_params(model, freeze)
    trained = [n for n, p in named.items() if all(p is not q for q in frozen)]
    history = []
    for step in range(steps):
        before = {n: p.detach().clone() for n, p in named.items()}
        _forward_backward(model, optimizer, _batches(seed + step))
        sq = {n: float(p.main_grad.double().pow(2).sum()) for n, p in named.items()}
        zero_frozen_grads(frozen, step, freeze)
        lrs = {n: g["lr"] for n, p in named.items() if (g := _group_of(optimizer, p)) is not None}
        base = scheduler.base_lr()
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        history.append({
            "groups": _group_keys(optimizer),
            "changed": {n: not torch.equal(before[n], p.detach()) for n, p in named.items()},
            "grad_norm": float(grad_norm),
            "full_norm": math.sqrt(sum(sq.values())),
            "trained_norm": math.sqrt(sum(sq[n] for n in trained)),
            "lrs": lrs, "base_lr": base,
        })
        if record is not None:
            record(step, optimizer, scheduler)
    return history, optimizer, scheduler


# ------------------------------------------------------------------- rank workers


def single_process_checks(out_dir: str) -> dict:
    from phoenix.checkpoint import CheckpointStore
    from phoenix.optim.builder import build_optimizer, build_scheduler
    from phoenix.optim.param_groups import build_config_overrides

    result = {}
    cfg, layout = _setup(out_dir)
    tied_cfg, _ = _setup(out_dir, ["model.tie_embeddings=true"])
    result["names"] = sorted(_named(_model(cfg, layout)))
    result["tied_names"] = sorted(_named(_model(tied_cfg, layout)))

    # -- LR multipliers: one step from the same weights and batch, with and without rules.
    rules = [ParamGroupRule(**r) for r in RULES]
    ruled, plain = _model(cfg, layout), _model(cfg, layout)
    plain[0].module.load_state_dict(ruled[0].module.state_dict())
    opt_ruled = build_optimizer(cfg, ruled, layout, param_rules=rules)
    opt_plain = build_optimizer(cfg, plain, layout)
    sched_ruled = build_scheduler(cfg, opt_ruled)
    sched_plain = build_scheduler(cfg, opt_plain)
    result["schedulers"] = [type(sched_ruled).__name__, type(sched_plain).__name__]
    named_ruled, named_plain = _named(ruled), _named(plain)
    start = {n: p.detach().clone() for n, p in named_ruled.items()}
    for model, opt in ((ruled, opt_ruled), (plain, opt_plain)):
        _forward_backward(model, opt, _batches(0))
    result["same_grads"] = all(torch.equal(named_ruled[n].main_grad, named_plain[n].main_grad)
                               for n in named_ruled)
    result["group_lrs"] = [(g["lr"], g["lr_mult"], sched_ruled.base_lr(), len(g["params"]))
                           for g in opt_ruled.param_groups]
    result["param_lr"] = {n: _group_of(opt_ruled, p)["lr"] for n, p in named_ruled.items()}
    opt_ruled.step()
    opt_plain.step()
    updates = {}
    for n in named_ruled:
        d_ruled = (named_ruled[n].detach() - start[n]).double()
        d_plain = (named_plain[n].detach() - start[n]).double()
        updates[n] = (float(d_ruled.norm()), float(d_plain.norm()),
                      float((d_ruled - expected_mult(n) * d_plain).norm()))
    result["updates"] = updates

    # -- Freeze all but the embeddings for 2 steps, then a resume inside the freeze.
    freeze = FreezeConfig(params=["*"], exclude=["embedding.*"], steps=FREEZE_STEPS)
    model = _model(cfg, layout)
    saved = {}

    def save_first(step, optimizer, scheduler):
        if step == 0:
            manager = CheckpointStore(f"{out_dir}/checkpoints", layout.rank, layout.world_size)
            saved.update(path=manager.save(1, model, optimizer, {}, ""),
                         scheduler=scheduler.state_dict(),
                         lrs=[g["lr"] for g in optimizer.param_groups])

    result["freeze"], *_ = _freeze_loop(cfg, layout, model, freeze, 4, seed=10, record=save_first)
    resumed = _model(cfg, layout)
    optimizer = build_optimizer(cfg, resumed, layout, freeze=freeze)
    scheduler = build_scheduler(cfg, optimizer)
    CheckpointStore(f"{out_dir}/checkpoints", 0, 1).load(saved["path"], resumed, optimizer)
    result["loaded_frozen_steps"] = [g.get("frozen_steps") for g in optimizer.param_groups]
    scheduler.load_state_dict(saved["scheduler"])
    result["resume_lrs"] = ([g["lr"] for g in optimizer.param_groups], saved["lrs"])

    # -- Bad patterns (collective checks, in one process here).
    errors = {}
    cases = {
        "unknown": dict(param_rules=[ParamGroupRule(params=["embedding.*"], lr_mult=2.0),
                                     ParamGroupRule(params=["decoder.layer.*"], lr_mult=0.5)]),
        "shadowed": dict(param_rules=[ParamGroupRule(params=["*"], lr_mult=0.5),
                                      ParamGroupRule(params=["embedding.*"], lr_mult=2.0)]),
        "freeze_all": dict(freeze=FreezeConfig(params=["*"], exclude=[], steps=3)),
        "freeze_exclude_typo": dict(freeze=FreezeConfig(params=["*"], exclude=["embeddings.*"],
                                                        steps=3)),
    }
    for case, kwargs in cases.items():
        try:
            build_optimizer(cfg, model, layout, **kwargs)
            errors[case] = None
        except ConfigError as e:
            errors[case] = str(e)
    from megatron.core.optimizer import OptimizerConfig

    try:
        build_config_overrides(OptimizerConfig(lr=LR, use_distributed_optimizer=False), model,
                               freeze=freeze)
        errors["no_distopt"] = None
    except ConfigError as e:
        errors["no_distopt"] = str(e)
    result["errors"] = errors
    return result


def pipeline_checks(out_dir: str) -> dict:
    cfg, layout = _setup(out_dir, ["parallel.pipeline=2"])
    tied_cfg, _ = _setup(out_dir, ["parallel.pipeline=2", "model.tie_embeddings=true"])
    result = {"rank": layout.pp_rank, "names": sorted(_named(_model(cfg, layout)))}
    model = _model(tied_cfg, layout)
    result["tied_names"] = sorted(_named(model))
    # The last stage's copy of the tied embedding is named (and so trained) like the
    # embedding itself: both copies must stay equal through and after the freeze.
    freeze = FreezeConfig(params=["*"], exclude=["embedding.*"], steps=FREEZE_STEPS)
    copies = []

    def keep_copy(step, optimizer, scheduler):
        # No raising here: the other stage would wait for this one forever.
        weight = _named(model).get(EMBEDDING)
        copies.append(None if weight is None else weight.detach().clone())

    result["freeze"], *_ = _freeze_loop(tied_cfg, layout, model, freeze, 3, seed=20,
                                        record=keep_copy)
    result["tied_copies"] = copies
    return result


def data_parallel_checks(out_dir: str) -> dict:
    import torch.distributed as dist

    cfg, layout = _setup(out_dir, ["parallel.use_distributed_optimizer=true"])
    assert layout.dp_size == 2
    model = _model(cfg, layout)
    freeze = FreezeConfig(params=["*"], exclude=["embedding.*", "output_layer.*"],
                          steps=FREEZE_STEPS)
    history, *_ = _freeze_loop(cfg, layout, model, freeze, 3, seed=30 + 100 * dist.get_rank())
    sums = {n: float(p.detach().double().sum()) for n, p in _named(model).items()}
    return {"freeze": history, "sums": sums}


# --------------------------------------------------------------- multi-process runs


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from phoenix.testing.distributed import run_distributed

    (result,) = run_distributed(single_process_checks, 1, str(tmp_path_factory.mktemp("pg1")))
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from phoenix.testing.distributed import run_distributed

    return run_distributed(pipeline_checks, 2, str(tmp_path_factory.mktemp("pg_pp")))


def _close(a, b, rel):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def test_global_names_under_pipeline_parallel(single, pipeline):
    names = single["names"]
    assert EMBEDDING in names and "output_layer.weight" in names
    assert {f"decoder.layers.{i}.mlp.linear_fc1.weight" for i in range(4)} <= set(names)
    assert not any(n.startswith("module.") for n in names)
    first, last = sorted(pipeline, key=lambda r: r["rank"])
    # Each stage holds two of the four layers, named by their global index.
    def layers(names):
        return {n.split(".")[2] for n in names if n.startswith("decoder.layers.")}

    assert layers(first["names"]) == {"0", "1"} and layers(last["names"]) == {"2", "3"}
    assert sorted(set(first["names"]) | set(last["names"])) == names
    assert not set(first["names"]) & set(last["names"])
    # Tied: one process has no output weight; under PP the last stage's copy is the embedding.
    assert "output_layer.weight" not in single["tied_names"]
    assert EMBEDDING in last["tied_names"] and "output_layer.weight" not in last["tied_names"]
    assert sorted(set(first["tied_names"]) | set(last["tied_names"])) == single["tied_names"]


def test_lr_mult_scales_the_first_adam_update(single):
    assert single["schedulers"] == ["MultiPhaseScheduler", "MultiPhaseScheduler"]
    assert single["same_grads"]  # the two twins saw the same weights and gradients
    updates = single["updates"]
    assert {expected_mult(n) for n in updates} == {2.0, 0.25, 1.0, 3.0}
    for name, (ruled, plain, deviation) in updates.items():
        m = expected_mult(name)
        assert plain > 0, name
        assert _close(ruled, m * plain, 1e-6), (name, m, ruled / plain)
        # Element by element too, up to fp32 rounding of the new weights (norm weights
        # near 1.0 round at ~1e-7 against updates of ~1e-2).
        assert deviation <= 1e-4 * m * plain, (name, m, deviation / (m * plain))
    for lr, mult, base, _ in single["group_lrs"]:
        assert base == LR and lr == base * mult
    for name, lr in single["param_lr"].items():
        assert lr == LR * expected_mult(name), name


def test_freeze_all_but_embeddings(single):
    history = single["freeze"]
    for step, h in enumerate(history):
        frozen = [n for n in h["changed"] if n != EMBEDDING]
        assert h["changed"][EMBEDDING], step
        if step < FREEZE_STEPS:
            assert not any(h["changed"][n] for n in frozen), (step, frozen)
            assert all(h["lrs"][n] == 0.0 for n in frozen)
            assert h["lrs"][EMBEDDING] == h["base_lr"] > 0
            # The reported norm is that of the embedding gradient alone ...
            assert _close(h["grad_norm"], h["trained_norm"], 1e-5), h
            # ... which differs from the norm over every gradient.
            assert h["full_norm"] > 1.01 * h["trained_norm"]
        else:
            assert all(h["changed"][n] for n in frozen), (step, [n for n in frozen
                                                                 if not h["changed"][n]])
            assert all(lr == h["base_lr"] for lr in h["lrs"].values())
            assert _close(h["grad_norm"], h["full_norm"], 1e-5), h


def test_resume_inside_the_freeze_keeps_groups_apart(single):
    """megatron's checkpoint load matches param groups by (wd_mult, lr_mult, ...) only:
    the trained embedding group comes back carrying the frozen groups' frozen_steps.
    The scheduler restores each group's own and the LRs equal those before the save."""
    assert all(s == FREEZE_STEPS for s in single["loaded_frozen_steps"])
    lrs, saved = single["resume_lrs"]
    assert lrs == saved and 0.0 in lrs and any(lr > 0 for lr in lrs)


def test_pattern_errors_name_the_rule(single):
    errors = single["errors"]  # keys as build_optimizer names them: in the optim section
    assert errors["unknown"].startswith("optim.param_groups[1].params[0]: pattern "
                                        "'decoder.layer.*' matches no parameter")
    for example in (EMBEDDING, "decoder.layers.0.mlp.linear_fc1.weight", "layers 0..3"):
        assert example in errors["unknown"]
    assert errors["shadowed"].startswith("optim.param_groups[1]: every parameter it matches is "
                                         "taken by an earlier rule")
    assert errors["freeze_all"].startswith("optim.freeze: freezes every parameter")
    assert errors["freeze_exclude_typo"].startswith("optim.freeze.exclude[0]: pattern "
                                                    "'embeddings.*' matches no parameter")
    assert errors["no_distopt"].startswith("freeze: needs the distributed optimizer")


def test_pipeline_freeze_keeps_tied_embedding_copies_equal(pipeline):
    for r in pipeline:
        for step, h in enumerate(r["freeze"]):
            frozen = [n for n in h["changed"] if n != EMBEDDING]
            assert h["changed"][EMBEDDING], (r["rank"], step)
            assert all(h["changed"][n] != (step < FREEZE_STEPS) for n in frozen), (r["rank"], step)
    first, last = pipeline
    for step, (a, b) in enumerate(zip(first["tied_copies"], last["tied_copies"])):
        assert a is not None and b is not None and torch.equal(a, b), step
    # The same param groups on both stages (the last one holds no embedding but gets
    # its group, empty), as megatron's checkpoints need.
    assert first["freeze"][0]["groups"] == last["freeze"][0]["groups"]
    assert {k[2] for k in first["freeze"][0]["groups"]} == {None, FREEZE_STEPS}
    # The norm counts the tied embedding once: the same on both stages.
    assert [h["grad_norm"] for h in first["freeze"]] == [h["grad_norm"] for h in last["freeze"]]


def test_data_parallel_distributed_optimizer_freeze(tmp_path):
    from phoenix.testing.distributed import run_distributed

    results = run_distributed(data_parallel_checks, 2, str(tmp_path))
    kept = {EMBEDDING, "output_layer.weight"}
    for r in results:
        for step, h in enumerate(r["freeze"]):
            assert all(h["changed"][n] for n in kept), step
            moved = [n for n in h["changed"] if n not in kept and h["changed"][n]]
            if step < FREEZE_STEPS:
                assert not moved, (step, moved)
            else:
                assert len(moved) == len(h["changed"]) - len(kept), step
    assert results[0]["sums"] == results[1]["sums"]  # replicas agree
    assert results[0]["freeze"][0]["groups"] == results[1]["freeze"][0]["groups"]


# ------------------------------------------------------------------ in this process


@pytest.mark.parametrize("section, data, message", [
    ("param_groups[0]", {"params": ["x"], "lr_mult": 0.0}, "param_groups[0].lr_mult: must be"),
    ("param_groups[0]", {"params": ["x"], "lr_mult": -2}, "param_groups[0].lr_mult: must be"),
    ("param_groups[1]", {"params": ["x"], "lr_mult": float("nan")}, "param_groups[1].lr_mult:"),
    ("param_groups[2]", {"params": [], "lr_mult": 2.0}, "param_groups[2].params: give a list"),
    ("param_groups[0]", {"params": ["x", ""]}, "param_groups[0].params[1]: a pattern must be"),
    ("param_groups[0]", {"params": ["x"], "lr": 2.0}, "unknown config key 'param_groups[0].lr'"),
])
def test_rule_validation(section, data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(ParamGroupRule, data, section)


@pytest.mark.parametrize("data, message", [
    ({"params": ["*"], "steps": 0}, "freeze.steps: must be an integer > 0"),
    ({"params": ["*"], "steps": -5}, "freeze.steps: must be an integer > 0"),
    ({"params": ["*"]}, "missing required config key 'freeze.steps'"),
    ({"params": [], "steps": 3}, "freeze.params: give a list"),
    ({"params": ["*"], "exclude": [""], "steps": 3}, "freeze.exclude[0]: a pattern must be"),
])
def test_freeze_validation(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(FreezeConfig, data, "freeze")


def test_freeze_matching():
    f = FreezeConfig(params=["decoder.*", "output_layer.*"], exclude=["decoder.layers.1.*"],
                     steps=3)
    assert f.freezes("decoder.layers.0.mlp.linear_fc1.weight")
    assert f.freezes("decoder.layers.10.mlp.linear_fc1.weight")  # '1.*' is not '1*'
    assert not f.freezes("decoder.layers.1.mlp.linear_fc1.weight")
    assert f.freezes("output_layer.weight") and not f.freezes(EMBEDDING)
    assert not f.freezes("Decoder.layers.0.mlp.linear_fc1.weight")  # case-sensitive


def _scheduler(*groups):
    resolved = resolve(ScheduleConfig(peak_lr=1e-3, min_lr=1e-4, phases=[
        PhaseConfig(kind="warmup", steps=4), PhaseConfig(kind="decay", steps=6, target_lr=1e-4)]))
    opt = SimpleNamespace(param_groups=[dict(g) for g in groups])
    return MultiPhaseScheduler(opt, resolved, weight_decay=0.1), opt, resolved


def test_scheduler_frozen_groups_and_base_lr():
    sched, opt, r = _scheduler({}, {"frozen_steps": 3, "lr_mult": 2.0, "wd_mult": 0.0},
                               {"frozen_steps": 3}, {"lr_mult": 0.5})
    for k in range(10):
        assert sched.base_lr() == r.lr_at(k)
        lrs = [g["lr"] for g in opt.param_groups]
        frozen = k < 3
        assert lrs == [r.lr_at(k), 0.0 if frozen else 2.0 * r.lr_at(k),
                       0.0 if frozen else r.lr_at(k), 0.5 * r.lr_at(k)], k
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1, 0.1]
        sched.step(increment=1)


def test_scheduler_restores_frozen_steps_after_an_optimizer_load():
    """A load may hand a frozen group's dict to a trained group and back (see
    test_resume_inside_the_freeze_keeps_groups_apart for the real megatron case)."""
    sched, opt, r = _scheduler({"wd_mult": 1.0}, {"wd_mult": 1.0, "frozen_steps": 5})
    state = sched.state_dict()
    saved = {"wd_mult": 1.0, "frozen_steps": 5}
    opt.param_groups = [dict(saved), dict(saved)]  # what megatron's load leaves behind
    sched.load_state_dict(state)
    assert [g["lr"] for g in opt.param_groups] == [r.lr_at(0), 0.0]
    assert "frozen_steps" not in opt.param_groups[0]
    opt.param_groups.append({})
    with pytest.raises(ValueError, match="3 param groups, it had 2"):
        sched.step(increment=1)
