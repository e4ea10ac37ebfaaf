"""What a resume may change: every difference between the checkpoint's config and the
run's is either honoured exactly from the resume step on, or refused before any work.

The table (also in the README, "Resuming and changing a run"):

* **Honoured, no effect on what is trained**: ``name``, ``parallel.*`` (the checkpoint
  reshards), ``runtime.*``, ``logging.*``, ``eval``, ``checkpoint.*``,
  ``data.prefetch_batches``, ``data.cache_dir``, ``train.micro_batch_size`` (same global
  batches), ``train.stop_at_step``, ``train.on_nonfinite_loss``, ``train.precision``,
  and the performance switches (``model.attention_backend``, ``model.fusions``,
  ``model.recompute``; the ``parallel`` overlaps): kernels that compute the same math to
  floating-point rounding (recompute: the same math, activations kept or recomputed).
* **Honoured from the resume step**: Adam's ``optim.adam_beta1``, ``adam_beta2``,
  ``adam_eps``, ``optim.clip_grad`` and a constant ``optim.weight_decay`` (the loaded
  optimizer's param groups take this run's values; a checkpoint load would otherwise
  bring the old ones back); how samples are presented (``data.document_mask``,
  ``data.eod_mask_loss``); fp8 (``train.fp8``: the GEMMs round more). Each such change
  is logged and appended to ``<output_dir>/config_changes.jsonl``.
* **The LR schedule** (``optim.lr``, ``min_lr``, ``warmup_steps``, ``decay_*``,
  ``wsd_*``, ``optim.schedule``, the stages' ``lr``, ``train.steps``): honoured when the
  new schedule gives the same LR and weight decay at every step already trained (e.g. a
  decay phase or stage appended, a later phase changed), so ``phoenix lr-plot`` of the
  run's ``config.yaml`` is what was applied at every step; refused otherwise.
* **The data of a stage that has begun** (its mixture, bursts, groups, batch size,
  sequence length or length): honoured from the resume step as an implicit stage
  boundary that continues every dataset's stream where the run had left it
  (phoenix.data.data_resume); a dataset read at a new ``seq_length`` first reads the rest
  of its current epoch re-cut at that length (phoenix.data.stream_recut). Refused where
  no exact continuation exists: a whole-group dataset read mid-stage, a step inside a
  mixture warmup, a change of a dataset's cut in mid-epoch that cannot be continued (a
  change of grouping, ``pack_groups`` with a new length, a grouped stream stopped inside
  a group, a second re-cut inside one epoch) (these reported when the data is planned), ``train.seed``, a dataset's prefix or name, ``data.sampler``, a begun stage
  moved or removed. Stages that begin after the resume step may change freely.
* **``train.skip_batches``**: honoured when it skips the same steps up to the resume step
  (ranges added, moved or removed after it), recorded in ``config_changes.jsonl``;
  refused when it would change which steps already trained or skipped were skipped.
* **RoPE** (``model.rope``, the stages' ``rope``): honoured from the resume step (a
  context-extension step; RoPE frequencies are not part of the weights), logged and
  recorded in ``config_changes.jsonl``; ``checkpoint.init_from`` records them too.
* **The rest of the model and the tokenizer** (``model.*``, ``tokenizer.model``),
  ``optim.freeze`` and ``optim.param_groups`` (the optimizer state is laid out by them):
  refused; use ``checkpoint.init_from`` to continue from the weights under a new setup.

A refusal lists every refused key with its old and new value and says how to make the
change properly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phoenix.config import ConfigError, RunConfig, to_dict
from phoenix.config.loader import load_saved_config
from phoenix.config.skip import merged_ranges, skipped_steps

# Top-level prefixes whose changes are honoured with no effect on what is trained.
_FREE = ("name", "output_dir", "parallel.", "runtime.", "logging.", "eval", "checkpoint.",
         "data.prefetch_batches", "data.cache_dir", "train.micro_batch_size",
         "train.stop_at_step", "train.time_limit_minutes", "train.on_nonfinite_loss",
         "train.precision", "model.attention_backend", "model.fusions",
         "model.recompute")
# Optimizer settings re-applied to the loaded param groups.
_OPTIMIZER = ("optim.adam_beta1", "optim.adam_beta2", "optim.adam_eps", "optim.clip_grad",
              "optim.weight_decay")
# How samples are presented to the model (not which samples): honoured from the resume step.
_MODEL_INPUTS = ("data.document_mask", "data.eod_mask_loss", "data.dense_mask_max_seq_length")
# fp8 GEMMs: the same model, rounded more coarsely; honoured from the resume step, recorded.
_PRECISION = ("train.fp8",)
# The LR schedule: judged by the resolved schedule at the steps already trained.
_SCHEDULE = ("optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.decay_style",
             "optim.decay_steps", "optim.wsd_decay_steps", "optim.wsd_decay_style",
             "optim.schedule", "train.steps", "model.reference_lr")
# RoPE: not in the weights; a change is a context-extension step, honoured and recorded.
_ROPE = ("model.rope",)
# Refused outright, by group (model.reference_lr is a schedule key, judged above them).
_REFUSED = ("model", "tokenizer", "optim.freeze", "optim.param_groups")
_REFUSED_HOW = {
    "model": "the weights were trained for the old model; start a new run from them with "
             "checkpoint.init_from",
    "tokenizer": "the embeddings belong to the old tokenizer; see checkpoint.init_from",
    "optim.freeze": "the optimizer state is laid out by these groups; change them with "
                    "checkpoint.init_from (init_optimizer: false)",
    "optim.param_groups": "the optimizer state is laid out by these groups; change them with "
                          "checkpoint.init_from (init_optimizer: false)",
    "data": "these cannot change under a running stream; keep them, add a stage that "
            "begins after the resume step (stages:), or start a new run from the weights "
            "with checkpoint.init_from",
    "skip_batches": "steps up to the resume step were already trained or skipped; keep their "
                    "ranges and add or change only steps after the resume step",
    "schedule": "the LR of steps already trained would differ from the record; change only "
                "steps after the resume step (append or edit later phases or stages), or use "
                "checkpoint.init_from",
}


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        old, new = readable_pair(self.old, self.new)
        return f"{self.key}: {old} -> {new}"


def readable_pair(a: Any, b: Any) -> tuple[str, str]:
    """``a`` and ``b`` for a message: floats with as few significant digits as tell them
    apart (0.0003, not 0.00030000000000000003, which is the same LR to a user), else repr."""
    if not (isinstance(a, float) or isinstance(b, float)) or isinstance(a, bool) \
            or isinstance(b, bool) or not all(isinstance(v, (int, float)) for v in (a, b)):
        return repr(a), repr(b)
    for digits in range(6, 18):
        x, y = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if (x != y) == (a != b):
            return x, y
    return repr(a), repr(b)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


def config_changes(old: RunConfig, new: RunConfig) -> list[ConfigChange]:
    """Every leaf key whose value differs between two configs (added/removed keys too)."""
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    missing = object()
    return [ConfigChange(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".")
               or key.startswith(p + "[") for p in prefixes)


def _is_rope(key: str) -> bool:
    return _matches(key, _ROPE) or key.startswith("stages[") and ".rope" in key


def rope_changes(checkpoint: Path, cfg: RunConfig) -> list[ConfigChange]:
    """``checkpoint.init_from``: how ``cfg``'s RoPE differs from the one the source was
    trained with (empty when equal or when the source has no readable config)."""
    try:
        old = load_saved_config(checkpoint / "config.yaml")
    except (ConfigError, OSError):
        return []
    return [c for c in config_changes(old, cfg) if _is_rope(c.key) and c.old != c.new]


def _runs(steps) -> str:
    return ", ".join(f"{a}..{b}" for a, b in merged_ranges(steps)) or "none"


def _schedule_differs(old: RunConfig, new: RunConfig, steps: int) -> str | None:
    """How the LR or scheduled weight decay of the first step before ``steps`` that
    differs changes, else None (a constant weight decay is an optimizer setting)."""
    a, b = old.resolved.schedule, new.resolved.schedule
    if a.fingerprint() == b.fingerprint():
        return None
    scheduled_wd = _scheduled_wd(old) or _scheduled_wd(new)
    for k in range(steps):
        if a.lr_at(k) != b.lr_at(k):
            new, old_lr = readable_pair(b.lr_at(k), a.lr_at(k))
            return f"step {k} would have been trained with LR {new} instead of {old_lr}"
        if scheduled_wd and a.wd_at(k) != b.wd_at(k):
            new, old_wd = readable_pair(b.wd_at(k), a.wd_at(k))
            return f"step {k} would have been trained with weight decay {new} instead of {old_wd}"
    return None


def _scheduled_wd(cfg: RunConfig) -> bool:
    """Whether the weight decay is scheduled (``optim.schedule.weight_decay``) rather than
    the constant ``optim.weight_decay``, an optimizer setting honoured from the resume step."""
    return cfg.optim.schedule is not None and cfg.optim.schedule.weight_decay is not None


def _data_changes(old: RunConfig, new: RunConfig, step: int) -> tuple[list[str], list[str]]:
    """(changes to the data of stages begun before ``step``, which an implicit stage
    boundary at ``step`` honours; changes no boundary can honour)."""
    changed, refused = [], []
    names_a, names_b = old.resolved.stages.dataset_names, new.resolved.stages.dataset_names
    new_by_name = {s.name: s for s in new.resolved.stages.stages}
    for s in old.resolved.stages.stages:
        if s.start_step >= step:
            continue
        n = new_by_name.get(s.name)
        if n is None or n.start_step != s.start_step:
            where = (f"starts it at step {n.start_step}" if n is not None
                     else "has no stage of that name")
            refused.append(f"the checkpoint began stage '{s.name}' at step {s.start_step} but "
                           f"the config {where}; a stage that has begun cannot be moved or removed")
            continue
        label = f"stage '{s.name}'" if old.resolved.stages.explicit else "the run (no stages:)"
        for f, key in (("end_step", "length (train.steps or the stage's steps)"),
                       ("global_batch_size", "global_batch_size"), ("seq_length", "seq_length"),
                       ("weights", "mixture (normalised weights)"), ("min_share", "min_share"),
                       ("group_mode", "group_mode"), ("warmup_steps", "mixture_warmup_steps"),
                       ("warmup_from", "mixture warmup start"), ("data_seed", "data_seed")):
            a, b = getattr(s, f), getattr(n, f)
            if f in ("weights", "warmup_from") and a is not None and b is not None:
                a = {k: round(float(w), 6) for k, w in zip(names_a, a) if w}
                b = {k: round(float(w), 6) for k, w in zip(names_b, b) if w}
            elif f in ("min_share", "group_mode"):
                a, b = dict(zip(names_a, a)), dict(zip(names_b, b))
            if a != b:
                changed.append(f"{label} {key}: {a} -> {b}")
    # A dataset's stream is its samples permuted by (seed, name): those must stay.
    # Its samples are those of (prefix, min_document_tokens): a long-document view of a
    # prefix is another dataset than the prefix itself.
    by_source_a = {d.source: d.display_name for d in old.data.datasets}
    for d in new.data.datasets:
        if d.source in by_source_a and by_source_a[d.source] != d.display_name:
            refused.append(f"dataset {d.source_label} renamed: '{by_source_a[d.source]}' -> "
                           f"'{d.display_name}' (its stream is keyed by the name)")
    sources_a = {d.display_name: d for d in old.data.datasets}
    for d in new.data.datasets:
        a = sources_a.get(d.display_name, d)
        if a.prefix != d.prefix:
            refused.append(f"dataset '{d.display_name}' prefix: {a.prefix} -> {d.prefix}")
        elif a.min_document_tokens != d.min_document_tokens:
            refused.append(f"dataset '{d.display_name}' min_document_tokens: "
                           f"{a.min_document_tokens} -> {d.min_document_tokens}")
        elif a.pack_groups != d.pack_groups:  # another cut into samples: another stream
            refused.append(f"dataset '{d.display_name}' pack_groups: "
                           f"{a.pack_groups} -> {d.pack_groups}")
    for key, a, b in (("train.seed", old.train.seed, new.train.seed),
                      ("data.sampler", old.data.sampler, new.data.sampler)):
        if a != b:
            refused.append(f"{key}: {a!r} -> {b!r}")
    if changed and new.data.sampler != "plan":
        refused += [c + " (megatron's sampler has no stage plans to continue)" for c in changed]
        changed = []
    return changed, refused


@dataclass(frozen=True)
class ResumeDecision:
    honoured: list[ConfigChange]
    """Changes applied from the resume step on (logged and recorded)."""
    old: RunConfig
    """The config the checkpoint was trained with."""
    data_changed: list[str]
    """Changes to the data of begun stages: honoured by an implicit stage boundary at the
    resume step (phoenix.data.data_resume); empty when the data plan is unchanged."""


def check_resume(checkpoint: Path, cfg: RunConfig, step: int) -> ResumeDecision:
    """Compare the config saved in ``checkpoint`` (at ``step``) with ``cfg``; raise
    ConfigError listing every refused change, else return the honoured ones."""
    saved = checkpoint / "config.yaml"
    try:
        old = load_saved_config(saved)
    except (ConfigError, OSError) as e:
        raise ConfigError(f"checkpoint.resume: cannot read the config {saved} the checkpoint was "
                          f"trained with ({e})") from None
    changes = config_changes(old, cfg)
    refused: dict[str, list[str]] = {}
    honoured = []
    schedule_diff = _schedule_differs(old, cfg, step)
    data_changed, data_problems = _data_changes(old, cfg, step)
    for c in changes:
        if _matches(c.key, _FREE):
            continue
        if _matches(c.key, _OPTIMIZER + _MODEL_INPUTS + _PRECISION) or _is_rope(c.key) and c.old != c.new:
            honoured.append(c)
        elif _is_rope(c.key):
            continue  # a stage appended without a rope of its own
        elif c.key == "train.skip_batches":  # the steps up to the resume step are history
            past = skipped_steps(c.old or [], step), skipped_steps(c.new or [], step)
            if past[0] != past[1]:
                refused["skip_batches"] = [f"{c} changes which of steps 1..{step} were skipped "
                                           f"(now {_runs(past[0])}, would be {_runs(past[1])})"]
            else:
                honoured.append(c)
        elif _matches(c.key, _SCHEDULE) or c.key.startswith("stages[") and ".lr" in c.key:
            if schedule_diff is not None:
                refused.setdefault("schedule", []).append(str(c))
            else:  # only steps after the resume step change: logged and recorded
                honoured.append(c)
        elif (group := next((g for g in _REFUSED if _matches(c.key, (g,))), None)) is not None:
            refused.setdefault(group, []).append(str(c))
        elif _matches(c.key, ("data", "stages", "train.global_batch_size", "train.seed")):
            pass  # judged below, by what the begun stages read
        else:
            refused.setdefault("other", []).append(str(c))
    if schedule_diff is not None:
        refused.setdefault("schedule", []).append(schedule_diff)
    if data_problems:
        refused["data"] = data_problems
    if refused:
        lines = []
        for group, items in refused.items():
            how = _REFUSED_HOW.get(group, "resume with the checkpoint's value")
            lines.append(f"  {group}: " + "; ".join(items) + f"\n    -> {how}")
        raise ConfigError(
            f"checkpoint.resume: the config differs from the one checkpoint {checkpoint} (step "
            f"{step}) was trained with, in ways a resume cannot honour:\n" + "\n".join(lines))
    return ResumeDecision(honoured=honoured, old=old, data_changed=data_changed)


def record_changes(output_dir: str | os.PathLike, step: int, changes: list[ConfigChange]) -> None:
    """Append the honoured changes of a resume to ``<output_dir>/config_changes.jsonl``."""
    if not changes:
        return
    line = json.dumps({"step": step, "changes": {c.key: [c.old, c.new] for c in changes}},
                      default=str)
    with open(Path(output_dir) / "config_changes.jsonl", "a") as f:
        f.write(line + "\n")
