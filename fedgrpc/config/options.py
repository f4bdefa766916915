"""Both roles' command lines: shared flag groups, the settings they resolve to and their validation (config files: files.py)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from fedgrpc.algorithms import schedule
from fedgrpc.config.choices import (
    COMPRESSION_MODES,
    DATASETS,
    ENROLMENT_ENV,
    MODEL_NAMES,
    PARTITIONS,
    RULE_NAMES,
    SERVER_OPTIMIZERS,
    STREAM_IDLE_TIMEOUT_S,
)
from fedgrpc.config.files import parse_with_config, read_enrolment_token
from fedgrpc.config.run_dir import expand_resume, resolve_paths

logger = logging.getLogger(__name__)

DEFAULT_PORT = 10134  # the blog's port
AGGREGATIONS = ("fedsgd", "fedavg", "fedbuff")
LOCAL_TRAINING = ("fedavg", "fedbuff")  # learners train locally and report their model's change
# fedbuff's default buffer: one update per learner training at once, and no more than FedBuff's paper found enough at scale
FEDBUFF_DEFAULT_MAX_BUFFER = 10
# fedbuff's default --max-staleness: this many times the staleness of updates from learners that all train at one pace
STALENESS_LIMIT_FACTOR = 4
DATA_MODES = ("split", "local")
EVALUATIONS = ("auto", "leader", "learners", "both")
SHARE_PRESETS = ("all", "fedper", "fedbn", "adapters")  # sharing.py's, named here so that a bad flag does not wait for PyTorch
# --round-timeout 0: once the quorum has reported, the rest get this factor of the time it took, and at least
# the floor; before that, health checks find the members that are gone.
STRAGGLER_GRACE_FACTOR = 2.0
STRAGGLER_GRACE_MIN_S = 30.0


@dataclass(frozen=True)
class LeaderConfig:
    """Everything a federation run is configured by; saved with every checkpoint."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    learners: int = 2
    min_learners: int = 0  # 0: half of each round's learners, rounded up, so that a federation survives losing the rest
    rounds: int = 10
    aggregation: str = "fedsgd"
    task: str | None = None  # a user's task file or module; None: the built-in --model on --dataset
    model: str = "resnet18"
    dataset: str = "cifar10"
    data_dir: str | None = "data"
    data_mode: str = "split"
    batch_size: int = 32
    lr: float = 0.01
    lr_schedule: str = "constant"
    warmup_rounds: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.001
    server_opt: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    prox_mu: float = 0.0
    keep_momentum: bool | None = None  # None: kept_momentum() decides
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_learner: int = 2
    fraction: float = 1.0
    rule: str = "mean"
    trim: float = 0.1
    byzantine: int = 0
    clip_norm: float = 0.0  # 0: no clipping
    dp_noise_multiplier: float = 0.0  # 0: no differential privacy
    dp_delta: float = 1e-5
    local_steps: int = 0
    local_epochs: int = 1
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    run_dir: str | None = None  # None: runs/<start time>
    checkpoint_dir: str | None = None  # None: <run_dir>/checkpoints
    keep_checkpoints: int = 3
    checkpoint_every: int = 0  # 0: by --checkpoint-seconds only
    checkpoint_seconds: float = 60.0  # a crash loses at most about this much work; writing ResNet-18 takes ~0.1 s
    tensorboard: bool = False
    quiet: bool = False
    log_format: str = "text"  # text: one escaped line per record; json: one JSON object per line
    join_timeout: float = 600.0
    round_timeout: float = 0.0  # 0: fitted to the round (STRAGGLER_GRACE_FACTOR)
    eval_every: int = 1
    evaluation: str = "auto"  # auto: the leader on its test set, the learners on theirs where the leader has none
    evaluation_learners: int = 0  # learners asked to evaluate each time; 0: every member of the round
    share: str | None = None  # what is federated (sharing.py); None: the task's shared(), else all
    personal_steps: int = 0  # learners also evaluate after this many local fine-tuning steps; 0: not
    secure_aggregation: bool = False  # SecAgg+: the leader learns only each round's sum
    buffer_size: int = 0  # fedbuff: updates per aggregation; 0: --concurrency, at most FEDBUFF_DEFAULT_MAX_BUFFER
    max_staleness: int = 0  # fedbuff: 0: STALENESS_LIMIT_FACTOR times the staleness of learners that train at one pace
    concurrency: int = 0  # fedbuff: learners training at once; 0: every learner
    secagg_neighbours: int = 0  # 0: secagg.default_neighbours (O(log n))
    secagg_threshold: int = 0  # 0: a majority of the neighbours
    recompute_bn: int = 0  # training images the leader recomputes BatchNorm statistics from after averaging; 0: none
    learner_lost_after: float = 30.0
    max_update_norm: float = 0.0  # 0: no fixed bound
    max_norm_ratio: float = 10.0  # honest updates of one round differ by a few times at most; 0: no adaptive bound
    max_weight_ratio: float = 4.0  # 0: declared example counts are trusted
    compression: str = "none"
    topk_ratio: float = 0.01
    deterministic: bool = False
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT_S
    reflection: bool = False
    resume: str | None = None  # a run directory to continue
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def learners_evaluate(self, leader_has_test_data: bool) -> bool:
        """Whether the learners evaluate global models on their own data (--evaluation, and auto without a leader's test set)."""
        chosen = self.evaluation in ("learners", "both") or (self.evaluation == "auto" and not leader_has_test_data)
        return self.eval_every > 0 and chosen

    def round_quorum(self, members: int) -> int:
        """Learners that must report for a round of `members` to count: --min-learners, or half of them rounded up."""
        if self.min_learners:
            return max(1, min(self.min_learners, members))
        return max(1, math.ceil(members / 2))

    def training_slots(self) -> int:
        """fedbuff: learners that may train at once (--concurrency, or every learner)."""
        return self.concurrency or self.learners

    def buffered_updates(self) -> int:
        """fedbuff: updates each aggregation takes (--buffer-size, or one per training slot up to FEDBUFF_DEFAULT_MAX_BUFFER)."""
        return self.buffer_size or min(FEDBUFF_DEFAULT_MAX_BUFFER, self.training_slots())

    def staleness_limit(self) -> int:
        """fedbuff: the most aggregations an update may lag behind (--max-staleness, or a multiple of the usual lag)."""
        return self.max_staleness or STALENESS_LIMIT_FACTOR * math.ceil(self.training_slots() / self.buffered_updates())

    def sampled(self, available: int) -> int:
        """Learners asked to take part in a round when `available` could: --fraction of them, at least --min-learners."""
        return min(available, max(math.ceil(self.fraction * available), self.min_learners, 1))


