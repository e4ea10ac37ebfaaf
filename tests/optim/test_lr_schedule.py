"""Multi-phase LR schedule: oracle tests against megatron-core's OptimizerParamScheduler,
boundaries, tokens->steps, weight decay, per-group multipliers, resume, validation, and
the ``phoenix lr-plot`` CSV/PNG.

Convention checked here: megatron's constructor calls ``step(0)`` and the trainer calls
``step(increment=1)`` after each optimizer step, so the LR used by optimizer step k
(0-based) is the group's ``lr`` after k increments, i.e. ``get_lr`` at ``num_steps == k``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import sys
from types import SimpleNamespace

import pytest
import yaml

from phoenix.config import build_config
from phoenix.config.typed import ConfigError, from_dict
from phoenix.config.schedule import PhaseConfig, ScheduleConfig, WeightDecayConfig, resolve
from phoenix.optim.schedule import MultiPhaseScheduler, ScheduleMismatchError, build_multi_phase_scheduler

PEAK, FLOOR = 3e-4, 3e-5
REL = 1e-12


def _optimizer(*groups):
    """Stand-in for a megatron optimizer: all the schedulers touch is ``param_groups``."""
    return SimpleNamespace(param_groups=[dict(g) for g in (groups or [{}])])


def _megatron(optimizer, *, style, warmup=10, decay_end=100, wsd_steps=None, wsd_style=None,
              peak=PEAK, floor=FLOOR, start_wd=0.1, end_wd=0.1, wd_style="constant",
              wd_steps=100):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=peak, min_lr=floor, lr_warmup_steps=warmup,
        lr_decay_steps=decay_end, lr_decay_style=style, start_wd=start_wd, end_wd=end_wd,
        wd_incr_steps=wd_steps, wd_incr_style=wd_style, wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style=wsd_style)


def _megatron_of_config(cfg, optimizer):
    """megatron's scheduler with a run config's legacy ``optim`` LR fields: the oracle the
    phases resolved from those fields must match."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    decay_steps = o.decay_steps or cfg.train.steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(decay_steps, o.warmup_steps + 1), lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False, wsd_decay_steps=o.wsd_decay_steps,
        lr_wsd_decay_style=o.wsd_decay_style)


def _trace(scheduler, optimizer, num_steps, key="lr"):
    """Per-group ``key`` seen by optimizer steps 0..num_steps-1, stepping like the trainer."""
    seen = []
    for _ in range(num_steps):
        seen.append([g[key] for g in optimizer.param_groups])  # optimizer.step() reads these
        scheduler.step(increment=1)
    return seen


def _close(a, b):
    return math.isclose(a, b, rel_tol=REL, abs_tol=0.0)


def _wsd(shape, *, warmup=10, constant=60, decay=30, peak=PEAK, floor=FLOOR, wd=None):
    return ScheduleConfig(peak_lr=peak, min_lr=floor, weight_decay=wd, phases=[
        PhaseConfig(kind="warmup", steps=warmup),
        PhaseConfig(kind="constant", steps=constant),
        PhaseConfig(kind="decay", steps=decay, target_lr=floor, shape=shape)])


# ----------------------------------------------------------------- megatron oracle


def test_megatron_step_convention():
    """What the equivalence relies on: num_steps is 0 after construction, +1 per step,
    and the LR in the group when optimizer step k runs is get_lr at num_steps == k."""
    opt = _optimizer()
    m = _megatron(opt, style="linear", warmup=10, decay_end=100)
    assert m.num_steps == 0 and opt.param_groups[0]["lr"] == 0.0  # step 0 trains with lr 0
    lrs = [row[0] for row in _trace(m, opt, 11)]
    assert m.num_steps == 11
    assert lrs[10] == PEAK and lrs[9] < PEAK  # the warmup reaches the peak at step W, not W-1
    r = resolve(ScheduleConfig(peak_lr=PEAK, min_lr=FLOOR, phases=[
        PhaseConfig(kind="warmup", steps=10),
        PhaseConfig(kind="decay", steps=90, target_lr=FLOOR)]))
    assert [r.lr_at(k) for k in range(11)] == lrs


