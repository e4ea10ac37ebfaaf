"""A recipe's stages placed on the step axis: the stage table.

Everything here is a pure function of the config, checked when the config is loaded, so
a recipe with a mistake fails before any process starts. A run without ``stages:`` is
one stage built from ``data.datasets`` and the ``train`` section, so the trainer and the
data source treat every run the same way.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from phoenix.config.rope import RopeConfig
from phoenix.config.typed import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedStage:
    """A stage on the step axis: it covers optimizer steps ``[start_step, end_step)``."""

    index: int
    name: str
    start_step: int
    end_step: int
    start_sample: int
    """Global position of the stage's first sample (samples of earlier stages before it)."""
    global_batch_size: int
    seq_length: int
    weights: tuple[Fraction, ...]
    """Normalised weight of every dataset of ``data.datasets`` (0: not read), replay expanded."""
    min_share: tuple[float, ...]
    group_mode: tuple[str, ...]
    warmup_steps: int = 0
    """Mixture warmup: the first N steps move from ``warmup_from`` to ``weights``."""
    warmup_from: Optional[tuple[Fraction, ...]] = None
    tokens: Optional[int] = None
    """Requested length in tokens (None when given in steps)."""
    rope: Optional[RopeConfig] = None
    """The stage's rotary embedding: its own ``rope``, else ``model.rope`` (None with
    learned absolute positions)."""
    data_seed: Optional[int] = None
    """The seed of its datasets' sample order: the latest ``data_seed`` of this stage or an
    earlier one (None: ``train.seed``; see phoenix.data.stream_recut)."""

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


