"""Many virtual learners on one machine: this project's Ray engine against Flower 1.42's simulation engine, side by side.

The workload is the one ../shared/anchors/flower-sim/README.md fixes: N virtual learners (N = 100, 1,000,
10,000); 10 sampled per round; 3 rounds; the 16,618-parameter small-cnn; 50 synthetic images per learner made
from its index; 5 local SGD steps of batch 10 at lr 0.05 without momentum or weight decay; FedAvg; no
evaluation. Each repetition runs, for each N, Flower with its default client resources (2 CPUs: one actor),
Flower with 1 CPU per client (two actors), and this project's Ray engine (1 CPU per actor: two actors), one
after another and never at once. The Flower runs use the anchor's own harness (bench/run_sim.py) in the
virtual environment that holds flwr[simulation]==1.42.0.

Per run: seconds per round (median of rounds 2 and 3; round 1 includes the first training of each actor),
seconds from launch to exit, and peak memory: the sum of the resident memory of every process of the run,
sampled every 0.5 s, as the anchor measures Flower's (shared library pages count once per process).

    python -m bench.simulation --flower-python /path/to/venv-flwr/bin/python --runs 3 --out docs/simulation.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import provenance, report

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HARNESS = ROOT.parent / "shared" / "anchors" / "flower-sim"
SAMPLED = 10
ROUNDS = 3
SAMPLE_EVERY_S = 0.5
RUN_LIMIT_S = 900
MARKER = "FL_SIMULATION_BENCH_RUN"  # set in the launcher's environment; every process of the run inherits it
WORKLOAD = [
    "--dataset",
    "synthetic",
    "--data-mode",
    "local",
    "--examples-per-learner",
    "50",
    "--model",
    "small-cnn",
    "--aggregation",
    "fedavg",
    "--batch-size",
    "10",
    "--local-steps",
    "5",
    "--lr",
    "0.05",
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


def fraction_for(learners: int) -> str:
    """The --fraction that samples exactly SAMPLED of `learners` (ceil(fraction * learners) == SAMPLED)."""
    fraction = SAMPLED / learners
    while math.ceil(fraction * learners) > SAMPLED:
        fraction = math.nextafter(fraction, 0)
    return repr(fraction)


class MemorySampler:
    """Samples, every SAMPLE_EVERY_S, the summed resident memory of a process tree and of every process carrying a marker."""

    def __init__(self, root_pid: int, marker: str) -> None:
        self.root_pid = root_pid
        self.marker = f"{MARKER}={marker}".encode()
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.peak_bytes = max(self.peak_bytes, self.total())

    def total(self) -> int:
        """Bytes resident now in the run's processes."""
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        marked: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                status = (entry / "status").read_text()
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            parents[pid] = int(fields.get("PPid", "0"))
            rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
            if self.marker in environ:
                marked.add(pid)
        tree = {self.root_pid}
        changed = True
        while changed:
            grown = {pid for pid, parent in parents.items() if parent in tree} - tree
            tree |= grown
            changed = bool(grown)
        return sum(rss.get(pid, 0) for pid in tree | marked)

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


def run_ours(learners: int, learner_cpus: float, run_dir: Path) -> dict:
    """One run of local_federation.py --engine ray on the workload, each actor reserving `learner_cpus`; its figures."""
    marker = secrets.token_hex(8)
    command = [
        sys.executable,
        "local_federation.py",
        "--engine",
        "ray",
        "--learners",
        str(learners),
        "--fraction",
        fraction_for(learners),
        "--learner-cpus",
        str(learner_cpus),
        *WORKLOAD,
        "--run-dir",
        str(run_dir),
    ]
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, MARKER: marker}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    sampler = MemorySampler(process.pid, marker)
    try:
        _, errors = process.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, errors = process.communicate()
    total = time.monotonic() - started
    peak = sampler.stop()
    metrics_path = run_dir / "metrics.jsonl"
    rounds = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    completed = process.returncode == 0 and len(rounds) == ROUNDS and all(r["learners_reported"] == SAMPLED for r in rounds)
    if not completed:
        print(f"ours, N={learners}: did not complete (exit {process.returncode}): {errors[-1500:]}", file=sys.stderr)
    return {
        "round1_s": rounds[0]["round_seconds"] if rounds else None,
        "round_s": statistics.median(r["round_seconds"] for r in rounds[1:]) if len(rounds) > 1 else None,
        "total_s": total,
        "peak_gib": peak / 2**30,
        "completed": completed,
    }


