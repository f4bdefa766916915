"""How a round's updates become the next global model: bounds and weights, the rule, privacy noise, the server step, the model check.

The arithmetic lives in aggregation.py (rules), privacy.py and server_opt.py; this module is the policy
that decides which of it runs, with what, and when a result is refused.
"""

from __future__ import annotations

import logging
import math
import secrets
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from fedgrpc.algorithms import aggregation, privacy, schedule, server_opt
from fedgrpc.config.options import LeaderConfig
from fedgrpc.leader import checkpoint
from fedgrpc.leader.intake import RoundState, tensor_norm

logger = logging.getLogger(__name__)

SGDM_DEFAULT_MOMENTUM = 0.9  # FedAvgM's server momentum when --server-momentum is left at 0 (Hsu et al. 2019)
# A new global model is refused, and the last good one kept, when it is not finite or its parameter norm grew more
# than this many times in one round: honest rounds change the norm by a few percent.
MODEL_GROWTH_LIMIT = 4.0
# Before any round has set a reference, an update is bounded by this many times the model's own norm: one such
# update averaged with an honest one moves the model by at most its norm, well inside MODEL_GROWTH_LIMIT, so no
# single learner can get the first round refused; honest first updates measured 0.1-0.8 times the model's norm.
FIRST_ROUND_NORM_RATIO = 2.0
# A run whose new model is refused this many rounds in a row cannot learn as configured: it stops and says why.
MAX_REFUSED_IN_A_ROW = 5
# the per-parameter state the server optimizers keep (SGD's momentum; FedOpt's first and second moments)
OPTIMIZER_STATE_KEYS = ("momentum_buffer", "m", "v")


