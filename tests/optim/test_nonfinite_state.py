"""The save's finiteness check (phoenix.optim.nonfinite.nonfinite_names): one min/max
reduction per tensor names exactly the tensors that an element-wise ``isfinite`` check
names, for NaN, +Inf and -Inf anywhere, in fp32 and bf16, without a false alarm on large
finite values (which a sum would overflow)."""

import pytest
import torch

from phoenix.optim.nonfinite import nonfinite_names


def _state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Linear(17, 5))
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 33)).sum().backward()
    adam.step()
    return model, adam


def _named(model, adam) -> list:
    """The weights and Adam's state, with the integer step count among them."""
    named = list(model.named_parameters())
    for j, p in enumerate(adam.param_groups[0]["params"]):
        named += [(f"param[{j}].{k}", v) for k, v in adam.state[p].items()]
    return named


def _oracle(named) -> list[str]:
    """Element-wise: the names of the floating-point tensors holding a non-finite value."""
    return [n for n, t in named if t.is_floating_point() and not torch.isfinite(t).all()]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_names_names_what_an_elementwise_check_names(value):
    model, adam = _state()
    assert nonfinite_names(_named(model, adam)) == [] == _oracle(_named(model, adam))
    state = adam.state[model[1].weight]
    with torch.no_grad():
        model[0].weight.view(-1)[200] = value  # a weight, mid-tensor
        state["exp_avg_sq"].view(-1)[-1] = value  # a moment, last element
        model[1].bias[0] = value  # first element
    expected = _oracle(_named(model, adam))
    assert expected == ["0.weight", "1.bias", "param[2].exp_avg_sq"]
    assert nonfinite_names(_named(model, adam)) == expected


def test_nonfinite_names_bf16_and_large_finite_values():
    model, adam = _state()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0e38)  # finite; their sum is not
    assert nonfinite_names(_named(model, adam)) == []
    half = torch.nn.Linear(9, 3).to(torch.bfloat16)
    assert nonfinite_names(half.named_parameters()) == []
    with torch.no_grad():
        half.weight[2, 8] = -float("inf")
    assert nonfinite_names(half.named_parameters()) == ["weight"]
