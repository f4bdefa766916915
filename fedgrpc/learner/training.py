"""A learner's local work: each round's batches, its optimizer, the training loop and the update it reports."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from fedgrpc.algorithms import aggregation, schedule
from fedgrpc.config.options import LOCAL_TRAINING
from fedgrpc.data import derive_seed
from fedgrpc.learner.momentum import MomentumStore
from fedgrpc.protos import leader_pb2
from fedgrpc.task import Task

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 10  # steps between progress-bar loss updates: each reads the loss off the device


def batches_per_epoch(size: int, batch_size: int) -> int:
    """Batches per epoch: a last batch of one example is dropped (BatchNorm cannot train on it)."""
    full, rest = divmod(size, batch_size)
    return full + (1 if rest > 1 or size == 1 else 0)


def steps_per_round(plan: leader_pb2.TrainingPlan, size: int) -> int:
    """Local batches per round: one in fedsgd, --local-steps or --local-epochs worth in fedavg."""
    if plan.aggregation == "fedsgd":
        return 1
    if plan.local_steps > 0:
        return plan.local_steps
    return batches_per_epoch(size, plan.batch_size) * plan.local_epochs


def round_batches(plan: leader_pb2.TrainingPlan, learner_id: int, size: int, round_number: int) -> list[torch.Tensor]:
    """Round `round_number`'s batches of example indices, a function of (seed, learner id, round) alone.

    Batches run through seeded shuffles of the data epoch after epoch, continuing across rounds,
    so a restarted learner or leader replays exactly the batches an uninterrupted run would use.
    """
    batch_size = plan.batch_size
    per_epoch = batches_per_epoch(size, batch_size)
    steps = steps_per_round(plan, size)
    batches = []
    order_epoch, order = -1, torch.empty(0, dtype=torch.int64)
    for step in range((round_number - 1) * steps, round_number * steps):
        epoch, index = divmod(step, per_epoch)
        if epoch != order_epoch:
            generator = torch.Generator().manual_seed(derive_seed(plan.seed, learner_id, "epoch", epoch))
            order_epoch, order = epoch, torch.randperm(size, generator=generator)
        batches.append(order[index * batch_size : (index + 1) * batch_size])
    return batches


def add_proximal_gradient(model: torch.nn.Module, global_state: dict[str, torch.Tensor], mu: float) -> None:
    """FedProx: add the gradient of (mu/2) * ||w - w_global||^2, which is mu * (w - w_global), to each parameter's."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.grad is not None and name in global_state:  # the personal part is not pulled anywhere
                parameter.grad.add_(parameter - global_state[name], alpha=mu)


class LocalSGD:
    """SGD with momentum and weight decay exactly as torch.optim.SGD computes it on one tensor at a time (no dampening,
    no Nesterov), without torch.optim: its first use imports PyTorch's compiler, 1.7 s and 150 MB in every learner."""

    def __init__(self, parameters: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float) -> None:
        self.parameters = list(parameters)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.parameters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient."""
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One step: p -= lr * buf, where buf = momentum * buf + (grad + weight_decay * p), starting from the first gradient."""
        for index, parameter in enumerate(self.parameters):
            if parameter.grad is None:
                continue
            grad = parameter.grad
            if self.weight_decay != 0:
                grad = grad.add(parameter, alpha=self.weight_decay)
            if self.momentum != 0:
                buffer = self.momentum_buffers[index]
                if buffer is None:
                    buffer = torch.clone(grad).detach()
                    self.momentum_buffers[index] = buffer
                else:
                    buffer.mul_(self.momentum).add_(grad)
                grad = buffer
            parameter.add_(grad, alpha=-self.lr)