class StageTable:
    """The stages of a run, in order, covering steps ``[0, total_steps)``."""

    def __init__(self, stages: list[ResolvedStage], dataset_names: list[str], explicit: bool):
        self.stages = stages
        self.dataset_names = dataset_names
        self.explicit = explicit
        """True when the config has a ``stages:`` list (False: one implicit stage)."""
        self._starts = [s.start_step for s in stages]

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    def __len__(self) -> int:
        return len(self.stages)

    def stage_at(self, step: int) -> ResolvedStage:
        """The stage that contains optimizer step ``step`` (the last one past the end)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.stages[max(0, bisect.bisect_right(self._starts, step) - 1)]

    def batch_size(self, step: int) -> int:
        return self.stage_at(step).global_batch_size

    def tokens_per_step(self, step: int) -> int:
        return self.stage_at(step).tokens_per_step

    def batch_start(self, step: int) -> int:
        """Global position of the first sample of global batch ``step``."""
        s = self.stage_at(step)
        return s.start_sample + (step - s.start_step) * s.global_batch_size

    def samples_before(self, step: int) -> int:
        """Samples consumed by steps ``[0, step)``."""
        if step >= self.total_steps:
            last = self.stages[-1]
            return last.start_sample + last.steps * last.global_batch_size
        return self.batch_start(step)

    def boundaries(self) -> list[tuple[str, int]]:
        """(name, start step) of every stage."""
        return [(s.name, s.start_step) for s in self.stages]

    def describe(self) -> str:
        """Human-readable table of the stages and their mixtures."""
        rows = [("#", "stage", "steps [start, end)", "batch x seq", "mixture")]
        for s in self.stages:
            mix = ", ".join(f"{n} {float(w):.3f}" for n, w in zip(self.dataset_names, s.weights) if w)
            if s.warmup_steps:
                mix += f" (warmup {s.warmup_steps} steps)"
            rows.append((str(s.index), s.name, f"[{s.start_step}, {s.end_step})",
                         f"{s.global_batch_size} x {s.seq_length}", mix))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _normalised(weights: list[Fraction], key: str) -> list[Fraction]:
    total = sum(weights)
    if total <= 0:
        raise ConfigError(f"{key}: the weights sum to zero")
    return [w / total for w in weights]


def build_stage_table(cfg) -> StageTable:
    """Resolve ``cfg.stages`` (or the implicit single stage) into a StageTable.

    Raises ConfigError naming ``stages[i].key`` for every mistake a recipe can make.
    """
    pool = cfg.data.datasets
    names = [d.display_name for d in pool]
    default_B, default_seq = cfg.train.global_batch_size, cfg.data.seq_length
    if not cfg.stages:
        steps = cfg.train.steps
        if steps is None:
            raise ConfigError("train.steps: required (or give the run's stages)")
        stage = ResolvedStage(
            index=0, name="main", start_step=0, end_step=steps, start_sample=0,
            global_batch_size=default_B, seq_length=default_seq,
            weights=tuple(_normalised([Fraction(d.weight) for d in pool], "data.datasets")),
            min_share=tuple(d.min_share for d in pool), group_mode=tuple(d.group_mode for d in pool),
            rope=cfg.model.rope)
        _check_rope_coverage(stage, cfg.model.max_seq_length, "data.seq_length")
        return StageTable([stage], names, explicit=False)

    if cfg.data.sampler != "plan":
        raise ConfigError("stages: multi-stage runs need data.sampler: plan (megatron's blend "
                          "has one fixed mixture)")
    resolved: list[ResolvedStage] = []
    by_name: dict[str, ResolvedStage] = {}
    step = sample = 0
    data_seed = None
    for i, stage in enumerate(cfg.stages):
        key = f"stages[{i}]"
        name = stage.name or f"stage{i + 1}"
        if name in by_name:
            raise ConfigError(f"{key}.name: '{name}' is used by an earlier stage; stage names "
                              f"must be unique")
        B = stage.global_batch_size or default_B
        seq = stage.seq_length or default_seq
        if seq > cfg.model.max_seq_length:
            raise ConfigError(f"{key}.seq_length: {seq} exceeds model.max_seq_length "
                              f"{cfg.model.max_seq_length}")
        steps = stage.steps if stage.steps is not None else -(-stage.tokens // (B * seq))
        if stage.rope is not None and cfg.model.position_embedding != "rope":
            raise ConfigError(f"{key}.rope: set, but model.position_embedding is "
                              f"{cfg.model.position_embedding}")
        rope = stage.rope or cfg.model.rope

        weights = [Fraction(0)] * len(pool)
        min_share = [d.min_share for d in pool]
        group_mode = [d.group_mode for d in pool]
        for dataset, entry in stage.entries().items():
            if dataset not in names:
                raise ConfigError(f"{key}.mixture.{dataset}: unknown dataset (data.datasets has: "
                                  f"{', '.join(names)})")
            d = names.index(dataset)
            weights[d] = Fraction(entry.weight)
            if entry.min_share is not None:
                min_share[d] = entry.min_share
            if entry.group_mode is not None:
                group_mode[d] = entry.group_mode
        weights = _normalised(weights, f"{key}.mixture")

        if stage.replay is not None:
            replayed = _replayed_stage(stage.replay.stage, resolved, by_name, f"{key}.replay")
            x = Fraction(stage.replay.fraction)
            weights = [x * r + (1 - x) * w for r, w in zip(replayed.weights, weights)]
            # Datasets read only because of the replay keep the replayed stage's settings.
            listed = set(stage.mixture)
            for d, dataset in enumerate(names):
                if replayed.weights[d] and dataset not in listed:
                    min_share[d], group_mode[d] = replayed.min_share[d], replayed.group_mode[d]

        warmup = stage.mixture_warmup_steps
        if warmup:
            if not resolved:
                raise ConfigError(f"{key}.mixture_warmup_steps: the first stage has no previous "
                                  f"mixture to warm up from")
            if warmup >= steps:
                raise ConfigError(f"{key}.mixture_warmup_steps: {warmup} is not shorter than the "
                                  f"stage ({steps} steps)")
        data_seed = stage.data_seed if stage.data_seed is not None else data_seed
        if data_seed is not None and data_seed != cfg.train.seed:
            for d, dataset in enumerate(names):
                if weights[d] and group_mode[d] == "batch":
                    raise ConfigError(
                        f"{key}: dataset '{dataset}' is read whole-group (group_mode: batch) under "
                        f"data_seed {data_seed} (set by this or an earlier stage); reshuffling "
                        f"whole groups is not supported: read it with group_mode: none here, or "
                        f"keep train.seed's order")
        current = ResolvedStage(
            index=i, name=name, start_step=step, end_step=step + steps, start_sample=sample,
            global_batch_size=B, seq_length=seq, weights=tuple(weights),
            min_share=tuple(min_share), group_mode=tuple(group_mode), warmup_steps=warmup,
            warmup_from=resolved[-1].weights if warmup else None, tokens=stage.tokens, rope=rope,
            data_seed=data_seed)
        _check_rope_coverage(current, cfg.model.max_seq_length, f"{key}.seq_length")
        resolved.append(current)
        by_name[name] = current
        step += steps
        sample += steps * B

    if cfg.train.steps is not None and cfg.train.steps != step:
        terms = " + ".join(f"{s.name} {s.steps}" for s in resolved)
        raise ConfigError(f"stages: the stages add up to {step} steps ({terms}) but train.steps "
                          f"is {cfg.train.steps}; fix one (or leave train.steps out)")
    return StageTable(resolved, names, explicit=True)


def _check_rope_coverage(stage: ResolvedStage, max_seq_length: int, key: str) -> None:
    """Warn (not refuse: a short extrapolation can be deliberate) when a stage trains on
    sequences longer than its RoPE scaling is meant for."""
    if stage.rope is None:
        return
    covered = stage.rope.covered_length(max_seq_length)
    if stage.seq_length > covered:
        log.warning("%s: stage '%s' trains on %d tokens per sample, beyond the %d its rope "
                    "%s covers; raise rope.factor (or the base) for this stage",
                    key, stage.name, stage.seq_length, covered, stage.rope.describe())


def _replayed_stage(name: Optional[str], resolved: list[ResolvedStage],
                    by_name: dict[str, ResolvedStage], key: str) -> ResolvedStage:
    if not resolved:
        raise ConfigError(f"{key}: the first stage has no earlier stage to replay")
    if name is None:
        return resolved[-1]
    if name not in by_name:
        earlier = ", ".join(by_name) or "none"
        raise ConfigError(f"{key}.stage: '{name}' is not an earlier stage (earlier: {earlier})")
    return by_name[name]


def stage_lr_phases(cfg, table: StageTable) -> Optional[list]:
    """The LR phases of all stages back to back (labels ``stage/phase``), or None when the
    stages give no ``lr``. ``table`` is ``cfg``'s stage table. Checks that each stage's
    phases cover exactly that stage."""
    import dataclasses

    if not cfg.stages:
        return None
    given = [s.lr is not None for s in cfg.stages]
    if not any(given):
        return None
    if not all(given):
        missing = given.index(False)
        raise ConfigError(f"stages[{missing}].lr: missing; when one stage gives its LR phases "
                          f"every stage must (stages[{given.index(True)}] does)")
    phases = []
    for i, (stage, resolved) in enumerate(zip(cfg.stages, table.stages)):
        lengths = []
        for j, p in enumerate(stage.lr):
            if p.steps is not None:
                lengths.append(p.steps)
            else:  # a stage has one batch size and sequence length
                lengths.append(-(-p.tokens // resolved.tokens_per_step))
        total = sum(lengths)
        if total != resolved.steps:
            terms = " + ".join(f"{p.label} {n}" for p, n in zip(stage.lr, lengths))
            gap = (f"a gap of {resolved.steps - total} steps before the next stage"
                   if total < resolved.steps else f"overlapping the next stage by "
                   f"{total - resolved.steps} steps")
            raise ConfigError(f"stages[{i}].lr: the phases add up to {total} steps ({terms}) but "
                              f"stage '{resolved.name}' has {resolved.steps} steps ({gap})")
        for p, n in zip(stage.lr, lengths):
            phases.append(dataclasses.replace(p, steps=n, tokens=None,
                                              name=f"{resolved.name}/{p.label}"))
    return phases
