"""The save's finiteness check (phoenix.optim.nonfinite.nonfinite_state): one min/max
reduction per tensor names exactly the tensors that an element-wise ``isfinite`` check
names, for NaN, +Inf and -Inf anywhere, in fp32 and bf16, without a false alarm on large
finite values (which a sum would overflow)."""

from types import SimpleNamespace

import pytest
import torch

from phoenix.optim.nonfinite import nonfinite_state


def _state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Linear(17, 5))
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 33)).sum().backward()
    adam.step()
    return model, SimpleNamespace(optimizer=adam)  # megatron's wrapper keeps it in .optimizer


def _oracle(model, optimizer) -> list[str]:
    """Element-wise: the names of the tensors holding a non-finite value."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    for g, group in enumerate(optimizer.optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            tensors = {"param": p, **optimizer.optimizer.state[p]}
            bad += [f"optimizer[0].group[{g}].param[{j}].{k}" for k, t in tensors.items()
                    if t.is_floating_point() and not torch.isfinite(t).all()]
    return bad


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_state_names_what_an_elementwise_check_names(value):
    model, optimizer = _state()
    assert nonfinite_state([model], optimizer) == [] == _oracle(model, optimizer)
    state = optimizer.optimizer.state[model[1].weight]
    with torch.no_grad():
        model[0].weight.view(-1)[200] = value  # a weight, mid-tensor
        state["exp_avg_sq"].view(-1)[-1] = value  # a moment, last element
        model[1].bias[0] = value  # first element
    expected = _oracle(model, optimizer)
    assert len(expected) == 5  # two weights, their Adam "param" entries, a moment
    assert nonfinite_state([model], optimizer) == expected


def test_nonfinite_state_bf16_and_large_finite_values():
    model, optimizer = _state()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0e38)  # finite; their sum is not
    assert nonfinite_state([model], optimizer) == []
    half = torch.nn.Linear(9, 3).to(torch.bfloat16)
    assert nonfinite_state([half], None) == []
    with torch.no_grad():
        half.weight[2, 8] = -float("inf")
    assert nonfinite_state([half], None) == ["weight"]