class LocalTrainer:
    """Trains one learner's model on its split, round after round, as the plan says; keeps momentum across rounds if asked."""

    def __init__(
        self,
        plan: leader_pb2.TrainingPlan,
        learner_id: int,
        model: torch.nn.Module,
        forward: Callable[..., torch.Tensor],
        task: Task,
        tensors: Sequence[torch.Tensor],
        memory_format: torch.memory_format,
        progress: bool,
        slowdown: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        shared: Any = None,
        kept: MomentumStore | None = None,
        owner: int = -1,
    ) -> None:
        self.plan = plan
        self.learner_id = learner_id
        self.model = model
        # what the update covers: the model's shared part (sharing.part); its personal part trains but is not reported
        self.shared = shared if shared is not None else model
        self.forward = forward  # the model, or with --compile its compiled form
        self.task = task
        # The split is kept where the model trains (on the CPU, the same tensors): a GPU step then reads,
        # crops and flips its batch on the GPU rather than on the host and copying it over every step.
        self.tensors = tuple(tensors)
        self.memory_format = memory_format
        self.progress = progress
        # a straggler on purpose (learner.py --slowdown): each step is followed by a pause of (slowdown - 1) times its
        # own duration, so that it takes `slowdown` times as long; `clock` and `sleep` are the time it is measured in
        self.slowdown = slowdown
        self._clock = clock
        self._sleep = sleep
        self._optimizer: LocalSGD | None = None  # kept across rounds with the plan's keep_momentum
        self._last_round = 0  # the round the optimizer last trained
        # with keep_momentum, each round's momentum, kept beyond this trainer's session; `owner` says whose data made it:
        # this learner id's split from the leader, or -1 for the learner's own data
        self.kept = kept
        self.owner = owner

    def train(self, round_number: int) -> tuple[dict[str, torch.Tensor], int, float]:
        """Do round `round_number`'s local work; returns (update, examples used, mean loss)."""
        plan = self.plan
        model = self.model
        device = self.tensors[-1].device
        model.train()
        augment_generator = torch.Generator().manual_seed(derive_seed(plan.seed, self.learner_id, "augment", round_number))
        batches = round_batches(plan, self.learner_id, len(self.tensors[-1]), round_number)
        logger.debug("round %d: training on %d local batches", round_number, len(batches))
        global_state = {name: tensor.clone() for name, tensor in self.shared.state_dict().items()}
        lr = schedule.round_lr(plan.lr, plan.lr_schedule or "constant", plan.warmup_rounds, plan.rounds, round_number)
        optimizer = self._round_optimizer(lr, round_number)
        # Summed where the model runs: reading each step's loss would make a GPU step wait for the one before.
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        examples = 0
        progress = tqdm(
            batches, desc=f"round {round_number}", unit="batch", leave=False, disable=None if self.progress else True
        )  # None: only on a terminal
        for step, indices in enumerate(progress):
            started = self._clock() if self.slowdown > 1 else 0.0
            indices = indices.to(device)
            inputs, targets = self.task.make_batch(self.tensors, indices, augment_generator if plan.augment else None, self.memory_format)
            optimizer.zero_grad(set_to_none=True)
            loss = self.task.loss(self.forward(*inputs), targets)
            loss.backward()
            if plan.aggregation in LOCAL_TRAINING:
                if plan.prox_mu:
                    add_proximal_gradient(model, global_state, plan.prox_mu)
                optimizer.step()
            total_loss += loss.detach().double() * len(indices)
            examples += len(indices)
            if self.slowdown > 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the step's kernels are done: its time is real, not its launch's
                self._sleep((self.slowdown - 1) * (self._clock() - started))
            if not progress.disable and step % PROGRESS_EVERY == 0:
                progress.set_postfix(loss=f"{total_loss.item() / examples:.3f}", refresh=False)
        progress.close()
        if plan.keep_momentum and self.kept is not None:
            self.kept.keep(round_number, self.owner, optimizer.momentum_buffers)
        if plan.aggregation == "fedsgd":
            update = aggregation.gradient_update(self.shared)
        else:
            update = aggregation.model_delta(global_state, self.shared)
        return update, examples, total_loss.item() / examples

    def finetune(self, model: torch.nn.Module, round_number: int) -> None:
        """Personalized evaluation's fine-tuning: the plan's personal_steps SGD steps on this learner's data, in `model` (a copy)."""
        plan = self.plan
        device = self.tensors[-1].device
        generator = torch.Generator().manual_seed(derive_seed(plan.seed, self.learner_id, "finetune", round_number))
        optimizer = LocalSGD(list(model.parameters()), plan.lr, plan.momentum, plan.weight_decay)
        size = len(self.tensors[-1])
        model.train()
        for _ in range(plan.personal_steps):
            indices = torch.randperm(size, generator=generator)[: plan.batch_size].to(device)
            inputs, targets = self.task.make_batch(self.tensors, indices, generator if plan.augment else None, self.memory_format)
            optimizer.zero_grad()
            self.task.loss(model(*inputs), targets).backward()
            optimizer.step()

    def _round_optimizer(self, lr: float, round_number: int) -> LocalSGD:
        """Round `round_number`'s SGD at `lr`: a fresh one, or with keep_momentum the one kept from earlier rounds.

        A kept optimizer still steps the same parameter tensors: loading a global model copies into them. One that
        trained this round or a later one already (a leader restarted from an earlier checkpoint asks again; under
        fedbuff a learner may take two jobs on one model) is replaced by the momentum the round before left, from `kept`.
        """
        plan = self.plan
        optimizer = self._optimizer
        replayed = optimizer is not None and (
            self._last_round > round_number or (self._last_round == round_number and plan.aggregation != "fedbuff")
        )
        if not plan.keep_momentum or optimizer is None or replayed:
            optimizer = LocalSGD(list(self.model.parameters()), lr, plan.momentum, plan.weight_decay)
            kept = self.kept.before(round_number, self.owner, optimizer.parameters) if plan.keep_momentum and self.kept else None
            if kept is not None:
                optimizer.momentum_buffers = kept
            self._optimizer = optimizer
        self._last_round = round_number
        optimizer.lr = lr
        return optimizer
