"""Upcycling: the weights of a MoE ``GPTModel`` from those of a dense one (arXiv 2212.05055),
with fine-grained experts split out of the dense MLP (granular upcycling, arXiv 2410.07524).

Works on plain full-size state dicts (TP = PP = EP = 1, megatron-core local-spec names);
phoenix.convert.upcycle loads and writes the checkpoints. Per layer:

* every key the two models share (attention, norms, embeddings, output layer, the MLPs of
  dense layers between MoE layers) is copied;
* MoE layer ``i``, expert ``e`` gets segment ``e % g`` of the dense MLP of layer ``i``,
  ``g = dense ffn_hidden_size / expert ffn_hidden_size`` (the granularity): fc1 is cut
  into ``g`` row blocks (for SwiGLU the gate and the up halves separately, so segment
  ``j`` is ``[gate_j; up_j]``), fc2 into ``g`` column blocks (along its input). With
  ``g = 1`` every expert is a copy of the dense MLP;
* the router keeps the MoE model's own initialisation (megatron's ``init_method``), its
  first ``E / g`` rows each repeated ``g`` times, so the ``g`` segments of one copy of
  the dense MLP always score alike and are chosen together.

**Scale** (arXiv 2410.07524, as megatron-core's ``upcycling_utils``): the MoE output is
``sum over the k chosen experts of p_e * expert_e(x)``. With a near-uniform router at
initialisation and the ``g`` segments of a copy chosen together, the chosen experts are
``k / g`` whole copies of the dense MLP, every segment weighted ``p``: the output is
``(k / g) * p * dense(x) = dense(x) / s``, where the activation scale ``s`` is

* ``g`` when the chosen weights sum to one, ``p = 1 / k`` (softmax after top-k; sigmoid
  with ``k > 1``, which megatron also normalises over the chosen experts);
* ``E * g / k`` with softmax before top-k, ``p ~ 1 / E`` (megatron's
  ``moe_router_pre_softmax`` branch);
* ``2 * g`` with sigmoid and ``k = 1``, ``p ~ sigmoid(0) = 1 / 2`` (not in the paper).

Every fc1 and fc2 weight (and fc1 bias) is multiplied by ``s ** (1/3)`` for SwiGLU (the
output is cubic in the weights: gate, up, fc2) and ``s ** (1/2)`` for GeLU (quadratic),
which restores the dense output where the activation is homogeneous. fc2 biases are
copied unscaled (the chosen weights of a normalised router sum to one).

**Exact** when ``s = 1``: granularity 1 and normalised weights. Then every chosen expert
is the dense MLP and the weights sum to one, so the MoE layer equals the dense MLP for any
router weights (dropless routing, no shared experts). Otherwise the match is approximate
(the router is not uniform, SiLU/GeLU are not homogeneous): tests/convert/test_upcycle.py
measures the logit error of each setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch


class UpcycleError(ValueError):
    """The dense weights cannot be upcycled to the MoE config; the message names why."""


_EXPERT = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\."
                     r"(linear_fc[12]\.(?:weight|bias))$")
_ROUTER = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.router\.(weight|bias)$")


@dataclass(frozen=True)
class UpcycleSpec:
    """What the conversion needs of the MoE config (``E``, ``k``, ``g``, router, MLP kind)."""

    num_experts: int
    router_topk: int
    granularity: int
    gated: bool
    """SwiGLU (fc1 holds [gate; up]) rather than GeLU."""
    score_function: str = "softmax"
    pre_softmax: bool = False
    dropless: bool = True
    """No expert capacity (``capacity_factor`` None): no token is dropped."""

    @property
    def normalised(self) -> bool:
        """The chosen experts' weights sum to one (megatron's topk_routing_with_score_function)."""
        if self.score_function == "softmax":
            return not self.pre_softmax
        return self.router_topk > 1

    @property
    def activation_scale(self) -> float:
        """``s``: how much smaller the MoE output is than the dense one before scaling."""
        g = self.granularity
        if self.normalised:
            return float(g)
        if self.score_function == "softmax":
            return self.num_experts * g / self.router_topk
        return 2.0 * g

    @property
    def weight_scale(self) -> float:
        """Factor on every fc1/fc2 weight: ``s ** (1/3)`` (SwiGLU) or ``s ** (1/2)`` (GeLU)."""
        return self.activation_scale ** (1 / 3 if self.gated else 1 / 2)

    @property
    def exact(self) -> bool:
        """The MoE model computes the dense function exactly, whatever the router."""
        return self.granularity == 1 and self.normalised and self.dropless


def granularity(dense_ffn: int, expert_ffn: int, num_experts: int) -> int:
    """``g = dense_ffn / expert_ffn``; UpcycleError unless it is a whole number dividing E."""
    if dense_ffn % expert_ffn:
        raise UpcycleError(
            f"model.moe.ffn_hidden_size {expert_ffn} does not divide the dense ffn_hidden_size "
            f"{dense_ffn} (granular upcycling cuts the dense MLP into g = dense / expert equal "
            f"segments; use a divisor of {dense_ffn})")
    g = dense_ffn // expert_ffn
    if num_experts % g:
        raise UpcycleError(f"model.moe.num_experts {num_experts} is not a multiple of the "
                           f"granularity {g} (= {dense_ffn} / {expert_ffn}): each copy of the "
                           f"dense MLP becomes g experts")
    return g


def split_fc1(weight: torch.Tensor, g: int, gated: bool) -> list[torch.Tensor]:
    """fc1 weight [ffn(*2), h] (or bias) cut into ``g`` segments along the ffn dim;
    SwiGLU: gate and up halves cut separately, segment j = [gate_j; up_j]."""
    if not gated:
        return list(torch.tensor_split(weight, g, dim=0))
    gate, up = torch.chunk(weight, 2, dim=0)
    return [torch.cat([a, b], dim=0) for a, b in zip(torch.tensor_split(gate, g, dim=0),
                                                      torch.tensor_split(up, g, dim=0))]


def expert_tensor(dense: torch.Tensor, name: str, expert: int, spec: UpcycleSpec) -> torch.Tensor:
    """Expert ``expert``'s ``name`` (linear_fc1/2.weight/bias) from the dense MLP's tensor."""
    g, j = spec.granularity, expert % spec.granularity
    if name == "linear_fc2.bias":
        return dense.clone()
    # Scaled in fp32 (a bf16 product would round twice); cast to the model's dtype after.
    scaled = dense.float() * spec.weight_scale if spec.weight_scale != 1.0 else dense
    if name.startswith("linear_fc1"):
        return split_fc1(scaled, g, spec.gated)[j].clone()
    return torch.tensor_split(scaled, g, dim=1)[j].clone()  # fc2 weight [h, ffn]


def grouped_router(router: torch.Tensor, g: int) -> torch.Tensor:
    """The first ``E / g`` rows of an initialised router [E, h] (or bias [E]), each
    repeated ``g`` times: the segments of one dense copy score alike."""
    if g == 1:
        return router.clone()
    return router[: router.shape[0] // g].repeat_interleave(g, dim=0).clone()


def upcycled_tensors(dense: dict[str, torch.Tensor], moe: dict[str, torch.Tensor],
                     spec: UpcycleSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for every key of the MoE model's full state dict ``moe`` (its own
    tensors: the router's init), filled from ``dense``, one at a time (the caller copies
    each into place, so the experts are never held twice). Every MoE key is accounted
    for and every dense key used, or UpcycleError names the first that is not."""
    used = set()
    for key, target in moe.items():
        if (m := _EXPERT.match(key)) is not None:
            layer, expert, name = int(m.group(1)), int(m.group(2)), m.group(3)
            source = f"decoder.layers.{layer}.mlp.{name}"
            if source not in dense:
                raise UpcycleError(f"the dense checkpoint has no {source} for {key}")
            value = expert_tensor(dense[source], name, expert, spec)
            used.add(source)
        elif (m := _ROUTER.match(key)) is not None:
            value = grouped_router(target, spec.granularity)
        elif key in dense:
            value = dense[key]
            used.add(key)
        elif ".mlp.router." in key:  # expert bias (aux-loss-free balancing): starts at zero
            value = target.clone()
        else:
            raise UpcycleError(f"the MoE model's {key} has no source in the dense checkpoint "
                               f"(shared experts are not upcycled)")
        if tuple(value.shape) != tuple(target.shape):
            raise UpcycleError(f"{key}: the dense checkpoint gives shape {tuple(value.shape)}, "
                               f"the MoE config needs {tuple(target.shape)}")
        yield key, value.to(target.dtype)
    unused = sorted(set(dense) - used)
    if unused:
        raise UpcycleError(f"dense weight(s) the MoE model has no place for: {unused[:3]}")


def upcycle_state_dict(dense: dict[str, torch.Tensor], moe: dict[str, torch.Tensor],
                       spec: UpcycleSpec) -> dict[str, torch.Tensor]:
    """:func:`upcycled_tensors` as one state dict."""
    return dict(upcycled_tensors(dense, moe, spec))
