"""The names the flags choose among, and the settings both roles' flags share, kept free of PyTorch.

Parsing the leader's flags needs only these, so local_federation.py answers `--help` or a bad flag at once and parses
its flags without loading PyTorch beside the leader and learners it starts. The modules that implement each name
import it from here; tests/test_cli.py checks that they implement exactly these.
"""

from __future__ import annotations

MODEL_NAMES = ("resnet18", "resnet18-cifar", "resnet20", "tiny-cnn", "small-cnn")  # fedgrpc.model.MODELS
DATASETS = ("cifar10", "imagefolder", "synthetic")
PARTITIONS = ("iid", "dirichlet", "shards")
RULE_NAMES = ("mean", "median", "trimmed-mean", "krum", "multi-krum")  # fedgrpc.algorithms.aggregation.RULES
SERVER_OPTIMIZERS = ("sgd", "sgdm", "adam", "yogi", "adagrad")
FEDOPT_MODES = ("adam", "yogi", "adagrad")  # the adaptive ones, run by FedOpt
COMPRESSION_MODES = ("none", "fp16", "int8", "topk")
CHANNELS_LAST_SETTINGS = ("auto", "on", "off")

ENROLMENT_ENV = "FL_ENROLMENT_TOKEN"  # where a process finds the enrolment secret when no --token-file names one
STREAM_IDLE_TIMEOUT_S = 30.0  # a stream that sends nothing for this long is cancelled
