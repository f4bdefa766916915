"""The learner's command line: its flags in titled groups, parsed into a LearnerConfig (shared groups: config/options.py)."""

from __future__ import annotations

import argparse

from fedgrpc.config.choices import CHANNELS_LAST_SETTINGS
from fedgrpc.config.files import parse_with_config, read_enrolment_token
from fedgrpc.config.options import LearnerConfig, Parser, add_compute_flags, add_output_flags, add_security_flags, at_least_one
from fedgrpc.transport import rpc
from fedgrpc.transport.tls import Tls


def build_learner_parser() -> Parser:
    """The learner's command line, in titled groups; every flag's help states its default."""
    defaults = LearnerConfig()
    parser = Parser(description="Federated learning learner: trains on local or leader-sent data and reports updates.")
    group = parser.add_argument_group("federation")
    add = group.add_argument
    add("--leader", default=defaults.leader, help="the leader's host:port")
    add("--host", default=defaults.host, help="address this learner's server listens on")
    add("--port", type=int, default=defaults.port, help="port this learner's server listens on (0 picks a free one)")
    add(
        "--advertise-address",
        default=defaults.advertise_address,
        help="host:port the leader should call back; None means this machine's address on the route to the leader "
        "(another address than the one the leader sees calls come from needs the enrolment secret)",
    )

    group = parser.add_argument_group("data")
    group.add_argument(
        "--task",
        default=defaults.task,
        metavar="FILE.py|MODULE",
        help="the leader's --task, which this machine holds too (None: the leader's built-in model)",
    )
    group.add_argument(
        "--data-dir",
        default=defaults.data_dir,
        help="train on local data here (your task's train_data(data_dir), or for a built-in model train/<class>/* or "
        "CIFAR-10); None means receive a split from the leader",
    )
    add(
        "--personal-dir",
        default=defaults.personal_dir,
        help="where this learner writes its personal part (what the leader's --share keeps off the wire) after each round, "
        "and reads it back when it starts again; None keeps it in memory only",
    )

    group = parser.add_argument_group("training")
    add = group.add_argument
    add(
        "--channels-last",
        choices=CHANNELS_LAST_SETTINGS,
        default=defaults.channels_last,
        help="train in the channels-last memory format: auto uses it on a CPU for the models measured faster in it (resnet20, resnet18-cifar)",
    )
    add(
        "--compile",
        action="store_true",
        help="compile the training step with torch.compile (on CUDA also as a CUDA graph), for GPUs where launching "
        "kernels bounds the step; the first round pays the compile time",
    )
    add(
        "--slowdown",
        type=at_least_one,
        default=defaults.slowdown,
        metavar="FACTOR",
        help="a straggler on purpose, for tests and benchmarks: pause after each training step so that it takes FACTOR "
        "times as long (1: full speed)",
    )

    group = parser.add_argument_group("faults and timeouts")
    add = group.add_argument
    add(
        "--connect-timeout",
        type=float,
        default=defaults.connect_timeout,
        help="seconds to keep trying to reach the leader, or to wait for a slot in a full federation",
    )
    add(
        "--leader-lost-after",
        type=float,
        default=defaults.leader_lost_after,
        help="seconds without an answer from the leader before this learner counts it as gone",
    )
    add(
        "--rejoin",
        action=argparse.BooleanOptionalAction,
        default=defaults.rejoin,
        help="when the leader goes away or ends this learner's session, register again (for up to --connect-timeout) "
        "and go on, e.g. after leader.py --resume",
    )

    add_security_flags(parser, defaults, "learner")
    add_compute_flags(parser, defaults, "training")
    group = parser.add_argument_group("output")
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=defaults.progress,
        help="a progress bar over local batches, when output is a terminal",
    )
    add_output_flags(group, "no progress bar; log warnings and errors only")
    return parser


def parse_learner_config(argv: list[str] | None = None) -> tuple[LearnerConfig, bool, str | None, Tls | None]:
    """Parse the learner's command line: its config, the verbose flag, the enrolment secret and its TLS files."""
    parser = build_learner_parser()
    args = vars(parse_with_config(parser, argv))
    args.pop("config")
    verbose = args.pop("verbose")
    token_file = args.pop("token_file")
    config = LearnerConfig(**args)
    try:
        enrolment_token = read_enrolment_token(token_file)
        tls = Tls.from_files(config.tls_cert, config.tls_key, config.tls_ca)
        rpc.parse_address(config.leader)
        if config.advertise_address:
            rpc.parse_address(config.advertise_address)
    except ValueError as error:
        parser.error(str(error))
    return config, verbose, enrolment_token, tls
