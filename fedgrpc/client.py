"""The client API: a script that already trains its own model joins a federation with a few added lines.

    import fedgrpc

    federation = fedgrpc.join(model, task="my_task", leader="HOST:10134", num_examples=len(train_set))
    for round_number in federation.rounds():  # the round's global weights are in `model` now
        train_one_epoch(model, loader, optimizer)  # your own loop, optimizer, loss, precision; an optimizer made once
                                                   # keeps its momentum across rounds, as learner.py does (plan.keep_momentum)
        federation.send(loss=last_loss)  # the model's change this round, weighted by num_examples

It is the learner's own path (fedgrpc.learner.main.Learner: registration, tokens, TLS, compression, secure aggregation, fedbuff
jobs, retries, evaluation calls), with the training step left to the script. The leader runs `--task` with a task
file whose model() builds the same network; `task` names it (the file's name without .py, or its path).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from fedgrpc.algorithms import aggregation
from fedgrpc.config.files import read_enrolment_token
from fedgrpc.config.options import DEFAULT_PORT, LearnerConfig
from fedgrpc.learner.data import LeaderLost, LearnerError, Stopped
from fedgrpc.learner.main import Learner, advertise_address_for, rejoin_pause
from fedgrpc.learner.service import create_server
from fedgrpc.learner.training import round_batches
from fedgrpc.task import Task, task_name
from fedgrpc.transport import rpc
from fedgrpc.transport.tls import Tls

logger = logging.getLogger(__name__)


class ClientError(LearnerError):
    """The script used the client API in a way that cannot work; the message says how to fix it."""


class Federation:
    """A script's membership of a federation: its rounds, and the update it sends for each."""

    def __init__(
        self, model: torch.nn.Module, task: Task, config: LearnerConfig, num_examples: int, enrolment_token: str | None, tls: Any
    ) -> None:
        self.model = model
        self.task = task
        self.config = config
        self.num_examples = num_examples
        self._enrolment_token = enrolment_token
        self._tls = tls
        self._learner: Learner | None = None
        self._server: grpc.Server | None = None
        self._round = 0  # the round being trained, 0 between rounds
        self._join()

    # ---- the script's side ----------------------------------------------------------------------------------------

    @property
    def plan(self) -> Any:
        """The leader's training plan (lr, batch_size, local_steps, rounds, ... as plain fields)."""
        return self._learner.plan

    @property
    def learner_id(self) -> int:
        """This member's id in the federation."""
        return self._learner.learner_id

    def rounds(self) -> Iterator[int]:
        """Each round this member trains, its global model loaded into the model first; ends when the leader says stop.

        A leader that went away is joined again (as learner.py does), and the rounds go on from the one it is at.
        """
        attempt = 0
        while True:
            try:
                for round_number in self._learner.rounds():
                    self._round = round_number
                    yield round_number
                    if self._round:
                        raise ClientError(f"round {round_number} ended without send(): call it once per round, after training")
                    attempt = 0
            except Stopped as stop:
                logger.info("the federation is over: %s", stop)
                self.close()
                return
            except LeaderLost as error:
                if not self.config.rejoin:
                    raise
                pause = rejoin_pause(attempt, random.random())
                attempt += 1
                logger.warning("%s; joining again in %.1fs", error, pause)
                self._leave()
                time.sleep(pause)  # spreads out the members of a restarted leader; the leader itself is awaited by _join
                self._join()

    def send(self, loss: float = 0.0, num_examples: int | None = None) -> None:
        """Send this round's update: the change of the model's weights since the round began (fedsgd: its gradients)."""
        if not self._round:
            raise ClientError("send() outside a round: call it inside `for round_number in federation.rounds():`")
        learner = self._learner
        if learner.plan.aggregation == "fedsgd":
            update = aggregation.gradient_update(learner.shared)
        else:
            update = aggregation.model_delta(learner.round_state, learner.shared)
        round_number, self._round = self._round, 0
        learner.keep_personal(round_number)
        learner.report(round_number, update, num_examples or self.num_examples, float(loss))

    def batches(self, size: int) -> list[torch.Tensor]:
        """This round's batches of indices into `size` examples, as learner.py draws them (the plan's seed, batch size, steps).

        For a script that wants the federation's own schedule; any other order works as well.
        """
        if not self._round:
            raise ClientError("batches() outside a round: call it inside `for round_number in federation.rounds():`")
        return round_batches(self._learner.plan, self._learner.learner_id, size, self._round)

    def close(self) -> None:
        """Stop serving the leader's calls."""
        self._leave()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- membership -----------------------------------------------------------------------------------------------

    def _join(self) -> None:
        former = self._learner
        learner = Learner(self.config, self._enrolment_token, self._tls, self.task)
        learner.own_examples = self.num_examples
        if former is not None and former.learner_id >= 0:  # joining again: ask back the id held (the batches follow it)
            learner.former_learner_id = former.learner_id
        server, port, _ = create_server(learner, self.config.host, self.config.port, self._tls)
        self._learner, self._server = learner, server
        try:
            learner.register(advertise_address_for(self.config, port))
            learner.prepare(train=False)
        except BaseException:
            self._leave()
            raise

    def _leave(self) -> None:
        if self._server is not None:
            self._server.stop(grace=2).wait()
            self._learner.channel.close()
            self._server = None


def join(
    model: torch.nn.Module,
    task: str,
    leader: str = f"127.0.0.1:{DEFAULT_PORT}",
    *,
    num_examples: int,
    test_data: torch.utils.data.Dataset | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
    host: str = "0.0.0.0",
    port: int = 0,
    advertise_address: str | None = None,
    token_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    connect_timeout: float = 60.0,
) -> Federation:
    """Register `model` with the leader at `leader` as a member that trains on `num_examples` examples of its own.

    `task` is the leader's --task (its name, or the path of the same file). With `test_data` (and the task's `loss` and
    `metrics`, cross-entropy and accuracy by default) this member answers the leader's evaluation calls. The enrolment
    secret comes from `token_file` or $FL_ENROLMENT_TOKEN, as for learner.py.
    """
    if num_examples < 1:
        raise ClientError(f"num_examples must be the number of training examples this script uses, got {num_examples}")
    name = task_name(task)

    def no_test_data(data_dir: Any) -> Any:
        raise FileNotFoundError("pass test_data= to client.join() to evaluate on this member's data")

    functions: dict[str, Callable[..., Any]] = {
        "model": lambda: model,
        "train_data": lambda data_dir: None,  # the script's own loop holds its data
        "test_data": (lambda data_dir: test_data) if test_data is not None else no_test_data,
    }
    if loss is not None:
        functions["loss"] = loss
    if metrics is not None:
        functions["metrics"] = metrics
    parameter = next(model.parameters(), None)
    config = LearnerConfig(
        leader=leader,
        host=host,
        port=port,
        advertise_address=advertise_address,
        device=str(parameter.device) if parameter is not None else "cpu",  # the model stays where the script put it
        connect_timeout=connect_timeout,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        progress=False,
    )
    rpc.parse_address(leader)
    tls = Tls.from_files(tls_cert, tls_key, tls_ca)
    enrolment_token = read_enrolment_token(token_file)
    return Federation(model, Task(name, f"client.join(task={task!r})", functions), config, num_examples, enrolment_token, tls)