@dataclass(frozen=True)
class LearnerConfig:
    """A learner's command-line settings."""

    leader: str = f"127.0.0.1:{DEFAULT_PORT}"
    host: str = "0.0.0.0"
    port: int = 0
    advertise_address: str | None = None
    task: str | None = None  # the leader's task file or module, held here too; None: the leader's built-in model
    data_dir: str | None = None
    device: str = "auto"
    threads: int = 0
    connect_timeout: float = 60.0
    leader_lost_after: float = 30.0
    rejoin: bool = True
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    progress: bool = True
    quiet: bool = False
    log_format: str = "text"  # text: one escaped line per record; json: one JSON object per line
    channels_last: str = "auto"
    compile: bool = False
    slowdown: float = 1.0  # 1: full speed
    personal_dir: str | None = None  # where the personal part (--share) is written after each round; None: kept in memory


class Parser(argparse.ArgumentParser):
    """argparse with titled groups in --help, and a one-line error that names the closest flag for a typo."""

    def __init__(self, **kwargs: Any) -> None:
        main_spec = getattr(sys.modules["__main__"], "__spec__", None)
        if kwargs.get("prog") is None and main_spec is not None and main_spec.name.endswith(".__main__"):
            kwargs["prog"] = f"python -m {main_spec.name.removesuffix('.__main__')}"  # not "__main__.py"
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print `prog: error: message` (with a suggestion for an unknown flag) and a pointer to --help; no usage block."""
        if message.startswith("unrecognized arguments:"):
            flags = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
            hints = []
            for unknown in message.split(":", 1)[1].split():
                if unknown.startswith("-"):
                    close = difflib.get_close_matches(unknown.split("=", 1)[0], flags, n=1)
                    if close:
                        hints.append(f"{unknown}: did you mean {close[0]}?")
            if hints:
                message = f"{message} ({'; '.join(hints)})"
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


# ---- value types: a bad value is refused with the range it must lie in ----------------------------------------------


def bounded(name: str, kind: Callable[[str], float], holds: Callable[[float], bool], bound: str) -> Callable[[str], Any]:
    """An argparse type named `name` (argparse names it in its own errors): `kind` of the text, refused unless
    `holds` it, with "must be {bound}, got VALUE" (the parsed value, never the raw text)."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = parse.__qualname__ = name
    return parse