class Strategy:
    """The leader's aggregation policy for one run: holds the server optimizer, the privacy accountant and the norms it bounds by."""

    def __init__(self, config: LeaderConfig, model: torch.nn.Module, checkpoint_dir: Path | None = None) -> None:
        self.config = config
        self.model = model
        self.parameter_names = [name for name, _ in model.named_parameters()]
        self.checkpoint_dir = checkpoint_dir
        self.optimizer = self._server_optimizer()
        # the share of learners in each round, --min-learners included (Poisson sampling at this rate is the accountant's model)
        # (fedbuff has no sampling: every aggregation may hold any learner's update, so none is assumed)
        sampling_rate = 1.0 if config.aggregation == "fedbuff" else config.sampled(config.learners) / config.learners
        self.accountant = (
            privacy.PrivacyAccountant(config.dp_noise_multiplier, sampling_rate, config.dp_delta) if config.dp_noise_multiplier else None
        )
        self._noise = torch.Generator().manual_seed(secrets.randbits(63))
        self.model_norm = self.current_model_norm()
        self.norm_reference: float | None = None  # median update norm of the last applied round
        self.refused_in_a_row = 0  # rounds whose new model model_problem() refused, since the last one it took
        self.noise_std = 0.0  # DP-FedAvg: the last round's noise per coordinate of the mean update

    def _server_optimizer(self) -> torch.optim.Optimizer:
        """The step the leader takes with the averaged update as a (pseudo-)gradient.

        fedsgd with sgd or sgdm: the blog's SGD with --lr, --momentum and --weight-decay. Otherwise
        --server-opt with --server-lr: plain FedAvg is sgd with lr 1, FedAvgM is sgdm, FedOpt is adam,
        yogi or adagrad.
        """
        config = self.config
        parameters = self.model.parameters()
        if self.blog_sgd:
            return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        momentum = config.server_momentum or (SGDM_DEFAULT_MOMENTUM if config.server_opt == "sgdm" else 0.0)
        return server_opt.build_server_optimizer(
            config.server_opt,
            parameters,
            lr=config.server_lr,
            momentum=momentum,
            beta1=config.server_beta1,
            beta2=config.server_beta2,
            tau=config.server_tau,
        )

    @property
    def blog_sgd(self) -> bool:
        """Whether the leader's step is the blog's SGD with --lr (fedsgd with --server-opt sgd or sgdm)."""
        return self.config.aggregation == "fedsgd" and self.config.server_opt in ("sgd", "sgdm")

    @property
    def unweighted(self) -> bool:
        """DP-FedAvg averages clipped updates unweighted, so that one learner's influence is bounded by the clip alone."""
        return self.accountant is not None

    # ---- bounds a round's updates get ---------------------------------------------------------------------------

    def norm_bound(self) -> float:
        """--max-norm-ratio times the lower median update norm of the last round; before any, FIRST_ROUND_NORM_RATIO times the model's."""
        if not self.config.max_norm_ratio:
            return math.inf
        if self.norm_reference is None:
            bound = FIRST_ROUND_NORM_RATIO * self.model_norm
        else:
            bound = self.config.max_norm_ratio * self.norm_reference
        return bound if bound > 0 else math.inf

    def max_weight(self, claims: list[int]) -> float:
        """With learners' own data, --max-weight-ratio times the lower median of the weights the round's members may claim."""
        if not self.config.max_weight_ratio or self.config.data_mode != "local" or not claims:
            return math.inf  # in split mode the leader itself knows every learner's examples
        return self.config.max_weight_ratio * statistics.median_low(claims)

    # ---- the round's result -------------------------------------------------------------------------------------

    def aggregate(self, finished: RoundState) -> dict[str, torch.Tensor]:
        """The round's update by --rule, plus Gaussian noise on the parameters under DP-FedAvg; ValueError if it has none."""
        config = self.config
        running = finished.summed()
        if config.rule == "mean":
            result = running.mean()
        else:
            settings = aggregation.RuleSettings(trim=config.trim, byzantine=config.byzantine)
            result = running.aggregate(lambda updates, weights: aggregation.RULES[config.rule](updates, weights, settings))
        if finished.staleness_discount != 1.0:
            # fedbuff: FedBuff's discounted sum over the updates' own weights, not their weighted mean: a stale update
            # shrinks the step rather than enlarging the others' share (measured: the weighted mean's larger steps
            # left ResNet-20 at 37% where this reached 70%, BENCHMARKS), and under DP no update moves the model by
            # more than clip / count
            for name in self.parameter_names:
                result[name] = result[name] * finished.staleness_discount
        if self.accountant is not None:
            std = self.noise_std = privacy.gaussian_noise_std(config.clip_norm, config.dp_noise_multiplier, running.count)
            for name in self.parameter_names:  # fresh OS randomness: noise anyone could regenerate from --seed protects nothing
                noise = torch.randn(result[name].shape, generator=self._noise, dtype=torch.float64)
                result[name] = (result[name].double() + std * noise).to(result[name].dtype)
            self.accountant.step()
            if self.checkpoint_dir is not None:  # on disk before the noised model can reach anyone
                checkpoint.record_privacy_spent(self.checkpoint_dir, self.accountant.rounds)
        return result

    def step(
        self, round_number: int, mean: dict[str, torch.Tensor], finished: RoundState, last_good: Callable[[], dict[str, torch.Tensor]]
    ) -> str | None:
        """Apply round `round_number`'s update to the model; None, or why the result was refused and `last_good()` restored."""
        config = self.config
        if self.blog_sgd:  # the blog's SGD: --lr is the leader's, on its schedule
            for group in self.optimizer.param_groups:
                group["lr"] = schedule.round_lr(config.lr, config.lr_schedule, config.warmup_rounds, config.rounds, round_number)
        aggregation.apply_update(self.model, self.optimizer, mean)
        # the lower median of the round's norms: a minority of huge updates cannot raise the next round's bound
        if finished.update_norms:  # none under secure aggregation
            self.norm_reference = statistics.median_low(finished.update_norms)
        norm = self.current_model_norm()
        problem = self.model_problem(norm)
        if problem is None:
            self.model_norm = norm
            self.refused_in_a_row = 0
            return None
        self.refused_in_a_row += 1
        self.model.load_state_dict(last_good())
        self.optimizer.state.clear()  # momentum or moments that took in the refused step would replay it
        logger.warning(
            "round %d: refused the new global model (%s); kept the model of round %d and reset the server optimizer's state",
            round_number,
            problem,
            round_number - 1,
        )
        return problem

    def hopeless(self, reporters: int) -> str | None:
        """Why the run should stop, once MAX_REFUSED_IN_A_ROW rounds in a row made a model that was refused, or None.

        Under DP-FedAvg the usual cause is noise larger than the model: the hint says how many learners a round
        would bring the noise's norm down to the model's.
        """
        if self.refused_in_a_row < MAX_REFUSED_IN_A_ROW:
            return None
        stopped = f"the new model was refused {self.refused_in_a_row} rounds in a row, so this run cannot learn as configured"
        if not self.noise_std:
            return f"{stopped}: its updates are too large for the model (lower --lr or --server-lr, or check the learners' data)"
        dimensions = sum(parameter.numel() for parameter in self.model.parameters())
        noise_norm = self.noise_std * math.sqrt(dimensions)
        needed = math.ceil(reporters * noise_norm / self.model_norm)
        return (
            f"{stopped}: DP-FedAvg's noise (--dp-noise-multiplier {self.config.dp_noise_multiplier} x --clip-norm "
            f"{self.config.clip_norm} / {reporters} learners = {self.noise_std:.3g} per coordinate, norm {noise_norm:.3g} over "
            f"{dimensions} parameters) outweighs the model (norm {self.model_norm:.3g}); about {needed} learners a round would bring "
            "the noise down to the model's norm, or lower --dp-noise-multiplier or --clip-norm (less privacy)"
        )

    def current_model_norm(self) -> float:
        """L2 norm of the model's parameters (float32 arithmetic: inf when it overflows)."""
        parameters = [parameter.detach() for parameter in self.model.parameters()]
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(parameters))))

    def model_problem(self, norm: float) -> str | None:
        """Why the model just stepped, of parameter norm `norm`, must not be published (a NaN, an infinity, an exploding norm), or None."""
        buffers = [buffer for buffer in self.model.buffers() if buffer.dtype.is_floating_point]
        buffer_norms = torch.stack(torch._foreach_norm(buffers)).tolist() if buffers else []
        if not math.isfinite(norm) or not all(math.isfinite(value) for value in buffer_norms):
            return "it holds NaN or infinite values"
        if norm > MODEL_GROWTH_LIMIT * self.model_norm:
            return f"its parameter norm grew from {self.model_norm:.4g} to {norm:.4g} in one round"
        return None

    def parameter_norm(self, update: dict[str, torch.Tensor]) -> float:
        """L2 norm of an update's parameter part (gradient or model delta), buffers left out."""
        return math.sqrt(sum(tensor_norm(update[name]) ** 2 for name in self.parameter_names))

    # ---- state kept in checkpoints ------------------------------------------------------------------------------

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """The server optimizer's per-parameter tensors (momentum buffers), named by parameter."""
        names = {id(parameter): name for name, parameter in self.model.named_parameters()}
        tensors = {}
        for parameter, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{names[id(parameter)]}.{key}"] = value
        return tensors

    def optimizer_manifest(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors a checkpoint of this optimizer may hold: a state of each parameter's shape and dtype."""
        return {
            f"{name}.{key}": (tuple(parameter.shape), parameter.dtype)
            for name, parameter in self.model.named_parameters()
            for key in OPTIMIZER_STATE_KEYS
        }

    def restore(self, optimizer_tensors: dict[str, torch.Tensor], rounds_noised: int) -> None:
        """Take back the server optimizer's state and the privacy spent, after the model was loaded."""
        parameters = dict(self.model.named_parameters())
        device = next(self.model.parameters()).device
        negative = [name for name, tensor in optimizer_tensors.items() if name.endswith(".v") and bool((tensor < 0).any())]
        if negative:  # a second moment is a running mean of squares: a negative one makes its square root NaN
            raise ValueError(f"the checkpoint's optimizer state {negative[0]} holds negative second moments: it was altered")
        for name, tensor in optimizer_tensors.items():
            parameter_name, key = name.rsplit(".", 1)
            self.optimizer.state[parameters[parameter_name]][key] = tensor.to(device)
        if self.accountant is not None:
            self.accountant.step(rounds_noised)
        self.model_norm = self.current_model_norm()
