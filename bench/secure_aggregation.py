"""What secure aggregation costs: bytes and seconds per round with and without it, and against Flower 1.42's SecAgg+.

The workload follows ../shared/anchors/flower-secagg/: N learners (4, 20, 100), all of them in every round,
each sending a ResNet-20 update (274,042 values here, the anchor's 272,474 plus BatchNorm's statistics), with
as little local work as a real step allows: one SGD step on a batch of 4 synthetic images. It runs on the Ray
engine (two actors of one CPU) for 5 rounds without evaluation, with no dropouts and with 10% of the learners
dropping out of each round (--simulate-dropout 0.1: under secure aggregation after sharing their keys, so that
the leader must rebuild their mask keys and remove their masks from their neighbours' updates, the costly case).
Plain and secure runs alternate, each alone on the machine.

Per run: seconds per round (median of rounds 2-5; round 1 includes each actor's first step), bytes per round
as the leader counts them (model, updates and every stage message, both directions), the stage seconds the
leader records (stages 1-3 run while learners train; stage 4 after the updates are in), and how many learners
reported. Masking is timed apart: one learner's encode and mask of a ResNet-20 update against the round's
neighbours, as its actor pays it once per learner.

With --flower-python, the anchor's own harness (bench/run_secagg.py) runs Flower's plain and SecAgg+ rounds for
the same N in the same sitting (no dropouts: the harness has none).

    python -m bench.secure_aggregation --runs 3 --flower-python /path/to/venv-flwr/bin/python --out docs/secure-aggregation.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import provenance, report
from fedgrpc.algorithms import secagg
from fedgrpc.model import build_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HARNESS = ROOT.parent / "shared" / "anchors" / "flower-secagg"
ROUNDS = 5
RUN_LIMIT_S = 900
DROPOUT = 0.1
WORKLOAD = [
    "--engine",
    "ray",
    "--dataset",
    "synthetic",
    "--data-mode",
    "local",
    "--examples-per-learner",
    "8",
    "--model",
    "resnet20",
    "--aggregation",
    "fedavg",
    "--batch-size",
    "4",
    "--local-steps",
    "1",
    "--lr",
    "0.1",
    "--momentum",
    "0",
    "--weight-decay",
    "0",
    "--no-augment",
    "--eval-every",
    "0",
    "--rounds",
    str(ROUNDS),
    "--quiet",
]


def run_ours(learners: int, secure: bool, dropout: float, run_dir: Path) -> dict:
    """One run of local_federation.py on the workload; its figures."""
    command = [sys.executable, "local_federation.py", *WORKLOAD, "--learners", str(learners), "--run-dir", str(run_dir)]
    if secure:
        command.append("--secure-aggregation")
    if dropout:
        command += ["--simulate-dropout", str(dropout)]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_LIMIT_S)
    total = time.monotonic() - started
    path = run_dir / "metrics.jsonl"
    rounds = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    completed = result.returncode == 0 and len(rounds) == ROUNDS
    if not completed:
        print(f"N={learners} secure={secure}: did not complete (exit {result.returncode}): {result.stderr[-1500:]}", file=sys.stderr)
    later = rounds[1:]

    def middle(key: str) -> float | None:
        values = [r[key] for r in later if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "round_s": middle("round_seconds"),
        "mb": statistics.median(r["bytes_in"] + r["bytes_out"] for r in later) / 1e6 if later else None,
        "setup_s": middle("secagg_setup_seconds"),
        "unmask_s": middle("secagg_unmask_seconds"),
        "reported": middle("learners_reported"),
        "selected": middle("learners_selected"),
        "total_s": total,
        "completed": completed,
    }


def run_flower(python: str, harness: Path, learners: int, mode: str, scratch: Path, name: str) -> dict:
    """One run of the anchor's Flower harness; its figures."""
    command = [python, "bench/run_secagg.py", "--name", name, "--mode", mode, "--num-clients", str(learners)]
    command += ["--results", str(scratch), "--runs", str(scratch), "--wait-quiet", "0"]
    subprocess.run(command, cwd=harness, capture_output=True, text=True, timeout=RUN_LIMIT_S + 300)
    path = scratch / f"{name}.json"
    if not path.exists():
        return {"round_s": None, "mb": None, "completed": False}
    result = json.loads(path.read_text())
    later = [r for r in result.get("rounds", []) if r.get("round", 0) >= 2 and "payload_bytes_in" in r]
    return {
        "round_s": result.get("median_round_s_2_3"),
        "mb": statistics.median(r["payload_bytes_in"] + r["payload_bytes_out"] for r in later) / 1e6 if later else None,
        "completed": bool(result.get("completed")),
    }


def masking_seconds(learners: int, repeats: int = 20) -> float:
    """One learner's encode and mask of a ResNet-20 update against the neighbours it has in a round of `learners` (median seconds)."""
    model = build_model("resnet20")
    state = model.state_dict()
    parameters = [name for name, _ in model.named_parameters()]
    update = {name: torch.randn(tensor.shape) * 1e-3 if tensor.dtype.is_floating_point else tensor for name, tensor in state.items()}
    k, t = secagg.round_parameters(learners)
    members = list(range(k + 1))  # a learner and its k neighbours: what it masks against is all that counts here
    leader = secagg.LeaderRound(1, secagg.neighbour_graph(members, k, seed=0), t)
    rounds = {member: secagg.LearnerRound(1, member, learners, t, 10.0) for member in members}
    for member, learner in rounds.items():
        leader.add_keys(member, *learner.public_keys())
    for member, learner in rounds.items():
        leader.add_shares(member, learner.share_keys(leader.neighbour_keys(member)))
    rounds[0].collect(*leader.collection_for(0))
    masks = secagg.MaskGenerator(secagg.vector_length(state))  # a pool keeps one for its sender
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        rounds[0].mask(secagg.encode_update(update, state, parameters, 10.0, 0.5), masks)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def span(values: list[float | None], digits: int) -> str:
    """'median [min-max]' of the values that exist."""
    present = [value for value in values if value is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.median(present):.{digits}f} [{min(present):.{digits}f}-{max(present):.{digits}f}]"


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def ratio(mine: float | None, theirs: float | None) -> str:
    return f"{mine / theirs:.2f}x" if mine is not None and theirs else "-"