def run_flower(python: str, harness: Path, learners: int, client_cpus: int | None, scratch: Path, name: str) -> dict:
    """One run of the anchor's Flower harness; its figures."""
    command = [
        python,
        "bench/run_sim.py",
        "--name",
        name,
        "--num-clients",
        str(learners),
        "--results",
        str(scratch),
        "--runs",
        str(scratch),
    ]
    if client_cpus is not None:
        command += ["--client-cpus", str(client_cpus)]
    subprocess.run(command, cwd=harness, capture_output=True, text=True, timeout=RUN_LIMIT_S + 60)
    path = scratch / f"{name}.json"
    if not path.exists():
        return {"round1_s": None, "round_s": None, "total_s": None, "peak_gib": None, "completed": False}
    result = json.loads(path.read_text())
    return {
        "round1_s": result.get("round1_s"),
        "round_s": result.get("median_round_s_2_3"),
        "total_s": result.get("total_s"),
        "peak_gib": result.get("peak_total_rss_gib"),
        "completed": bool(result.get("completed")),
    }


def median(values: list[float | None]) -> float | None:
    """The median of the values that exist."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def span(values: list[float | None], digits: int) -> str:
    """'median [min-max]' of the values that exist."""
    present = [value for value in values if value is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.median(present):.{digits}f} [{min(present):.{digits}f}-{max(present):.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    """Run every setting for every N, --runs times, and print (and with --out, save) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learners", type=int, nargs="+", default=[100, 1000, 10000], help="the N values")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of the whole sweep")
    parser.add_argument("--once", type=int, nargs="*", default=[], help="N values run once each after the sweep (100000)")
    parser.add_argument("--flower-python", default=None, help="python of the venv holding flwr[simulation]==1.42.0 (none: ours only)")
    parser.add_argument("--harness", type=Path, default=DEFAULT_HARNESS, help="the flower-sim anchor's folder")
    parser.add_argument("--out", default=None, help="also write the report to this Markdown file")
    args = parser.parse_args(argv)

    # (label, engine, CPUs per client or actor): each engine's default and its other setting
    settings = [("ours, 1 CPU per actor (default: 2 actors)", "ours", 1.0), ("ours, 2 CPUs per actor (1 actor)", "ours", 2.0)]
    if args.flower_python:
        settings = [
            ("Flower, default 2 CPUs per client (1 actor)", "flower", 2),
            ("Flower, 1 CPU per client (2 actors)", "flower", 1),
            *settings,
        ]
    results: dict[tuple[int, str], list[dict]] = {}
    sweep = [(repetition, learners) for repetition in range(1, args.runs + 1) for learners in args.learners]
    sweep += [(1, learners) for learners in args.once]
    with tempfile.TemporaryDirectory(prefix="simulation-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        for repetition, learners in sweep:
            for label, engine, cpus in settings:
                if learners in args.once and cpus != settings[0 if engine == "flower" else -2][2]:
                    continue  # a once-only N runs each engine's default alone
                name = f"n{learners}-{engine}-{cpus:g}cpu-r{repetition}"
                if engine == "ours":
                    figures = run_ours(learners, cpus, scratch / name)
                else:
                    figures = run_flower(args.flower_python, args.harness, learners, None if cpus == 2 else cpus, scratch, name)
                results.setdefault((learners, label), []).append(figures)
                print(f"{name}: {json.dumps(figures)}", file=sys.stderr, flush=True)

    lines = [
        f"# Simulation: {SAMPLED} of N virtual learners per round, {ROUNDS} rounds, small-cnn, 50 synthetic images each",
        f"machine: {provenance.machine()}; commit {provenance.commit()}; median [min-max] of {args.runs} runs per row, "
        "every run alone on the machine, settings interleaved",
        "",
        "| N | engine | round 1 s | s per round (rounds 2-3) | launch to exit s | peak memory GiB | completed |",
        "|---|---|---|---|---|---|---|",
    ]
    for learners in [*args.learners, *args.once]:
        for label, _, _ in settings:
            if (learners, label) not in results:
                continue
            runs = results[(learners, label)]
            lines.append(
                f"| {learners:,} | {label} | {span([r['round1_s'] for r in runs], 2)} | {span([r['round_s'] for r in runs], 3)} | "
                f"{span([r['total_s'] for r in runs], 1)} | {span([r['peak_gib'] for r in runs], 2)} | "
                f"{sum(r['completed'] for r in runs)}/{len(runs)} |"
            )
    if args.flower_python:
        lines += [
            "",
            "Ours against Flower, each engine at its best setting for that figure (median of the runs):",
            "",
            "| N | s per round | launch to exit | peak memory |",
            "|---|---|---|---|",
        ]
        for learners in [*args.learners, *args.once]:

            def ratio(key: str, learners: int = learners) -> str:
                def best(engine: str) -> float | None:
                    medians = [
                        median([r[key] for r in results.get((learners, label), [])]) for label, kind, _ in settings if kind == engine
                    ]
                    return min((value for value in medians if value is not None), default=None)

                mine, theirs = best("ours"), best("flower")
                return f"{mine / theirs:.2f}x" if mine is not None and theirs else "-"

            lines.append(f"| {learners:,} | {ratio('round_s')} | {ratio('total_s')} | {ratio('peak_gib')} |")
    print("\n".join(lines))
    report.save(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
