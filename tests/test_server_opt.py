"""Server optimizers (FedOpt, Reddi et al. 2021) against numbers computed by hand."""

from __future__ import annotations

import pytest
import torch

from fedgrpc.algorithms import server_opt

# Shared by the hand computations: tau = 1 so v starts at tau^2 = 1, and beta1 = 0.5 so that
# m after the first step is g / 2. Float64 parameters, so that dyadic numbers come out exact.
LR = 0.5
BETA1 = 0.5
BETA2 = 0.75
TAU = 1.0


def _param() -> torch.Tensor:
    """The 2-element parameter every hand computation starts from."""
    return torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))


def _step(optimizer: torch.optim.Optimizer, param: torch.Tensor, grad: list[float]) -> None:
    """One server step with `grad` as the pseudo-gradient (global minus local)."""
    param.grad = torch.tensor(grad, dtype=torch.float64)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _fedopt(mode: str, param: torch.Tensor) -> server_opt.FedOpt:
    """A FedOpt with the shared hand-computation settings."""
    return server_opt.FedOpt([param], mode, LR, beta1=BETA1, beta2=BETA2, tau=TAU)


def _close(tensor: torch.Tensor, expected: list[float]) -> bool:
    """Equal to `expected` up to float64 rounding of non-dyadic values such as 1/12."""
    return torch.allclose(tensor, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fedadagrad_two_steps_by_hand():
    param = _param()
    optimizer = _fedopt("adagrad", param)
    _step(optimizer, param, [0.75, -1.875])
    state = optimizer.state[param]
    # m = 0.5*0 + 0.5*g = [0.375, -0.9375]
    assert torch.equal(state["m"], torch.tensor([0.375, -0.9375], dtype=torch.float64))
    # v = 1 + g^2 = [1 + 0.5625, 1 + 3.515625] = [1.5625, 4.515625]; sqrt(v) = [1.25, 2.125]
    assert torch.equal(state["v"], torch.tensor([1.5625, 4.515625], dtype=torch.float64))
    # x = x - 0.5 * m / (sqrt(v) + 1) = [1 - 0.5*0.375/2.25, 2 + 0.5*0.9375/3.125] = [1 - 1/12, 2 + 0.15]
    # A positive pseudo-gradient (local below global) moves the global weight down, toward the learners.
    assert _close(param.data, [11 / 12, 2.15])
    _step(optimizer, param, [0.75, -1.875])
    # m = 0.5*[0.375, -0.9375] + 0.5*[0.75, -1.875] = [0.5625, -1.40625]
    assert torch.equal(state["m"], torch.tensor([0.5625, -1.40625], dtype=torch.float64))
    # v = [1.5625 + 0.5625, 4.515625 + 3.515625] = [2.125, 8.03125]: Adagrad only accumulates
    assert torch.equal(state["v"], torch.tensor([2.125, 8.03125], dtype=torch.float64))


def test_fedadam_one_step_by_hand():
    param = _param()
    optimizer = _fedopt("adam", param)
    _step(optimizer, param, [1.0, -2.75])
    # m = 0.5*g = [0.5, -1.375]
    assert torch.equal(optimizer.state[param]["m"], torch.tensor([0.5, -1.375], dtype=torch.float64))
    # v = 0.75*1 + 0.25*g^2 = [0.75 + 0.25, 0.75 + 0.25*7.5625] = [1, 2.640625]; sqrt(v) = [1, 1.625]
    assert torch.equal(optimizer.state[param]["v"], torch.tensor([1.0, 2.640625], dtype=torch.float64))
    # x = [1 - 0.5*0.5/2, 2 + 0.5*1.375/2.625] = [0.875, 2 + 11/42]  (no bias correction)
    assert _close(param.data, [0.875, 2 + 11 / 42])


def test_fedyogi_one_step_by_hand():
    param = _param()
    optimizer = _fedopt("yogi", param)
    _step(optimizer, param, [1.5, -3.75])
    # m = 0.5*g = [0.75, -1.875]
    assert torch.equal(optimizer.state[param]["m"], torch.tensor([0.75, -1.875], dtype=torch.float64))
    # g^2 = [2.25, 14.0625] > v = 1, so sign(v - g^2) = -1 and v = 1 + 0.25*g^2 = [1.5625, 4.515625];
    # sqrt(v) = [1.25, 2.125]
    assert torch.equal(optimizer.state[param]["v"], torch.tensor([1.5625, 4.515625], dtype=torch.float64))
    # x = [1 - 0.5*0.75/2.25, 2 + 0.5*1.875/3.125] = [1 - 1/6, 2.3]
    assert _close(param.data, [5 / 6, 2.3])


def test_adagrad_adam_and_yogi_move_v_differently():
    grads = [[1.5, -3.75], [0.5, 0.0]]
    states = {}
    for mode in ("adagrad", "adam", "yogi"):
        param = _param()
        optimizer = _fedopt(mode, param)
        for grad in grads:
            _step(optimizer, param, grad)
        states[mode] = optimizer.state[param]
    # m does not depend on the mode: 0.5*(0.5*g1) + 0.5*g2 = [0.375 + 0.25, -0.9375 + 0] = [0.625, -0.9375]
    for state in states.values():
        assert torch.equal(state["m"], torch.tensor([0.625, -0.9375], dtype=torch.float64))
    # g1^2 = [2.25, 14.0625], g2^2 = [0.25, 0]
    # adagrad: v = 1 + 2.25 + 0.25 = 3.5 and 1 + 14.0625 + 0 = 15.0625
    assert torch.equal(states["adagrad"]["v"], torch.tensor([3.5, 15.0625], dtype=torch.float64))
    # adam: v1 = 0.75 + 0.25*g1^2 = [1.3125, 4.265625];
    #       v2 = 0.75*v1 + 0.25*g2^2 = [0.984375 + 0.0625, 3.19921875 + 0] = [1.046875, 3.19921875]
    assert torch.equal(states["adam"]["v"], torch.tensor([1.046875, 3.19921875], dtype=torch.float64))
    # yogi: v1 = 1 + 0.25*g1^2 = [1.5625, 4.515625] (g1^2 > v0: it adds, where Adam decays v0 first);
    #       v2: g2^2 < v1 so sign = +1: [1.5625 - 0.25*0.25, 4.515625 - 0] = [1.5, 4.515625]
    # With a zero gradient Adam's v shrinks by beta2 while Yogi's stays: it moves by (1 - beta2)*g^2 only.
    assert torch.equal(states["yogi"]["v"], torch.tensor([1.5, 4.515625], dtype=torch.float64))


def test_state_is_saved_under_plain_names_and_restores():
    param = _param()
    optimizer = _fedopt("yogi", param)
    _step(optimizer, param, [1.5, -3.75])
    state = optimizer.state[param]
    assert set(state) == {"m", "v"} and all(isinstance(value, torch.Tensor) for value in state.values())
    # The leader restores a checkpoint by setting each saved tensor back by name, before any step.
    copy = torch.nn.Parameter(param.detach().clone())
    restored = _fedopt("yogi", copy)
    for key, value in state.items():
        restored.state[copy][key] = value.clone()
    _step(optimizer, param, [0.5, 1.0])
    _step(restored, copy, [0.5, 1.0])
    assert torch.equal(copy.data, param.data)
    # torch's own state_dict round trip works too
    again = _fedopt("yogi", torch.nn.Parameter(param.detach().clone()))
    again.load_state_dict(optimizer.state_dict())
    assert torch.equal(next(iter(again.state.values()))["v"], state["v"])


def test_v_starts_at_tau_squared():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = server_opt.FedOpt([param], "adagrad", 0.1, tau=0.5)
    _step(optimizer, param, [0.0, 0.0])
    # A zero gradient adds nothing: v = tau^2 = 0.25, m = 0, and x does not move
    assert torch.equal(optimizer.state[param]["v"], torch.tensor([0.25, 0.25], dtype=torch.float64))
    assert torch.equal(param.data, torch.tensor([1.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize(("name", "momentum"), [("sgd", 0.0), ("sgd", 0.5), ("sgdm", 0.9)])
def test_sgd_and_sgdm_step_as_torch_sgd_does(name, momentum):
    ours, theirs = _param(), _param()
    optimizer = server_opt.build_server_optimizer(name, [ours], lr=0.1, momentum=momentum, weight_decay=0.01)
    reference = torch.optim.SGD([theirs], lr=0.1, momentum=momentum, weight_decay=0.01)
    assert isinstance(optimizer, torch.optim.SGD)
    for grad in ([0.5, -1.0], [0.25, 2.0]):
        _step(optimizer, ours, grad)
        _step(reference, theirs, grad)
    assert torch.equal(ours.data, theirs.data)
    # by hand for plain sgd, one step: x - 0.1*(g + 0.01*x) = [1 - 0.1*0.51, 2 - 0.1*(-0.98)] = [0.949, 2.098]
    if momentum == 0.0:
        single = _param()
        _step(server_opt.build_server_optimizer("sgd", [single], lr=0.1, weight_decay=0.01), single, [0.5, -1.0])
        assert _close(single.data, [0.949, 2.098])


@pytest.mark.parametrize("mode", ["adam", "yogi", "adagrad"])
def test_build_server_optimizer_passes_fedopt_settings(mode):
    optimizer = server_opt.build_server_optimizer(mode, [_param()], lr=0.3, beta1=0.8, beta2=0.95, tau=0.01)
    assert isinstance(optimizer, server_opt.FedOpt)
    group = optimizer.param_groups[0]
    assert (group["mode"], group["lr"], group["beta1"], group["beta2"], group["tau"]) == (mode, 0.3, 0.8, 0.95, 0.01)


def test_bad_names_and_values_raise():
    assert server_opt.SERVER_OPTIMIZERS == ("sgd", "sgdm", "adam", "yogi", "adagrad")
    with pytest.raises(ValueError, match="sgd, sgdm, adam, yogi, adagrad"):
        server_opt.build_server_optimizer("adamw", [_param()], lr=1.0)
    with pytest.raises(ValueError, match="sgdm needs --server-momentum > 0"):
        server_opt.build_server_optimizer("sgdm", [_param()], lr=1.0, momentum=0.0)
    with pytest.raises(ValueError, match="--server-momentum must be 0"):
        server_opt.build_server_optimizer("adam", [_param()], lr=1.0, momentum=0.9)
    with pytest.raises(ValueError, match="weight decay"):
        server_opt.build_server_optimizer("yogi", [_param()], lr=1.0, weight_decay=0.1)
    with pytest.raises(ValueError, match="mode"):
        server_opt.FedOpt([_param()], "sgd", 1.0)
    for kwargs, word in [
        ({"lr": -1.0}, "lr"),
        ({"lr": 1.0, "beta1": 1.0}, "beta1"),
        ({"lr": 1.0, "beta2": -0.1}, "beta2"),
        ({"lr": 1.0, "tau": 0.0}, "tau"),
    ]:
        with pytest.raises(ValueError, match=word):
            server_opt.FedOpt([_param()], "adam", **kwargs)
