"""Per-parameter LR multipliers and temporary freezing, chosen by parameter-name pattern.

Two continual-pretraining options, on megatron-core's param-group overrides:

* ``ParamGroupRule``: parameters whose name matches one of its patterns train with the
  schedule's LR x ``lr_mult`` (e.g. new embedding rows at x2). Rules are tried in
  config order and the first one that matches a parameter wins.
* ``FreezeConfig``: matching parameters get no update for optimizer steps
  ``0..steps-1`` and train normally from step ``steps`` on (e.g. "everything but the
  embeddings for the first 200 steps" after a vocabulary extension).

Names are *global* parameter names, so a pattern means the same at every pipeline
layout: the DDP / fp16 wrapper prefix (``module.``) is dropped and a transformer layer
is addressed by its global index (megatron names the first layer of every pipeline
stage ``decoder.layers.0``). Examples: ``embedding.word_embeddings.weight``,
``decoder.layers.3.mlp.linear_fc1.weight``, ``decoder.final_layernorm.weight``,
``output_layer.weight``. The last stage's copy of a tied embedding is named
``embedding.word_embeddings.weight`` too, as it is the same weight. Patterns are
``fnmatch`` globs, case-sensitive; ``*`` also matches dots, so ``decoder.layers.1*``
matches layers 1 and 10-19 while ``decoder.layers.1.*`` matches layer 1 only.

Both become megatron param-group overrides (``build_config_overrides``): ``lr_mult``
for the multipliers, ``frozen_steps`` for frozen parameters. The multi-phase scheduler
(``phoenix.optim.schedule.MultiPhaseScheduler``) applies both; megatron-core 0.16's own
scheduler ignores them. A frozen parameter also needs its (already reduced) gradient
zeroed before each optimizer step of the freeze (``zero_frozen_grads``), so that the
global grad norm, clipping and Adam's moments see only the trained parameters; its LR
of 0 keeps the decoupled weight decay from moving it.

Adam's step counter of a frozen parameter still advances during the freeze (its
gradient is zero, not absent, and its moments stay exactly zero), so after the freeze
its bias correction is that of moments that started ``steps`` steps earlier, not a
fresh Adam's: after a long freeze the first update is about ``(1 - beta1) /
sqrt(1 - beta2)`` times a fresh one (0.45 for betas (0.9, 0.95), 3.2 for (0.9, 0.999)),
settling over roughly ``1 / (1 - beta2)`` steps.
"""

from __future__ import annotations

import logging
import re
from fnmatch import fnmatchcase
from typing import Iterable, Optional, Sequence

import torch

from phoenix.config.optim import FreezeConfig, ParamGroupRule, matches_any
from phoenix.config.typed import ConfigError
from phoenix.model import unwrap

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- names


_LAYER_MODULE = re.compile(r"^(?P<stack>(?:.*\.)?layers)\.(?P<index>\d+)$")
_EMBEDDING = "embedding.word_embeddings.weight"


def global_param_names(model_chunks) -> dict[int, str]:
    """``id(param) -> global name`` for every parameter of this rank's model chunks.

    A transformer layer's local index is replaced by ``layer_number - 1`` (megatron's
    1-based global layer number); a tied output weight on a stage without the input
    embedding is named after the embedding it duplicates.
    """
    names: dict[int, str] = {}
    for chunk in model_chunks:
        model = unwrap(chunk)
        local = dict(model.named_parameters())
        for module_name, module in model.named_modules():
            match = _LAYER_MODULE.match(module_name)
            number = getattr(module, "layer_number", None)
            if match is None or not isinstance(number, int):
                continue
            prefix = f"{match['stack']}.{number - 1}"
            for name, param in module.named_parameters(prefix=prefix):
                names.setdefault(id(param), name)
        for name, param in local.items():
            if getattr(param, "shared_embedding", False) and name != _EMBEDDING:
                names[id(param)] = _EMBEDDING
            names.setdefault(id(param), name)
    return names


def _trainable(model_chunks) -> list[tuple[str, torch.nn.Parameter]]:
    names = global_param_names(model_chunks)
    out, seen = [], set()
    for chunk in model_chunks:
        for param in unwrap(chunk).parameters():
            if param.requires_grad and id(param) not in seen:  # megatron skips the others
                seen.add(id(param))
                out.append((names[id(param)], param))
    return out


def _first_rule(named, rules: Sequence[ParamGroupRule]) -> list[Optional[int]]:
    """Index of the first rule matching each parameter (None: no rule)."""
    return [next((i for i, r in enumerate(rules) if matches_any(name, r.params)), None)
            for name, _ in named]