# megatron WSD style -> our decay shape. megatron's "exponential" is a different curve
# (coefficient 2*0.5**r - 1), checked separately below.
WSD_SHAPES = [("linear", "linear"), ("cosine", "cosine"), ("minus_sqrt", "1-sqrt")]


@pytest.mark.parametrize("floor", [FLOOR, 0.0])
@pytest.mark.parametrize("megatron_style,shape", WSD_SHAPES)
def test_wsd_matches_megatron_every_step(megatron_style, shape, floor):
    opt = _optimizer()
    m = _megatron(opt, style="WSD", warmup=10, decay_end=100, wsd_steps=30,
                  wsd_style=megatron_style, floor=floor)
    expected = [row[0] for row in _trace(m, opt, 130)]  # 30 steps past the end: stays at floor
    r = resolve(_wsd(shape, floor=floor))
    ours = [r.lr_at(k) for k in range(130)]
    bad = [(k, e, o) for k, (e, o) in enumerate(zip(expected, ours)) if not _close(e, o)]
    assert not bad, bad[:5]
    assert ours[100:] == [floor] * 30


@pytest.mark.parametrize("style", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [10, 0])
def test_single_decay_matches_megatron_every_step(style, warmup):
    opt = _optimizer()
    m = _megatron(opt, style=style, warmup=warmup, decay_end=100)
    expected = [row[0] for row in _trace(m, opt, 120)]
    phases = [PhaseConfig(kind="warmup", steps=warmup)] if warmup else []
    phases.append(PhaseConfig(kind="decay", steps=100 - warmup, target_lr=FLOOR, shape=style))
    r = resolve(ScheduleConfig(peak_lr=PEAK, min_lr=FLOOR, phases=phases))
    ours = [r.lr_at(k) for k in range(120)]
    assert all(_close(e, o) for e, o in zip(expected, ours)), list(zip(expected, ours))


def test_megatron_exponential_is_not_geometric():
    """Our 'exponential' is geometric; megatron's WSD 'exponential' is not, so it is not
    mapped (and legacy configs using it are refused, see test_legacy_fields)."""
    opt = _optimizer()
    m = _megatron(opt, style="WSD", wsd_steps=30, wsd_style="exponential")
    expected = [row[0] for row in _trace(m, opt, 100)]
    r = resolve(_wsd("exponential"))
    assert _close(r.lr_at(85), PEAK * (FLOOR / PEAK) ** 0.5)  # geometric midpoint
    assert not _close(r.lr_at(85), expected[85])
    assert r.lr_at(100) == expected[0] + FLOOR == FLOOR  # both end at the floor


@pytest.mark.parametrize("wd_style", ["linear", "cosine"])
def test_scheduler_matches_megatron_per_group(wd_style):
    """Groups as megatron builds them (default, no-WD, decoupled LR, own start/end WD):
    lr and weight_decay equal megatron's for every group at every step."""
    groups = [
        {"default_config": True, "max_lr": PEAK, "min_lr": FLOOR, "wd_mult": 1.0, "lr_mult": 1.0},
        {"default_config": True, "max_lr": PEAK, "min_lr": FLOOR, "wd_mult": 0.0, "lr_mult": 1.0},
        {"default_config": False, "max_lr": 1e-3, "min_lr": 2e-5, "wd_mult": 1.0},
        {"default_config": False, "max_lr": 5e-5, "wd_mult": 0.5},
        {"start_wd": 0.01, "end_wd": 0.2},
    ]
    for megatron_style, shape in WSD_SHAPES:
        m_opt, our_opt = _optimizer(*groups), _optimizer(*groups)
        m = _megatron(m_opt, style="WSD", wsd_steps=30, wsd_style=megatron_style, start_wd=0.0,
                      end_wd=0.1, wd_style=wd_style, wd_steps=100)
        ours = MultiPhaseScheduler(our_opt, resolve(_wsd(shape, wd=WeightDecayConfig(
            start=0.0, end=0.1, style=wd_style))))
        m_rows = [[(g["lr"], g["weight_decay"]) for g in m_opt.param_groups]]
        o_rows = [[(g["lr"], g["weight_decay"]) for g in our_opt.param_groups]]
        for _ in range(115):
            m.step(increment=1)
            ours.step(increment=1)
            m_rows.append([(g["lr"], g["weight_decay"]) for g in m_opt.param_groups])
            o_rows.append([(g["lr"], g["weight_decay"]) for g in our_opt.param_groups])
        for k, (mr, orow) in enumerate(zip(m_rows, o_rows)):
            for gi, ((ml, mw), (ol, ow)) in enumerate(zip(mr, orow)):
                assert _close(ml, ol), (megatron_style, k, gi, ml, ol)
                assert _close(mw, ow), (megatron_style, k, gi, mw, ow)