non_negative_int = bounded("non_negative_int", int, lambda value: value >= 0, "at least 0")
positive_int = bounded("positive_int", int, lambda value: value >= 1, "at least 1")
# the float types' comparisons refuse NaN
non_negative_float = bounded("non_negative_float", float, lambda value: value >= 0, "at least 0")
positive_float = bounded("positive_float", float, lambda value: value > 0, "above 0")
fraction = bounded("fraction", float, lambda value: 0 < value <= 1, "in (0, 1]")
at_least_one = bounded("at_least_one", float, lambda value: value >= 1, "1 or more")
probability_below_one = bounded("probability_below_one", float, lambda value: 0 <= value < 1, "in [0, 1)")


# ---- groups both roles share --------------------------------------------------------------------------------------


def add_compute_flags(parser: argparse.ArgumentParser, defaults: Any, threads_for: str) -> None:
    """--device and --threads."""
    group = parser.add_argument_group("compute")
    group.add_argument("--device", default=defaults.device, help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    group.add_argument("--threads", type=int, default=defaults.threads, help=f"CPU threads for {threads_for} (0: PyTorch's default)")


def add_security_flags(parser: argparse.ArgumentParser, defaults: Any, role: str) -> argparse._ArgumentGroup:
    """The enrolment secret and TLS files."""
    group = parser.add_argument_group("security")
    if role == "leader":
        token_help = f"file holding the enrolment secret learners must present to register (or set ${ENROLMENT_ENV}); None means anyone who reaches the port may join"
        cert_help = "PEM certificate to serve TLS with (and to present when calling learners)"
        ca_help = "PEM CA certificate that learners' certificates must chain to; also requires learners to present one (mutual TLS)"
    else:
        token_help = f"file holding the federation's enrolment secret (or set ${ENROLMENT_ENV}); None means none"
        cert_help = "PEM certificate this learner serves TLS with and presents to the leader"
        ca_help = "PEM CA certificate the leader's certificate must chain to (turns on TLS to the leader)"
    group.add_argument("--token-file", default=None, help=token_help)
    group.add_argument("--tls-cert", default=defaults.tls_cert, help=cert_help)
    group.add_argument("--tls-key", default=defaults.tls_key, help="PEM private key of --tls-cert")
    group.add_argument("--tls-ca", default=defaults.tls_ca, help=ca_help)
    return group


LOG_FORMATS = ("text", "json")


def add_output_flags(group: argparse._ArgumentGroup, quiet_help: str) -> None:
    """-q and -v."""
    group.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    group.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text: one line per record, what a peer sent escaped; json: one JSON object per line, for tools that parse logs",
    )


# ---- the leader -----------------------------------------------------------------------------------------------------