def main(argv: list[str] | None = None) -> int:
    """Run every setting --runs times, interleaved, and print (and with --out, save) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learners", type=int, nargs="+", default=[4, 20, 100], help="the N values")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of the whole sweep")
    parser.add_argument("--flower-python", default=None, help="python of the venv holding flwr[simulation]==1.42.0 (none: ours only)")
    parser.add_argument("--flower-runs", type=int, default=1, help="repetitions of the Flower runs")
    parser.add_argument("--harness", type=Path, default=DEFAULT_HARNESS, help="the flower-secagg anchor's folder")
    parser.add_argument("--out", default=None, help="also write the report to this Markdown file")
    args = parser.parse_args(argv)

    settings = [(secure, dropout) for dropout in (0.0, DROPOUT) for secure in (False, True)]
    ours: dict[tuple[int, bool, float], list[dict]] = {}
    flower: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        for repetition in range(1, args.runs + 1):
            for learners in args.learners:
                for secure, dropout in settings:
                    name = f"n{learners}-{'secure' if secure else 'plain'}-drop{dropout:g}-r{repetition}"
                    figures = run_ours(learners, secure, dropout, scratch / name)
                    ours.setdefault((learners, secure, dropout), []).append(figures)
                    print(f"{name}: {json.dumps(figures)}", file=sys.stderr, flush=True)
                if args.flower_python and repetition <= args.flower_runs:
                    for mode in ("plain", "secagg"):
                        name = f"flower-n{learners}-{mode}-r{repetition}"
                        figures = run_flower(args.flower_python, args.harness, learners, mode, scratch, name)
                        flower.setdefault((learners, mode), []).append(figures)
                        print(f"{name}: {json.dumps(figures)}", file=sys.stderr, flush=True)

    lines = [
        f"# Secure aggregation: ResNet-20 updates, N learners all in every round, {ROUNDS} rounds, Ray engine (2 actors)",
        f"machine: {provenance.machine()}; commit {provenance.commit()}; median [min-max] of {args.runs} runs per row "
        f"(rounds 2-{ROUNDS} of each), settings interleaved, every run alone on the machine",
        "",
        "| N | dropout | mode | s per round | MB per round | learners reported | stages 1-3 s | stage 4 + unmasking s | completed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for learners in args.learners:
        for secure, dropout in settings:
            runs = ours[(learners, secure, dropout)]
            lines.append(
                f"| {learners} | {dropout:.0%} | {'secure' if secure else 'plain'} | {span([r['round_s'] for r in runs], 3)} | "
                f"{span([r['mb'] for r in runs], 2)} | {span([r['reported'] for r in runs], 1)} | "
                f"{span([r['setup_s'] for r in runs], 3) if secure else '-'} | {span([r['unmask_s'] for r in runs], 3) if secure else '-'} | "
                f"{sum(r['completed'] for r in runs)}/{len(runs)} |"
            )
    lines += [
        "",
        "Secure against plain, medians of the runs:",
        "",
        "| N | dropout | round time | bytes | stage 4 + unmasking, share of the secure round | masking per learner (alone) |",
        "|---|---|---|---|---|---|",
    ]
    for learners in args.learners:
        mask_s = masking_seconds(learners)
        for dropout in (0.0, DROPOUT):
            plain, secure = ours[(learners, False, dropout)], ours[(learners, True, dropout)]
            secure_round = median([r["round_s"] for r in secure])
            unmask = median([r["unmask_s"] for r in secure])
            share = f"{unmask / secure_round:.0%}" if unmask is not None and secure_round else "-"
            lines.append(
                f"| {learners} | {dropout:.0%} | {ratio(secure_round, median([r['round_s'] for r in plain]))} | "
                f"{ratio(median([r['mb'] for r in secure]), median([r['mb'] for r in plain]))} | {share} | {1e3 * mask_s:.1f} ms |"
            )
    if flower:
        lines += [
            "",
            f"Flower 1.42 in the same sitting (the anchor's harness, no dropouts, {args.flower_runs} run per row):",
            "",
            "| N | Flower plain s per round | Flower SecAgg+ s per round | Flower SecAgg+ / plain, time | bytes | ours secure s per round | ours secure / Flower SecAgg+ |",
            "|---|---|---|---|---|---|---|",
        ]
        for learners in args.learners:
            plain_runs, secure_runs = flower.get((learners, "plain"), []), flower.get((learners, "secagg"), [])
            theirs_plain, theirs_secure = median([r["round_s"] for r in plain_runs]), median([r["round_s"] for r in secure_runs])
            mine = median([r["round_s"] for r in ours[(learners, True, 0.0)]])
            lines.append(
                f"| {learners} | {span([r['round_s'] for r in plain_runs], 3)} | {span([r['round_s'] for r in secure_runs], 3)} | "
                f"{ratio(theirs_secure, theirs_plain)} | {ratio(median([r['mb'] for r in secure_runs]), median([r['mb'] for r in plain_runs]))} | "
                f"{mine:.3f} | {ratio(mine, theirs_secure)} |"
            )
    print("\n".join(lines))
    report.save(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