def _run_config(**optim):
    return build_config({
        "output_dir": "unused", "model": {"preset": "tiny"}, "tokenizer": {"model": "unused"},
        "data": {"seq_length": 64, "datasets": [{"prefix": "unused"}]},
        "train": {"steps": 80, "global_batch_size": 4}, "runtime": {"device": "cpu"},
        "optim": {"lr": PEAK, **optim}})


LEGACY = [
    {"warmup_steps": 8, "decay_style": "cosine"},
    {"warmup_steps": 8, "decay_style": "linear", "decay_steps": 50},
    {"warmup_steps": 0, "decay_style": "cosine"},
    {"warmup_steps": 8, "decay_style": "constant"},
    {"warmup_steps": 8, "decay_style": "WSD", "wsd_decay_steps": 20},
    {"warmup_steps": 8, "decay_style": "WSD", "wsd_decay_steps": 72, "wsd_decay_style": "cosine"},
    {"warmup_steps": 5, "decay_style": "WSD", "wsd_decay_steps": 20, "decay_steps": 60,
     "wsd_decay_style": "minus_sqrt", "weight_decay": 0.05, "min_lr": 0.0},
]


@pytest.mark.parametrize("optim", LEGACY, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_legacy_fields(optim):
    """The phases resolved from the legacy fields reproduce megatron's scheduler with the
    same settings step for step, and so does the run's scheduler (lr and weight decay)."""
    cfg = _run_config(**optim)
    groups = [{"wd_mult": 1.0}, {"wd_mult": 0.0}]
    m_opt, o_opt = _optimizer(*groups), _optimizer(*groups)
    expected = _trace(_megatron_of_config(cfg, m_opt), m_opt, 100)
    ours = _trace(build_multi_phase_scheduler(cfg, o_opt), o_opt, 100)
    bad = [(k, e, o) for k, (e, o) in enumerate(zip(expected, ours))
           if not all(_close(a, b) for a, b in zip(e, o))]
    assert not bad, bad[:5]
    assert [g["weight_decay"] for g in o_opt.param_groups] == \
        [g["weight_decay"] for g in m_opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    r = resolve(cfg.resolved.schedule_config, 1)
    assert all(_close(r.lr_at(k), row[0]) for k, row in enumerate(expected))


def test_legacy_fields_refused_when_not_representable():
    with pytest.raises(ConfigError, match=r"optim.wsd_decay_style: megatron's 'exponential'"):
        _run_config(decay_style="WSD", wsd_decay_steps=20, wsd_decay_style="exponential")
    with pytest.raises(ConfigError, match=r"optim.wsd_decay_steps: .* inside the warmup"):
        _run_config(warmup_steps=10, decay_style="WSD", wsd_decay_steps=75)


# ---------------------------------------------------------------------- multi-phase


def _five_phase(**kw):
    return ScheduleConfig(peak_lr=1e-3, min_lr=1e-4, phases=[
        PhaseConfig(kind="warmup", steps=10, name="warm"),
        PhaseConfig(kind="constant", steps=20, name="stable-1"),
        PhaseConfig(kind="decay", steps=30, target_lr=4e-4, name="anneal-1"),
        PhaseConfig(kind="constant", steps=10, name="stable-2"),
        PhaseConfig(kind="decay", steps=30, target_lr=1e-4, shape="cosine", name="anneal-2"),
    ], **kw)


def test_multi_phase_boundaries():
    r = resolve(_five_phase())
    assert r.boundaries() == (0, 10, 30, 60, 70, 100)
    assert r.total_steps == 100
    expected = {0: 0.0, 5: 5e-4, 9: 9e-4, 10: 1e-3, 29: 1e-3, 30: 1e-3, 45: 7e-4, 59: 4.2e-4,
                60: 4e-4, 69: 4e-4, 70: 4e-4, 85: 2.5e-4, 100: 1e-4, 101: 1e-4, 10**7: 1e-4}
    for step, lr in expected.items():
        assert math.isclose(r.lr_at(step), lr, rel_tol=1e-12), (step, r.lr_at(step), lr)
    assert [r.phase_at(s).label for s in (0, 9, 10, 30, 60, 70, 99)] == \
        ["warm", "warm", "stable-1", "anneal-1", "stable-2", "anneal-2", "anneal-2"]
    assert r.phase_at(100) is None
    # Continuous at every boundary: one step never moves the LR more than the steepest phase.
    lrs = [r.lr_at(k) for k in range(110)]
    assert max(abs(b - a) for a, b in zip(lrs, lrs[1:])) <= 1e-4 + 1e-15
    # Monotone where it should be.
    assert lrs[:11] == sorted(lrs[:11]) and lrs[10:] == sorted(lrs[10:], reverse=True)
    with pytest.raises(ValueError):
        r.lr_at(-1)
    table = r.phases_table()
    assert "anneal-2" in table and "[70, 100)" in table and "cosine" in table


def test_decay_shapes_and_phase_options():
    cfg = ScheduleConfig(peak_lr=1.0, min_lr=0.01, phases=[
        PhaseConfig(kind="constant", steps=4),                                   # 1.0 (no warmup)
        PhaseConfig(kind="decay", steps=4, target_lr=0.36, shape="1-sqrt"),
        PhaseConfig(kind="warmup", steps=2, start_lr=0.2, lr=0.6),               # re-warmup
        PhaseConfig(kind="constant", steps=2, lr=0.5),
        PhaseConfig(kind="decay", steps=2, target_lr=0.02, shape="exponential"),
        PhaseConfig(kind="warmup", steps=2),                                     # 0 -> peak
    ])
    r = resolve(cfg)
    assert r.lr_at(0) == 1.0 and r.lr_at(3) == 1.0
    assert math.isclose(r.lr_at(5), 0.36 + 0.64 * (1 - math.sqrt(0.25)))
    assert math.isclose(r.lr_at(8), 0.2) and math.isclose(r.lr_at(9), 0.4)
    assert r.lr_at(10) == 0.5 and r.lr_at(11) == 0.5
    assert math.isclose(r.lr_at(13), 0.1)  # geometric midpoint of 0.5 and 0.02
    assert r.lr_at(14) == 0.0 and r.lr_at(15) == 0.5 and r.lr_at(16) == 1.0 and r.lr_at(99) == 1.0


def test_tokens_to_steps():
    cfg = ScheduleConfig(peak_lr=1e-3, phases=[
        PhaseConfig(kind="warmup", tokens=1000),   # ceil(1000/64) = 16
        PhaseConfig(kind="constant", tokens=1024),  # exactly 16 at 64/step, 8 at 128/step
        PhaseConfig(kind="decay", steps=5, target_lr=0.0),
        PhaseConfig(kind="constant", tokens=1),     # any positive amount is at least one step
    ])
    r = resolve(cfg, 64)
    assert [p.steps for p in r.phases] == [16, 16, 5, 1]
    assert (r.phases[0].tokens, r.phases[0].tokens_per_step) == (1000, 64)
    assert r.phases[2].tokens is None and r.phases[2].tokens_per_step is None

    calls = []

    def per_step(step):  # e.g. a longer-sequence stage from step 16 on
        calls.append(step)
        return 64 if step < 16 else 128

    r2 = resolve(cfg, per_step)
    assert calls == [0, 16, 29]  # evaluated at each token phase's first step
    assert [p.steps for p in r2.phases] == [16, 8, 5, 1]
    assert r2.boundaries() == (0, 16, 24, 29, 30)

    with pytest.raises(ConfigError, match=r"^phases\[0\]\.tokens: .*needs tokens_per_step"):
        resolve(cfg)
    with pytest.raises(ConfigError, match=r"^optim.schedule.phases\[1\]\.tokens: tokens_per_step "
                                          r"at step 16 is 0"):
        resolve(cfg, lambda s: 64 if s == 0 else 0, prefix="optim.schedule")


def test_weight_decay_schedule():
    base = dict(peak_lr=1.0, phases=[PhaseConfig(kind="constant", steps=100)])
    lin = resolve(ScheduleConfig(**base, weight_decay=WeightDecayConfig(start=0.0, end=0.1)))
    assert lin.wd_at(0) == 0.0 and math.isclose(lin.wd_at(50), 0.05)
    assert math.isclose(lin.wd_at(100), 0.1) and lin.wd_at(1000) == 0.1
    cos = resolve(ScheduleConfig(**base, weight_decay=WeightDecayConfig(
        start=0.1, end=0.0, style="cosine")))  # decreasing is allowed too
    assert cos.wd_at(0) == 0.1 and math.isclose(cos.wd_at(50), 0.05)
    assert math.isclose(cos.wd_at(25), 0.1 - 0.1 * 0.5 * (math.cos(0.75 * math.pi) + 1))
    const = resolve(ScheduleConfig(**base, weight_decay=WeightDecayConfig(start=0.1)))
    assert const.wd_style == "linear" and {const.wd_at(k) for k in (0, 50, 200)} == {0.1}
    assert lin.wd_at(50, start=0.2, end=0.4) == pytest.approx(0.3)  # per-group start/end_wd

    none = resolve(ScheduleConfig(**base))
    assert none.wd_at(5) is None
    opt = _optimizer({}, {"wd_mult": 0.0})
    MultiPhaseScheduler(opt, none, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    with pytest.raises(ValueError, match="has no weight_decay section"):
        MultiPhaseScheduler(_optimizer(), none)


def test_lr_mult_and_wd_mult():
    r = resolve(_five_phase(weight_decay=WeightDecayConfig(start=0.1)))
    opt = _optimizer({}, {"lr_mult": 0.5, "wd_mult": 0.0}, {"lr_mult": 2.0, "wd_mult": 0.25})
    sched = MultiPhaseScheduler(opt, r)
    for step in range(105):
        lr = r.lr_at(step)
        assert [g["lr"] for g in opt.param_groups] == [lr, lr * 0.5, lr * 2.0]
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1 * 0.25]
        sched.step(increment=1)


def test_inconsistent_default_group_is_refused():
    """A megatron group without LR overrides carries max_lr=config.lr; if that is not the
    schedule's peak the optimizer was built from other settings: refuse, do not rescale."""
    opt = _optimizer({"default_config": True, "max_lr": 1e-3, "min_lr": 1e-4})
    with pytest.raises(ValueError, match=r"param group 0 .* max_lr=0.001.* peak_lr=0.0003"):
        MultiPhaseScheduler(opt, resolve(_wsd("linear")), weight_decay=0.0)


# ---------------------------------------------------------------------------- resume


def test_state_dict_round_trip_any_step():
    r = resolve(_five_phase(weight_decay=WeightDecayConfig(start=0.0, end=0.1, style="cosine")))
    groups = [{}, {"lr_mult": 0.5, "wd_mult": 0.0}]
    ref_opt = _optimizer(*groups)
    reference = _trace(MultiPhaseScheduler(ref_opt, r), ref_opt, 110, key="lr")
    for stop in range(0, 106, 3):
        opt = _optimizer(*groups)
        first = MultiPhaseScheduler(opt, r)
        assert _trace(first, opt, stop) == reference[:stop]
        saved = json.loads(json.dumps(first.state_dict()))  # plain data, survives serialisation
        assert saved["num_steps"] == stop
        opt2 = _optimizer(*groups)
        resumed = MultiPhaseScheduler(opt2, resolve(_five_phase(
            weight_decay=WeightDecayConfig(start=0.0, end=0.1, style="cosine"))))
        resumed.step(increment=7)  # restore is absolute, not added to the current count
        resumed.load_state_dict(saved)
        assert resumed.num_steps == stop
        assert _trace(resumed, opt2, 110 - stop) == reference[stop:]
        assert [g["weight_decay"] for g in opt2.param_groups] == \
            [g["weight_decay"] for g in ref_opt.param_groups]


def test_changed_schedule_is_reported(caplog):
    old = MultiPhaseScheduler(_optimizer(), resolve(_five_phase()), weight_decay=0.1)
    old.step(increment=40)
    saved = old.state_dict()
    changed = _five_phase()
    changed.phases[2].steps = 40  # a longer first anneal
    with pytest.raises(ScheduleMismatchError, match=r"(?s)LR schedule changed since the checkpoint"
                                                    r".*step 40.*anneal-1.*\[30, 70\)"):
        MultiPhaseScheduler(_optimizer(), resolve(changed), weight_decay=0.1).load_state_dict(saved)

    opt = _optimizer()
    lenient = MultiPhaseScheduler(opt, resolve(changed), weight_decay=0.1,
                                  on_schedule_change="warn")
    with caplog.at_level(logging.WARNING, logger="phoenix.optim.schedule"):
        lenient.load_state_dict(saved)
    assert "LR schedule changed" in caplog.text
    assert lenient.num_steps == 40 and opt.param_groups[0]["lr"] == resolve(changed).lr_at(40)

    # Renaming a phase does not change the schedule.
    renamed = _five_phase()
    renamed.phases[0].name = "ramp"
    MultiPhaseScheduler(_optimizer(), resolve(renamed), weight_decay=0.1).load_state_dict(saved)

    # A checkpoint from megatron's scheduler (today's runs) is not silently taken over.
    m_opt = _optimizer()
    legacy = _megatron(m_opt, style="cosine").state_dict()
    with pytest.raises(ScheduleMismatchError, match="megatron's OptimizerParamScheduler"):
        MultiPhaseScheduler(_optimizer(), resolve(_five_phase()),
                            weight_decay=0.1).load_state_dict(legacy)


def test_resolve_is_deterministic_and_immutable():
    a, b = resolve(_five_phase(), 64), resolve(_five_phase(), 64)
    assert a == b and a.fingerprint() == b.fingerprint()
    assert isinstance(a.phases, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.phases[0].end_step = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.peak_lr = 1.0
    other = _five_phase()
    other.phases[4].shape = "linear"
    assert resolve(other).fingerprint() != a.fingerprint()


# ------------------------------------------------------------------------ validation

_W = {"kind": "warmup", "steps": 10}
_C = {"kind": "constant", "steps": 10}

BAD = [
    ([_W, {"kind": "constant", "steps": 5, "lr": 5e-4},
      {"kind": "decay", "steps": 5, "target_lr": 8e-4}],
     r"phases[2].target_lr: 0.0008 is above the LR at the start of the decay (0.0005)"),
    ([_W, {"kind": "decay", "steps": 5, "target_lr": 1e-5}],
     r"phases[1].target_lr: 1e-05 is below min_lr 0.0001"),
    ([_W, {"kind": "constant", "steps": 0}], r"phases[1].steps: must be > 0 (a phase cannot be empty)"),
    ([{"kind": "warmup", "tokens": 0}], r"phases[0].tokens: must be > 0"),
    ([{"kind": "warmup", "steps": 3, "tokens": 10}],
     r"phases[0].steps: give exactly one of 'steps' and 'tokens' (got both)"),
    ([{"kind": "warmup"}], r"phases[0].steps: give exactly one of 'steps' and 'tokens' (got neither)"),
    ([_W, {"kind": "decay", "steps": 5}], r"phases[1].target_lr: required for a decay phase"),
    ([{"kind": "constant", "steps": 5, "start_lr": 0.0}], r"phases[0].start_lr: only a warmup"),
    ([{"kind": "warmup", "steps": 5, "shape": "cosine"}], r"phases[0].shape: only a decay phase"),
    ([_W, {"kind": "decay", "steps": 5, "target_lr": 2e-4, "lr": 1e-3}],
     r"phases[1].lr: a decay phase starts at the LR reached so far"),
    ([_W, {"kind": "constant", "steps": 5, "lr": 2e-3}], r"phases[1].lr: 0.002 is above peak_lr 0.001"),
    ([_W, {"kind": "constant", "steps": 5, "lr": 1e-5}], r"phases[1].lr: 1e-05 is below min_lr 0.0001"),
    ([{"kind": "warmup", "steps": 5, "start_lr": 5e-4, "lr": 2e-4}],
     r"phases[0].start_lr: 0.0005 is above the LR the warmup rises to (0.0002)"),
    ([{"kind": "hold", "steps": 5}], r"phases[0].kind: 'hold' is not one of"),
    ([_C, {"kind": "decay", "steps": 5, "target_lr": 1e-4, "shape": "step"}],
     r"phases[1].shape: 'step' is not one of"),
    ([_W, {"kind": "constant", "steps": 5, "lenght": 3}],
     r"unknown config key 'phases[1].lenght'"),
    ([], r"phases: at least one phase is required"),
]


@pytest.mark.parametrize("phases,message", BAD, ids=range(len(BAD)))
@pytest.mark.parametrize("prefix", ["", "optim.schedule"])
def test_validation_errors(phases, message, prefix):
    data = {"peak_lr": 1e-3, "min_lr": 1e-4, "phases": phases}
    expected = f"{prefix}.{message}" if prefix and not message.startswith("unknown") else message
    if prefix and message.startswith("unknown"):
        expected = message.replace("'phases", f"'{prefix}.phases")
    with pytest.raises(ConfigError) as err:
        from_dict(ScheduleConfig, data, prefix)
    assert str(err.value).startswith(expected), str(err.value)


@pytest.mark.parametrize("data,message", [
    ({"peak_lr": 1e-3, "min_lr": 2e-3, "phases": [_C]}, "min_lr: 0.002 is above peak_lr 0.001"),
    ({"peak_lr": 0.0, "phases": [_C]}, "peak_lr: must be > 0, got 0.0"),
    ({"peak_lr": 1e-3, "phases": [_C], "weight_decay": {"start": 0.1, "end": 0.0,
                                                        "style": "constant"}},
     "weight_decay.end: a constant weight decay needs end == start"),
    ({"peak_lr": 1.0, "min_lr": 0.0, "phases": [_C, {"kind": "decay", "steps": 5, "target_lr": 0.0,
                                                      "shape": "exponential"}]},
     "phases[1].target_lr: an exponential decay needs target_lr > 0"),
    ({"phases": [_C]}, "missing required config key 'peak_lr'"),
])
def test_schedule_level_errors(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(ScheduleConfig, data)
    assert str(err.value).startswith(message), str(err.value)


def test_total_steps_mismatch():
    r = resolve(_wsd("linear"), total_steps=100)
    assert r.total_steps == 100
    with pytest.raises(ConfigError) as err:
        resolve(_wsd("linear"), total_steps=99, prefix="optim.schedule")
    assert str(err.value) == ("optim.schedule.phases: the phases add up to 100 steps "
                              "(warmup 10 + constant 60 + decay 30 = 100) but the run has 99 steps")


# --------------------------------------------------------------------------- lr-plot

SCHEDULE_YAML = """
peak_lr: 1e-3
min_lr: 1e-4
phases:
  - {kind: warmup, steps: 10, name: warm}
  - {kind: constant, tokens: 1000, name: stable}
  - {kind: decay, steps: 30, target_lr: 4e-4, shape: 1-sqrt, name: anneal-1}
  - {kind: constant, steps: 10}
  - {kind: decay, steps: 20, target_lr: 1e-4, shape: cosine, name: anneal-2}
"""


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_lr_plot_csv_and_png(tmp_path, capsys):
    from phoenix.cli.lr_plot import AFTER_END, load_schedule_yaml, main

    spec = tmp_path / "schedule.yaml"
    spec.write_text(SCHEDULE_YAML)
    out = tmp_path / "plot"
    assert main(["--schedule-yaml", str(spec), "--out", str(out), "--tokens-per-step", "64",
                 "--steps", "90"]) == 0
    r = resolve(load_schedule_yaml(spec), 64)
    assert r.boundaries() == (0, 10, 26, 56, 66, 86)
    rows = _read_csv(out / "lr.csv")
    assert [int(row["step"]) for row in rows] == list(range(90))
    assert all(float(row["lr"]) == r.lr_at(int(row["step"])) for row in rows)  # bit-exact
    labels = [row["phase"] for row in rows]
    assert labels[0] == "warm" and labels[26] == "anneal-1" and labels[56] == "constant"
    assert labels[85] == "anneal-2" and labels[86:] == [AFTER_END] * 4
    assert sorted(p.name for p in out.iterdir()) in (["lr.csv"], ["lr.csv", "lr.png"])  # no temps
    assert "[26, 56)" in capsys.readouterr().out

    # Overrides apply to the schedule file when no run config is given.
    assert main(["--schedule-yaml", str(spec), "--out", str(out), "--tokens-per-step", "64",
                 "phases[1].tokens=640"]) == 0
    assert len(_read_csv(out / "lr.csv")) == 10 + 10 + 30 + 10 + 20

    pytest.importorskip("matplotlib")
    png = out / "lr.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    from phoenix.cli.lr_plot import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    spec = tmp_path / "schedule.yaml"
    spec.write_text(yaml.safe_dump({"peak_lr": 1.0, "phases": [{"kind": "warmup", "steps": 4}]}))
    assert main(["--schedule-yaml", str(spec), "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["lr.csv"]
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_lr_plot_from_run_config(tmp_path):
    """From a recipe with the legacy optim fields: the CSV is what megatron's scheduler
    with those settings would use at each step."""
    from phoenix.config import load_config
    from phoenix.cli.lr_plot import main

    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"preset": "tiny"},
        "tokenizer": {"model": "unused"}, "data": {"seq_length": 64,
                                                   "datasets": [{"prefix": "unused"}]},
        "train": {"steps": 60, "global_batch_size": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 6, "decay_style": "WSD", "wsd_decay_steps": 20,
                  "wsd_decay_style": "minus_sqrt"}}))
    out = tmp_path / "plot"
    assert main([str(recipe), "--out", str(out), "train.steps=50"]) == 0
    rows = _read_csv(out / "lr.csv")
    opt = _optimizer()
    expected = [row[0] for row in _trace(_megatron_of_config(load_config(recipe, ["train.steps=50"]),
                                                             opt), opt, 50)]
    assert len(rows) == 50
    assert all(_close(float(row["lr"]), e) for row, e in zip(rows, expected))
    assert [rows[k]["phase"] for k in (0, 6, 30)] == ["warmup", "stable", "decay"]

    assert main([str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