def build_leader_parser(prog: str | None = None, description: str | None = None) -> Parser:
    """The leader's command line (local_federation.py takes it too), in titled groups; every flag's help states its default."""
    defaults = LeaderConfig()
    parser = Parser(prog=prog, description=description or "Federated learning leader: serves the global model and coordinates rounds.")

    group = parser.add_argument_group("federation")
    add = group.add_argument
    add("--host", default=defaults.host, help="address to listen on")
    add("--port", type=int, default=defaults.port, help="port to listen on (0 picks a free one)")
    add("--learners", type=positive_int, default=defaults.learners, help="learners to wait for before training starts")
    add(
        "--min-learners",
        type=non_negative_int,
        default=defaults.min_learners,
        help="learners that must report for a round to count (0: half of the round's learners, rounded up, so that a "
        "federation of 2 survives losing one)",
    )
    add("--rounds", type=positive_int, default=defaults.rounds, help="federated rounds to run")
    add(
        "--fraction",
        type=fraction,
        default=defaults.fraction,
        help="share of the live learners asked to take part in each round (seeded sample, at least --min-learners)",
    )
    add("--seed", type=int, default=defaults.seed, help="seed of the model, the split and the learners' shuffling")

    group = parser.add_argument_group("data")
    add = group.add_argument
    add(
        "--task",
        default=defaults.task,
        metavar="FILE.py|MODULE",
        help="your task file or module: model(), train_data(dir), test_data(dir), optional loss() and metrics(); every learner holds it too (None: the built-in --model on --dataset)",
    )
    add("--model", choices=MODEL_NAMES, default=defaults.model, help="built-in architecture, built from model.py on both sides")
    add("--dataset", choices=DATASETS, default=defaults.dataset, help="data set kind")
    add("--data-dir", default=defaults.data_dir, help="where the data set lives (CIFAR-10 downloads here when online)")
    add(
        "--data-mode",
        choices=DATA_MODES,
        default=defaults.data_mode,
        help="split: the leader sends each learner its split (GetData); local: learners train on their own --data-dir",
    )
    add(
        "--partition",
        choices=PARTITIONS,
        default=defaults.partition,
        help="how the leader splits the training set: iid, dirichlet (label skew by --alpha) or shards (--classes-per-learner classes each)",
    )
    add("--alpha", type=positive_float, default=defaults.alpha, help="dirichlet: concentration (small: each learner sees few classes)")
    add("--classes-per-learner", type=positive_int, default=defaults.classes_per_learner, help="shards: label shards per learner")

    group = parser.add_argument_group("training")
    add = group.add_argument
    add(
        "--aggregation",
        choices=AGGREGATIONS,
        default=defaults.aggregation,
        help="fedsgd: one batch per learner, the leader averages gradients and takes an SGD step; "
        "fedavg: learners train locally, the leader averages their model deltas; "
        "fedbuff: fedavg without rounds to wait for: learners train continuously and every --buffer-size updates, "
        "each discounted by how many versions old its model is, make the next model (stragglers stop setting the pace)",
    )
    add("--batch-size", type=positive_int, default=defaults.batch_size, help="examples per local batch")
    add("--lr", type=float, default=defaults.lr, help="SGD learning rate (the leader's in fedsgd, the learners' in fedavg)")
    add(
        "--lr-schedule",
        choices=schedule.SCHEDULES,
        default=defaults.lr_schedule,
        help="--lr across rounds, after --warmup-rounds of linear warm-up: constant, or cosine decay over the rest",
    )
    add("--warmup-rounds", type=non_negative_int, default=defaults.warmup_rounds, help="rounds over which --lr ramps up linearly")
    add("--momentum", type=float, default=defaults.momentum, help="SGD momentum (same side as --lr)")
    add("--weight-decay", type=float, default=defaults.weight_decay, help="SGD weight decay (same side as --lr)")
    add("--local-steps", type=int, default=defaults.local_steps, help="fedavg, fedbuff: local batches per round (0: use --local-epochs)")
    add("--local-epochs", type=positive_int, default=defaults.local_epochs, help="fedavg, fedbuff: local epochs per round")
    add(
        "--buffer-size",
        type=non_negative_int,
        default=defaults.buffer_size,
        metavar="K",
        help=f"fedbuff: updates that make one aggregation, which counts as a round (0: --concurrency, at most "
        f"{FEDBUFF_DEFAULT_MAX_BUFFER})",
    )
    add(
        "--max-staleness",
        type=non_negative_int,
        default=defaults.max_staleness,
        help="fedbuff: refuse an update trained on a model more than this many aggregations old (0: "
        f"{STALENESS_LIMIT_FACTOR} times concurrency / buffer size, rounded up)",
    )
    add(
        "--concurrency",
        type=non_negative_int,
        default=defaults.concurrency,
        help="fedbuff: learners training at once; the rest wait their turn, so that fast learners cannot flood the buffer "
        "(0: every learner)",
    )
    add(
        "--prox-mu",
        type=non_negative_float,
        default=defaults.prox_mu,
        help="FedProx: learners add (mu/2)*||w - w_global||^2 to their loss (0: plain local SGD)",
    )
    add(
        "--keep-momentum",
        action=argparse.BooleanOptionalAction,
        default=defaults.keep_momentum,
        help="fedavg, fedbuff: learners keep their SGD momentum from round to round instead of starting each round from "
        "none (None: kept when every learner trains every round, --fraction 1, and --momentum is above 0)",
    )
    add("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment, help="random crop and flip on the learners")
    add(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=defaults.deterministic,
        help="deterministic kernels on the learners and updates summed in learner order, so that a resumed run "
        "reproduces an uninterrupted one bit for bit (with kept momentum: if the learners live through the restart; "
        "checkpoints every round then); the leader holds every update of a round in memory",
    )

    group = parser.add_argument_group("server optimizer")
    add = group.add_argument
    add(
        "--server-opt",
        choices=SERVER_OPTIMIZERS,
        default=defaults.server_opt,
        help="the leader's optimizer on the averaged update: sgd (FedAvg; in fedsgd the blog's SGD with --lr, --momentum, "
        "--weight-decay), sgdm (FedAvgM), adam, yogi or adagrad (FedOpt, Reddi et al. 2021); all but fedsgd's sgd use --server-lr",
    )
    add(
        "--server-lr",
        type=float,
        default=defaults.server_lr,
        help="server step size (1 with sgd is plain FedAvg; FedOpt wants about 0.01-0.1)",
    )
    add(
        "--server-momentum",
        type=float,
        default=defaults.server_momentum,
        help="server momentum of sgd and sgdm (0: none for sgd, 0.9 for sgdm)",
    )
    add("--server-beta1", type=float, default=defaults.server_beta1, help="adam, yogi, adagrad: first-moment decay")
    add("--server-beta2", type=float, default=defaults.server_beta2, help="adam, yogi: second-moment decay")
    add(
        "--server-tau",
        type=positive_float,
        default=defaults.server_tau,
        help="adam, yogi, adagrad: adaptivity (the epsilon added to the root of v)",
    )

    group = parser.add_argument_group("robustness and privacy")
    add = group.add_argument
    add(
        "--rule",
        "--aggregator",
        dest="rule",
        choices=RULE_NAMES,
        default=defaults.rule,
        help="how a round's updates combine: mean (weighted by examples), coordinate-wise median, trimmed-mean (--trim), "
        "krum or multi-krum (--byzantine)",
    )
    add("--trim", type=float, default=defaults.trim, help="trimmed-mean: share of the values dropped at each end of every coordinate")
    add(
        "--byzantine",
        type=non_negative_int,
        default=defaults.byzantine,
        help="krum, multi-krum: learners that may be hostile (needs more than 2f+2 per round)",
    )
    add(
        "--max-norm-ratio",
        type=non_negative_float,
        default=defaults.max_norm_ratio,
        help="scale down any update whose parameter L2 norm exceeds this many times the median of the last round's "
        "updates (in the first round: twice the model's own norm), so that no single update can swamp a round (0: off)",
    )
    add(
        "--max-weight-ratio",
        type=non_negative_float,
        default=defaults.max_weight_ratio,
        help="--data-mode local: an update weighs at most this many times the median example count the round's "
        "learners declared, so that no learner outweighs the rest by claiming more (0: trust the declared counts)",
    )
    add(
        "--max-update-norm",
        type=non_negative_float,
        default=defaults.max_update_norm,
        help="refuse updates whose parameter L2 norm exceeds this (0: no fixed bound)",
    )
    add(
        "--clip-norm",
        type=non_negative_float,
        default=defaults.clip_norm,
        help="scale each update's parameters down to this L2 norm (0: no clipping)",
    )
    add(
        "--dp-noise-multiplier",
        type=non_negative_float,
        default=defaults.dp_noise_multiplier,
        help="DP-FedAvg: Gaussian noise of this many times --clip-norm on the sum of updates (0: no differential privacy)",
    )
    add("--dp-delta", type=fraction, default=defaults.dp_delta, help="DP-FedAvg: the delta at which the epsilon spent is reported")
    add(
        "--secure-aggregation",
        action=argparse.BooleanOptionalAction,
        default=defaults.secure_aggregation,
        help="SecAgg+: learners mask their updates so that the leader learns only each round's sum, even when some "
        "drop out; learners clip their own updates to --clip-norm (0: twice the model's initial norm); needs --rule "
        "mean and 3 or more learners per round, and turns the leader's per-update norm checks off",
    )
    add(
        "--secagg-neighbours",
        type=non_negative_int,
        default=defaults.secagg_neighbours,
        help="secure aggregation: learners each one shares its secrets and masks with (0: 2*ceil(1.5*log2 n) for a "
        "round of n, everyone else when n is small)",
    )
    add(
        "--secagg-threshold",
        type=non_negative_int,
        default=defaults.secagg_threshold,
        help="secure aggregation: neighbours' shares that rebuild a learner's secret; fewer surviving neighbours "
        "abort the round, and that many colluding with the leader could unmask one (0: a majority of the neighbours)",
    )
    add(
        "--recompute-bn",
        type=non_negative_int,
        default=defaults.recompute_bn,
        metavar="IMAGES",
        help="after each round's averaging, recompute the global model's BatchNorm statistics from this many of the "
        "training images the leader holds (--data-mode split): the learners' averaged statistics do not describe "
        "averaged weights (0: keep the average)",
    )

    group = parser.add_argument_group("compression")
    add = group.add_argument
    add(
        "--compression",
        "--compress",
        dest="compression",
        choices=COMPRESSION_MODES,
        default=defaults.compression,
        help="how learners send updates: none (float32), fp16, int8 (per-tensor scale) or topk (--topk-ratio of each "
        "parameter tensor's entries, the rest carried to the next round: error feedback)",
    )
    add("--topk-ratio", type=fraction, default=defaults.topk_ratio, help="topk: share of each parameter tensor's entries sent")

    group = parser.add_argument_group("faults and timeouts")
    add = group.add_argument
    add("--join-timeout", type=float, default=defaults.join_timeout, help="seconds to wait for --learners to register")
    add(
        "--round-timeout",
        type=non_negative_float,
        default=defaults.round_timeout,
        help="seconds a round waits for updates (0: fitted to the round: once the quorum has reported, the rest get "
        f"{STRAGGLER_GRACE_FACTOR:g} times the time that took, at least {STRAGGLER_GRACE_MIN_S:g} s; members that are "
        "gone are found by health checks)",
    )
    add(
        "--learner-lost-after",
        type=positive_float,
        default=defaults.learner_lost_after,
        help="seconds a learner due to report may stay silent to health checks before it is marked absent (a learner "
        "whose port refuses them is marked absent at once)",
    )
    add(
        "--stream-idle-timeout",
        type=positive_float,
        default=defaults.stream_idle_timeout,
        help="seconds a stream may move no message before the leader cancels it, freeing its thread",
    )
    add(
        "--resume",
        metavar="RUN_DIR",
        default=defaults.resume,
        help="continue the run in RUN_DIR from its last checkpoint, with its config (flags given here win, e.g. --rounds)",
    )

    security = add_security_flags(parser, defaults, "leader")
    security.add_argument(
        "--reflection",
        action=argparse.BooleanOptionalAction,
        default=defaults.reflection,
        help="serve gRPC reflection, so that grpcurl can list and describe the services without the .proto files",
    )
    add_compute_flags(parser, defaults, "evaluation")

    group = parser.add_argument_group("output")
    add = group.add_argument
    add(
        "--run-dir",
        default=defaults.run_dir,
        help="directory for this run's config, metrics, plot, log and checkpoints; None means runs/<start time>",
    )
    add("--checkpoint-dir", default=defaults.checkpoint_dir, help="where checkpoints are written; None means <run-dir>/checkpoints")
    add("--keep-checkpoints", type=positive_int, default=defaults.keep_checkpoints, help="rounds of checkpoints to keep")
    add(
        "--checkpoint-seconds",
        type=non_negative_float,
        default=defaults.checkpoint_seconds,
        help="write a checkpoint once this many seconds have passed since the last, after the last round and on "
        "shutdown: a crash loses at most about this much work (a 45 MB model and its momentum cost about 0.1 s of "
        "leader CPU and the disk's fsync time; 0: every round)",
    )
    add(
        "--checkpoint-every",
        type=non_negative_int,
        default=defaults.checkpoint_every,
        help="also write a checkpoint every this many rounds (0: by --checkpoint-seconds only)",
    )
    add(
        "--eval-every",
        type=non_negative_int,
        default=defaults.eval_every,
        help="evaluate the global model on the test set every this many rounds and after the last (0: never, as in a "
        "simulation that measures only training)",
    )
    add(
        "--evaluation",
        choices=EVALUATIONS,
        default=defaults.evaluation,
        help="who evaluates the global model: the leader on its test set, the learners on their own test_data (the "
        "leader records the mean and spread), or both; auto: the leader, or the learners where the leader has no test data",
    )
    add(
        "--evaluation-learners",
        type=non_negative_int,
        default=defaults.evaluation_learners,
        help="learners asked to evaluate each time under --evaluation learners or both (a seeded sample; 0: every member of the round)",
    )
    add(
        "--share",
        choices=SHARE_PRESETS,
        default=defaults.share,
        help="what is federated; the rest stays on each learner: all; fedper (all but the head); fedbn (all but the "
        "normalization layers); adapters (only the parameters that train, e.g. LoRA). Default: the task's shared(), else all",
    )
    add(
        "--personal-steps",
        type=non_negative_int,
        default=defaults.personal_steps,
        help="learners evaluating also report their model after this many local fine-tuning steps (personal_* in metrics.jsonl)",
    )
    add(
        "--tensorboard",
        action="store_true",
        help="also log metrics for TensorBoard under <run-dir>/tensorboard (needs: pip install tensorboard)",
    )
    add_output_flags(group, "no live status line; log warnings and errors only")
    return parser


def kept_momentum(config: LeaderConfig) -> bool:
    """Whether learners keep their momentum across rounds: --keep-momentum, else yes under local SGD with momentum when
    every learner trains every round (a sampled learner's momentum is rounds old when it trains again, and a simulation's
    thousands of virtual learners would each hold a model's worth)."""
    if config.keep_momentum is not None:
        return config.keep_momentum
    return config.aggregation in LOCAL_TRAINING and config.momentum > 0 and config.fraction == 1.0


def parse_leader_config(argv: list[str] | None = None) -> tuple[LeaderConfig, bool, str | None]:
    """Parse the command line into a LeaderConfig, the verbose flag and the enrolment secret (kept out of the config)."""
    parser = build_leader_parser()
    args = vars(parse_with_config(parser, expand_resume(parser, argv)))
    args.pop("config")
    verbose = args.pop("verbose")
    try:
        enrolment_token = read_enrolment_token(args.pop("token_file"))
        config = resolve_paths(LeaderConfig(**args))
    except ValueError as error:
        parser.error(str(error))
    if config.min_learners > config.learners:
        parser.error(f"--min-learners {config.min_learners} exceeds --learners {config.learners}")
    if config.concurrency > config.learners:
        parser.error(f"--concurrency {config.concurrency} exceeds --learners {config.learners}")
    config = dataclasses.replace(config, keep_momentum=kept_momentum(config))  # config.json records what was chosen
    default_cadence = not config.checkpoint_every and config.checkpoint_seconds == LeaderConfig.checkpoint_seconds
    if default_cadence and (config.aggregation == "fedbuff" or (config.deterministic and config.keep_momentum)):
        # fedbuff: aggregations come every few seconds and nothing replays them: a crash then loses at most the buffer.
        # --deterministic with kept momentum: learners keep their last rounds' momentum (learner/momentum.py), enough to
        # replay exactly from the last round's checkpoint, not from one written a minute of rounds before
        config = dataclasses.replace(config, checkpoint_every=1)
    if config.secure_aggregation and config.max_norm_ratio == LeaderConfig.max_norm_ratio:
        # the default bound reads each update's norm, which secure aggregation hides: learners clip their own instead
        config = dataclasses.replace(config, max_norm_ratio=0.0)
    from fedgrpc.config.checks import config_problems  # here: checks.py reads this module's settings

    for problem in config_problems(config):
        parser.error(problem)
    return config, verbose, enrolment_token


# ---- the learner ----------------------------------------------------------------------------------------------------
