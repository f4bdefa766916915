"""Server optimizers of FedOpt (Reddi et al. 2021): the step the leader takes with the averaged update."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from fedgrpc.config.choices import FEDOPT_MODES, SERVER_OPTIMIZERS


class FedOpt(torch.optim.Optimizer):
    """FedAdagrad, FedAdam and FedYogi: Reddi et al. 2021, Algorithm 2, without bias correction as in the paper.

    The gradient is the averaged update, global minus local weights: the negative of the paper's Delta.
    So m here is the negative of the paper's m and the step subtracts where the paper adds; v, which
    sees only g * g, is the same. State per parameter is two tensors, "m" and "v", and nothing else, so
    that a checkpoint that saves every tensor in optimizer.state restores it whole.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        mode: str,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if mode not in FEDOPT_MODES:
            raise ValueError(f"FedOpt mode must be one of {', '.join(FEDOPT_MODES)}, got {mode!r}")
        if not lr >= 0:
            raise ValueError(f"server lr must be >= 0, got {lr}")
        if not 0 <= beta1 < 1:
            raise ValueError(f"server beta1 must be in [0, 1), got {beta1}")
        if not 0 <= beta2 < 1:
            raise ValueError(f"server beta2 must be in [0, 1), got {beta2}")
        if not tau > 0:
            raise ValueError(f"server tau must be positive, got {tau}")
        super().__init__(params, {"mode": mode, "lr": lr, "beta1": beta1, "beta2": beta2, "tau": tau})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One FedOpt step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mode, lr, beta1, beta2, tau = group["mode"], group["lr"], group["beta1"], group["beta2"], group["tau"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FedOpt does not support sparse gradients")
                g = p.grad
                state = self.state[p]
                # Each tensor starts on its own, so a checkpoint restored before the first step is kept.
                if "m" not in state:
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "v" not in state:
                    # v starts at tau^2, as in the paper's experiments (its analysis asks only v >= tau^2).
                    state["v"] = torch.full_like(p, tau * tau, memory_format=torch.preserve_format)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                if mode == "adagrad":
                    v.add_(g2)
                elif mode == "adam":
                    v.mul_(beta2).add_(g2, alpha=1 - beta2)
                else:
                    # Yogi moves v by (1 - beta2) * g^2 toward g^2, additively, not by a fraction of v.
                    v.sub_(g2 * torch.sign(v - g2), alpha=1 - beta2)
                p.addcdiv_(m, v.sqrt().add_(tau), value=-lr)
        return loss


def build_server_optimizer(
    name: str,
    parameters: Iterable[torch.Tensor],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> torch.optim.Optimizer:
    """The server optimizer named by --server-opt: sgd and sgdm are torch SGD, adam, yogi and adagrad are FedOpt."""
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}: choose one of {', '.join(SERVER_OPTIMIZERS)}")
    if name == "sgdm" and not momentum > 0:
        raise ValueError(f"sgdm needs --server-momentum > 0, got {momentum}")
    if name in ("sgd", "sgdm"):
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # Refused rather than ignored: FedOpt's momentum is beta1, and Algorithm 2 has no weight decay.
    if momentum != 0:
        raise ValueError(f"{name} takes its momentum from --server-beta1; --server-momentum must be 0, got {momentum}")
    if weight_decay != 0:
        raise ValueError(f"{name} has no weight decay; got {weight_decay}")
    return FedOpt(parameters, name, lr, beta1=beta1, beta2=beta2, tau=tau)
