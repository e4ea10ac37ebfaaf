"""How far consecutive checkpoints moved: per layer and part, for the weights and Adam's
moments, whatever layout saved them.

A checkpoint's dist_checkpointing files hold every tensor under one *global* key and
shape (megatron stacks the decoder layers on a leading axis, ``decoder.layers.<name>``
of shape ``[num_layers, ...]``), so two checkpoints saved at different TP/PP/DP compare
tensor for tensor without loading a model: each key is read whole, one key at a time, in
this one process (torch's ``dcp.load`` with ``no_dist``), from each checkpoint.

For each consecutive pair (A -> B, B -> C, ...) and each *state* (``weight``; with an
optimizer state in both, ``exp_avg`` and ``exp_avg_sq`` of Adam), per part key named as
:mod:`phoenix.monitor.norms` names them (``layer_03/attention/qkv``, ``layer_03/mlp/fc1``,
``layer_03/norms``, ``layer_03/mlp/expert_05/fc2``, ``embedding``, ``final_norm``,
``output_layer``; ``global`` for the whole model)::

    norm_a     = ||A||                       (L2 over every element of the part)
    norm_b     = ||B||
    delta      = ||B - A||
    rel_delta  = ||B - A|| / ||A||           (NaN when ||A|| = 0)
    cosine     = <A, B> / (||A|| ||B||)      (NaN when either is 0)

Sums are accumulated in float64 over the part's tensors. Vocabulary rows: an embedding
or output layer whose row counts differ only by padding is compared over the common rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phoenix.monitor.norms import layer_key, layer_part

STATES = ("weight", "exp_avg", "exp_avg_sq")
_OPTIM = "optimizer.state."
_LAYER = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(.+)$")
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
FIELDS = ("pair", "state", "key", "norm_a", "norm_b", "delta", "rel_delta", "cosine")


class CompareError(ValueError):
    """Checkpoints that cannot be compared (missing, different architectures)."""


@dataclass
class Checkpoint:
    """One checkpoint's tensor index: ``path`` (a ``step_*`` folder), ``label`` (shown in
    the table), ``shapes``: model key -> global shape, ``optim``: whether it holds Adam's
    ``exp_avg``/``exp_avg_sq``; ``stored``: every tensor key, optimizer ones included."""

    path: Path
    label: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    optim: bool = False
    stored: frozenset = frozenset()

    @classmethod
    def open(cls, path: Path, label: str) -> "Checkpoint":
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        shapes = {k: tuple(m.size) for k, m in md.items() if hasattr(m, "size")}
        model = {k: s for k, s in shapes.items() if not k.startswith("optimizer.")}
        optim = any(k.startswith(_OPTIM + "exp_avg.") for k in shapes) and \
            any(k.startswith(_OPTIM + "exp_avg_sq.") for k in shapes)
        return cls(Path(path), label, model, optim, frozenset(shapes))

    def read(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole tensor ``key`` (a model key, or ``optimizer.state.<state>.<key>``),
        float32 (bf16 checkpoints are widened)."""
        import warnings

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        holder = {key: torch.empty(shape, dtype=torch.float32)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(holder, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
        return holder[key]


def check_same_architecture(a: Checkpoint, b: Checkpoint) -> None:
    """CompareError (one line) when ``a`` and ``b`` differ in keys or shapes, padded
    vocabulary rows apart."""
    missing = sorted(set(a.shapes) ^ set(b.shapes))
    if missing:
        side = a.label if missing[0] in a.shapes else b.label
        raise CompareError(f"{a.label} and {b.label} have different architectures: "
                           f"{missing[0]} only in {side} ({len(missing)} keys differ)")
    for k, sa in a.shapes.items():
        sb = b.shapes[k]
        if sa != sb and not (k in _VOCAB_ROWS and sa[1:] == sb[1:]):
            raise CompareError(f"{a.label} and {b.label} have different architectures: {k} "
                               f"has shape {sa} in one and {sb} in the other")


def split_key(key: str, shape: tuple[int, ...], num_layers: int):
    """``(part key, index)`` pairs that cut the global tensor ``key`` into parts:
    ``index`` selects the slice (None: the whole tensor).

    Stacked decoder layers (``decoder.layers.<name>``, leading axis = layer) give one
    entry per layer; routed experts (``mlp.experts.experts.<name>``: the axis after the
    layer is the expert) one per layer and expert."""
    m = _LAYER.match(key)
    if m is None:
        if key.startswith("embedding."):
            return [("embedding", None)]
        if key.startswith("output_layer."):
            return [("output_layer", None)]
        if key.startswith("decoder.final_"):
            return [("final_norm", None)]
        return [("other", None)]
    index, name = m.groups()
    layers = [int(index)] if index is not None else range(shape[0])
    out = []
    for i in layers:
        sel = None if index is not None else i
        prefix = layer_key(i, num_layers)
        expert = re.match(r"^mlp\.experts\.experts\.(.+)$", name)
        if expert and len(shape) >= (3 if index is None else 2):
            experts = shape[1] if index is None else shape[0]
            for e in range(experts):
                part = layer_part(f"mlp.experts.local_experts.{e}.{expert.group(1)}", None, experts)
                out.append((f"{prefix}/{part}", (i, e) if sel is not None else e))
        else:
            out.append((f"{prefix}/{layer_part(name)}", sel))
    return out


def num_layers_of(shapes: dict[str, tuple[int, ...]]) -> int:
    """Transformer layers: the leading axis of the stacked keys (or the largest index)."""
    stacked = [s[0] for k, s in shapes.items() if _LAYER.match(k) and _LAYER.match(k).group(1) is None]
    indexed = [int(_LAYER.match(k).group(1)) + 1 for k in shapes
               if _LAYER.match(k) and _LAYER.match(k).group(1) is not None]
    return max(stacked + indexed + [0])


def _common_rows(key: str, x: torch.Tensor, y: torch.Tensor):
    if key in _VOCAB_ROWS and x.shape != y.shape:
        rows = min(x.shape[0], y.shape[0])
        return x[:rows], y[:rows]
    return x, y


def pair_sums(a: Checkpoint, b: Checkpoint, states=STATES, keep=(), progress: bool = False):
    """Per ``(state, part key)``: float64 ``[sum a^2, sum b^2, sum (b-a)^2, sum a*b]`` of
    the pair ``a -> b``. ``states``: those of :data:`STATES` to compare (the Adam ones
    only when both hold an optimizer state). ``keep``: ``"state:key"`` names whose values
    are also returned (flattened float32, per checkpoint) for histograms.

    Returns ``(sums, kept)``: ``{(state, key): tensor[4]}`` with ``(state, "global")``
    too, and ``{name: (values_a, values_b)}``."""
    from tqdm import tqdm

    check_same_architecture(a, b)
    num_layers = num_layers_of(a.shapes)
    states = [s for s in states if s == "weight" or (a.optim and b.optim)]
    sums: dict[tuple[str, str], torch.Tensor] = {}
    kept: dict[str, tuple[list, list]] = {}
    jobs = [(s, k) for s in states for k in sorted(a.shapes)]
    for state, key in tqdm(jobs, desc=f"{a.label} -> {b.label}", disable=not progress):
        stored = key if state == "weight" else f"{_OPTIM}{state}.{key}"
        if stored not in a.stored or stored not in b.stored:
            continue  # e.g. a frozen parameter has no Adam state
        x = a.read(stored, a.shapes[key]).double()
        y = b.read(stored, b.shapes[key]).double()
        x, y = _common_rows(key, x, y)
        for part, sel in split_key(key, x.shape, num_layers):
            xs, ys = (x, y) if sel is None else (x[sel], y[sel])
            v = torch.stack([(xs * xs).sum(), (ys * ys).sum(), ((ys - xs) ** 2).sum(), (xs * ys).sum()])
            for k in (part, "global"):
                sums[(state, k)] = sums.get((state, k), torch.zeros(4, dtype=torch.float64)) + v
            name = part if state == "weight" else f"{state}:{part}"
            if name in keep:
                va, vb = kept.setdefault(name, ([], []))
                va.append(xs.float().flatten())
                vb.append(ys.float().flatten())
    return sums, {n: (torch.cat(va), torch.cat(vb)) for n, (va, vb) in kept.items()}


def metrics(v: torch.Tensor) -> dict[str, float]:
    """The row values (see the module docstring) of one ``[aa, bb, dd, ab]`` sum vector."""
    aa, bb, dd, ab = (float(t) for t in v)
    na, nb, d = math.sqrt(aa), math.sqrt(bb), math.sqrt(dd)
    return {"norm_a": na, "norm_b": nb, "delta": d,
            "rel_delta": d / na if na > 0 else float("nan"),
            "cosine": ab / (na * nb) if na > 0 and nb > 0 else float("nan")}


def part_names(c: Checkpoint) -> list[str]:
    """Every part key of ``c`` (for ``--hist`` names; Adam's as ``exp_avg:<key>``)."""
    num_layers = num_layers_of(c.shapes)
    parts = sorted({p for k, s in c.shapes.items() for p, _ in split_key(k, s, num_layers)},
                   key=_order)
    return parts + ([f"{st}:{p}" for st in STATES[1:] for p in parts] if c.optim else [])


def _order(key: str):
    """Table order: embedding, the layers in order (their parts sorted), final norm,
    output layer, other, global."""
    head = {"embedding": (0,), "final_norm": (2,), "output_layer": (3,), "other": (4,), "global": (5,)}
    return head.get(key, (1, key))


def compare(checkpoints: list[Checkpoint], states=STATES, hist=(), progress: bool = False):
    """Rows (dicts with :data:`FIELDS`) for every consecutive pair, in table order, and
    the histogram values ``{name: [values per checkpoint]}`` of the ``hist`` names."""
    rows, values = [], {n: [None] * len(checkpoints) for n in hist}
    for i, (a, b) in enumerate(zip(checkpoints, checkpoints[1:])):
        sums, kept = pair_sums(a, b, states, hist, progress)
        for state in STATES:
            for key in sorted((k for s, k in sums if s == state), key=_order):
                rows.append({"pair": f"{a.label} -> {b.label}", "state": state, "key": key,
                             **metrics(sums[(state, key)])})
        for name, (va, vb) in kept.items():
            values[name][i], values[name][i + 1] = va, vb
    return rows, values