# ----------------------------------------------------------------------------- checks


_LAYER_NAME = re.compile(r"\.layers\.(\d+)\.")


def _examples(names: Iterable[str]) -> set[str]:
    """Names outside layers plus those of the lowest-numbered layer: what names look like."""
    names = set(names)
    layers = [int(m.group(1)) for n in names if (m := _LAYER_NAME.search(n))]
    first = min(layers, default=None)
    return {n for n in names if (m := _LAYER_NAME.search(n)) is None or int(m.group(1)) == first}


def _summary(named, rules, freeze, owner) -> dict:
    """This rank's part of the pattern checks: counts and a few names, never all names."""
    names = [n for n, _ in named]
    hits = {}
    for i, rule in enumerate(rules):
        for j, pattern in enumerate(rule.params):
            hits[("rule", i, j)] = sum(fnmatchcase(n, pattern) for n in names)
    if freeze is not None:
        for key in ("params", "exclude"):
            for j, pattern in enumerate(getattr(freeze, key)):
                hits[(key, j)] = sum(fnmatchcase(n, pattern) for n in names)
    frozen = [n for n in names if freeze is not None and freeze.freezes(n)]
    return {
        "hits": hits,
        "owned": [sum(o == i for o in owner) for i in range(len(rules))],
        "rule_names": [sorted(n for n, o in zip(names, owner) if o == i)[:4]
                       for i in range(len(rules))],
        "frozen": len(frozen),
        "trained": len(names) - len(frozen),
        "trained_names": sorted(set(names) - set(frozen))[:5],
        "examples": sorted(_examples(names)),
        "layers": sorted({int(m.group(1)) for n in names if (m := _LAYER_NAME.search(n))}),
    }


def _gather(obj) -> list:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _check(summaries: list[dict], rules, freeze, rules_key: str, freeze_key: str) -> None:
    """Raise the same ConfigError on every rank (all see the same summaries)."""
    hits = {k: sum(s["hits"][k] for s in summaries) for k in summaries[0]["hits"]}
    looks_like = _looks_like(summaries)
    for i, rule in enumerate(rules):
        of_rule = f" (rule {rule.name!r})" if rule.name else ""
        for j, pattern in enumerate(rule.params):
            if hits[("rule", i, j)] == 0:
                raise ConfigError(f"{rules_key}[{i}].params[{j}]: pattern {pattern!r}{of_rule} "
                                  f"matches no parameter {looks_like}")
        if sum(s["owned"][i] for s in summaries) == 0:
            raise ConfigError(f"{rules_key}[{i}]{of_rule}: every parameter it matches is taken by "
                              f"an earlier rule (the first matching rule wins), so it has no "
                              f"effect")
    if freeze is None:
        return
    for key in ("params", "exclude"):
        for j, pattern in enumerate(getattr(freeze, key)):
            if hits[(key, j)] == 0:
                raise ConfigError(f"{freeze_key}.{key}[{j}]: pattern {pattern!r} matches no "
                                  f"parameter {looks_like}")
    if sum(s["frozen"] for s in summaries) == 0:
        raise ConfigError(f"{freeze_key}: every parameter that {freeze_key}.params matches is "
                          f"exempted by {freeze_key}.exclude; nothing would be frozen")
    if sum(s["trained"] for s in summaries) == 0:
        raise ConfigError(f"{freeze_key}: freezes every parameter, so the first "
                          f"{freeze.steps} optimizer steps would train nothing; exempt some "
                          f"with {freeze_key}.exclude (e.g. ['embedding.*'])")


def _model_order(name: str) -> tuple:
    m = _LAYER_NAME.search(name)
    if name.startswith("embedding."):
        return (0, 0, name)
    if m is not None:
        return (1, int(m.group(1)), name)
    return (3 if name.startswith("output_layer.") else 2, 0, name)


def _looks_like(summaries: list[dict]) -> str:
    names = sorted(_examples(n for s in summaries for n in s["examples"]), key=_model_order)
    layers = sorted({i for s in summaries for i in s["layers"]})
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    span = f"; layers {layers[0]}..{layers[-1]}" if layers else ""
    return f"(parameter names look like: {shown}{span})"


def _log_summary(summaries, rules, freeze, rules_key, freeze_key) -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    def some(names: set[str], n: int) -> str:  # each rank sent n + 1 at most
        return ", ".join(sorted(names, key=_model_order)[:n]) + (", ..." if len(names) > n else "")

    for i, rule in enumerate(rules):
        names = {n for s in summaries for n in s["rule_names"][i]}
        log.info("%s[%d] %r: LR x %g on %s", rules_key, i, rule.label, rule.lr_mult, some(names, 3))
    if freeze is not None:
        kept = {n for s in summaries for n in s["trained_names"]}
        log.info("%s: parameters frozen for optimizer steps 0..%d except %s", freeze_key,
                 freeze.steps - 1, some(kept, 4))


