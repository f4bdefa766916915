"""Leader settings that cannot work together, each named in one line with the flags involved."""

from __future__ import annotations

import math

from fedgrpc.config.choices import FEDOPT_MODES
from fedgrpc.config.options import LOCAL_TRAINING, LeaderConfig


def config_problems(config: LeaderConfig) -> list[str]:
    """Combinations of settings that cannot work, each as a message naming the flags."""
    problems = []
    per_round = config.buffered_updates() if config.aggregation == "fedbuff" else config.sampled(config.learners)
    if config.rule in ("krum", "multi-krum") and per_round <= 2 * config.byzantine + 2:
        problems.append(
            f"--rule {config.rule} needs more than 2*f + 2 learners per round: "
            f"{per_round} with --byzantine {config.byzantine}; add learners or lower --byzantine"
        )
    if config.rule == "trimmed-mean" and not 0 <= config.trim < 0.5:
        problems.append(f"--trim must be in [0, 0.5), got {config.trim}")
    elif config.rule == "trimmed-mean" and math.floor(config.trim * per_round) == 0:
        fix = f"raise --trim to at least {1 / per_round:.3g}" if per_round >= 3 else "it needs 3 or more"
        problems.append(
            f"--rule trimmed-mean with --trim {config.trim} trims nothing from {per_round} learners per round "
            f"(floor({config.trim} x {per_round}) = 0 from each end): {fix}, or add learners"
        )
    if config.dp_noise_multiplier and not config.clip_norm:
        problems.append("--dp-noise-multiplier needs --clip-norm: the noise is calibrated to the clipped norm")
    if config.dp_noise_multiplier and config.rule != "mean":
        problems.append("--dp-noise-multiplier works with --rule mean only (the accountant assumes a clipped sum)")
    if config.server_opt in FEDOPT_MODES and config.server_momentum:
        problems.append(f"--server-opt {config.server_opt} takes its momentum from --server-beta1; leave --server-momentum at 0")
    if config.server_opt != "sgd" and config.server_lr <= 0:
        problems.append(f"--server-opt {config.server_opt} needs --server-lr > 0")
    if config.keep_momentum and config.aggregation not in LOCAL_TRAINING:
        problems.append("--keep-momentum applies to local SGD (fedavg, fedbuff); in fedsgd the leader's optimizer keeps the momentum")
    if config.partition != "iid" and config.data_mode == "local":
        problems.append("--partition applies to the leader's split; with --data-mode local each learner brings its own data")
    if config.recompute_bn and config.data_mode == "local":
        problems.append("--recompute-bn needs training images on the leader; with --data-mode local it has none (use 0)")
    if config.share in ("fedper", "fedbn") and config.aggregation == "fedsgd":
        problems.append(
            f"--share {config.share} needs local training: add --aggregation fedavg (in fedsgd the leader steps every parameter)"
        )
    if config.share not in (None, "all") and config.recompute_bn:
        problems.append(f"--recompute-bn needs the whole model on the leader, and --share {config.share} keeps part of it personal")
    if config.personal_steps and config.aggregation not in LOCAL_TRAINING:
        problems.append("--personal-steps fine-tunes with local SGD (fedavg, fedbuff)")
    if config.aggregation == "fedbuff":
        problems += fedbuff_problems(config)
    elif config.buffer_size or config.max_staleness or config.concurrency:
        problems.append("--buffer-size, --max-staleness and --concurrency apply to --aggregation fedbuff only")
    if config.secure_aggregation:
        problems += secure_aggregation_problems(config, per_round)
    return problems


def fedbuff_problems(config: LeaderConfig) -> list[str]:
    """What --aggregation fedbuff cannot work with: anything that needs a cohort of learners trained in step."""
    problems = []
    if config.secure_aggregation:
        problems.append(
            "--secure-aggregation masks a cohort's updates that only cancel in their sum, and fedbuff has no cohort: "
            "use --aggregation fedavg for secure aggregation"
        )
    if config.fraction < 1 or config.min_learners:
        problems.append("--fraction and --min-learners choose a round's cohort; fedbuff has none: use --concurrency")
    if config.round_timeout:
        problems.append(
            "--round-timeout bounds a round's wait for its members, and fedbuff waits for none: drop it (health checks "
            "find learners that are gone, --learner-lost-after those that go silent)"
        )
    if config.deterministic:
        problems.append("--deterministic replays rounds; in fedbuff the order updates arrive in is the algorithm: drop it")
    if config.lr_schedule != "constant" or config.warmup_rounds:
        problems.append(
            "--lr-schedule and --warmup-rounds follow rounds that every learner trains in; fedbuff's learners train "
            "at their own pace: use a constant --lr (and --server-opt to adapt the leader's step)"
        )
    return problems


def secure_aggregation_problems(config: LeaderConfig, per_round: int) -> list[str]:
    """What --secure-aggregation cannot work with: anything that must see each update, or too few learners to hide one."""
    problems = []
    hidden = "secure aggregation hides each update from the leader"
    if config.rule != "mean":
        problems.append(f"--rule {config.rule} needs every update, and {hidden}: use --rule mean, or drop --secure-aggregation")
    if config.max_update_norm or config.max_norm_ratio:
        problems.append(
            f"--max-update-norm and --max-norm-ratio check each update's norm, and {hidden}: drop them (learners clip "
            "their own updates to --clip-norm)"
        )
    if config.compression != "none":
        problems.append(f"--compression {config.compression} does not apply: masked updates are 32-bit integers; drop it")
    if per_round < 3:
        problems.append(
            f"--secure-aggregation needs 3 or more learners per round ({per_round} here): with 2, each learns the other's update"
        )
    if config.secagg_threshold and config.secagg_neighbours and config.secagg_threshold > config.secagg_neighbours:
        problems.append(f"--secagg-threshold {config.secagg_threshold} exceeds --secagg-neighbours {config.secagg_neighbours}")
    return problems