# --------------------------------------------------------------------- optimizer glue


def build_config_overrides(optimizer_config, model_chunks,
                           rules: Optional[Sequence[ParamGroupRule]] = None,
                           freeze: Optional[FreezeConfig] = None, *,
                           rules_key: str = "param_groups", freeze_key: str = "freeze") -> dict:
    """``config_overrides`` for megatron's ``get_megatron_optimizer``: its standard
    overrides (no weight decay on biases and 1-D parameters, decoupled LR) plus
    ``lr_mult`` from ``rules`` and ``frozen_steps`` from ``freeze``.

    Collective (every rank must call it): patterns are checked against the parameters
    of all ranks; a pattern that matches nothing anywhere, a rule shadowed entirely by
    earlier rules, or a freeze that leaves nothing (or everything) to train raises
    ConfigError, on every rank alike. ``rules_key``/``freeze_key``: where these live in
    the config, for the messages.
    """
    from megatron.core.optimizer import (
        ParamKey,
        ParamWithNamePredicate,
        get_standard_config_overrides,
    )

    from phoenix.optim.schedule import MultiPhaseScheduler

    rules = list(rules or [])
    if freeze is not None and not optimizer_config.use_distributed_optimizer:
        # Its checkpoint load tells param groups apart by (wd_mult, lr_mult, ...) only: a
        # frozen group and a trained one with the same multipliers collide and the load
        # fails ("parameter group that doesn't match the size"), at every resume.
        raise ConfigError(f"{freeze_key}: needs the distributed optimizer (parallel."
                          f"use_distributed_optimizer=true, which also works at DP=1): megatron's "
                          f"other optimizer cannot resume from a checkpoint with frozen groups")
    named = _trainable(model_chunks)
    owner = _first_rule(named, rules)
    summaries = _gather(_summary(named, rules, freeze, owner))
    _check(summaries, rules, freeze, rules_key, freeze_key)
    _log_summary(summaries, rules, freeze, rules_key, freeze_key)

    overrides = dict(get_standard_config_overrides(optimizer_config))

    def key(label: str, ids: frozenset[int]):
        # megatron hashes and compares predicates by name only: one name per selection.
        return ParamKey(with_name_predicate=ParamWithNamePredicate(
            name=f"phoenix.{label}", fn=lambda param, _name: id(param) in ids))

    by_mult: dict[float, set[int]] = {}
    for (_, param), i in zip(named, owner):
        # A multiplier of 1 adds no key: any "lr" key makes megatron mark the group as
        # not following the default schedule (default_config=False).
        if i is not None and rules[i].lr_mult != 1.0:
            by_mult.setdefault(rules[i].lr_mult, set()).add(id(param))
    # Keyed by the value (the same on every rank), so ranks agree on the groups even
    # where a stage holds none of a rule's parameters.
    for mult, ids in sorted(by_mult.items()):
        overrides[key(f"lr_mult={mult!r}", frozenset(ids))] = {"lr_mult": mult}
    if freeze is not None:
        frozen = frozenset(id(p) for name, p in named if freeze.freezes(name))
        if frozen:
            overrides[key("frozen", frozen)] = {MultiPhaseScheduler.FROZEN_STEPS_KEY: freeze.steps}
    return overrides


def frozen_model_params(model_chunks, freeze: Optional[FreezeConfig]) -> list[torch.nn.Parameter]:
    """This rank's trainable model parameters that ``freeze`` freezes (maybe none)."""
    if freeze is None:
        return []
    return [p for name, p in _trainable(model_chunks) if freeze.freezes(name)]


def zero_frozen_grads(params: Sequence[torch.nn.Parameter], step: int,
                      freeze: Optional[FreezeConfig]) -> bool:
    """Before optimizer step ``step`` (0-based): zero the gradients of the frozen
    ``params`` while ``step < freeze.steps``; returns whether it did.

    Call it after the gradients are reduced (megatron DDP's ``main_grad`` buffers, as
    ``finalize_model_grads`` leaves them) and before ``optimizer.step()``, which then
    computes the grad norm, clips and updates Adam's moments from the trained
    parameters' gradients only.
    """
    if freeze is None or step >= freeze.steps:
        return False
    with torch.no_grad():
        for p in params:
            grad = getattr(p, "main_grad", None)
            if grad is None:
                grad = p.grad
            if grad is not None:
                grad.zero_()
    return True
