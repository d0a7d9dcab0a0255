"""Regenerate BENCHMARKS.md: run every benchmark script, then stitch their Markdown results together.

    python bench/run_all.py            # the full report (make bench, < 60 min on 2 cores)
    python bench/run_all.py --quick    # a smoke run that CI executes (make bench-quick, < 10 min)

Each section is one script in bench/ that writes bench/results/<name>.json and .md through
bench.report.write_results; a script that fails is reported in its section, never hidden.

Sections whose numbers are times or throughputs run first, one at a time on an otherwise idle
machine. The rest report accuracy, steps, bytes or peak memory, which another process on the
other core does not change; they run side by side, --jobs at a time (each is single-threaded),
longest dependency chain first. Measured on 2 cores from cold caches (2026-11-28): 49 minutes, 7 of them timed,
before the recipe section gained make demo's configuration and the variance-control and sampler contrasts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.report import RESULTS_DIR, machine  # noqa: E402

LOGS_DIR = RESULTS_DIR / "logs"  # each section's stderr


@dataclass(frozen=True)
class Section:
    title: str
    script: str
    results: list[str]  # result names it writes
    quick_args: list[str] = field(default_factory=list)
    full_args: list[str] = field(default_factory=list)
    timed: bool = False  # its numbers are times: run it alone
    after: tuple[str, ...] = ()  # scripts whose results it reads
    minutes: float = 1  # its full run's duration on 2 cores, roughly: the longest chains start first


SECTIONS = [
    Section(
        "Seeded perturbation generator",
        "perturbation.py",
        ["perturbation"],
        ["--values", "1000000", "--repeats", "3"],
        timed=True,
    ),
    Section("Communication per device per step", "communication.py", ["communication"]),
    Section("Export time and bundle size", "export.py", ["export"], ["--quick"], timed=True),
    Section(
        "Coordinator under idle streams: steps per 10 s with and without",
        "idle_streams.py",
        ["idle_streams"],
        ["--streams", "20", "--window", "2"],
        timed=True,
    ),
    Section(
        "Coordinator aggregation and load",
        "aggregation.py",
        ["aggregation"],
        ["--seeds", "64", "--clients", "100", "--repeats", "2"],
        timed=True,
    ),
    Section("Device memory: fwdllm vs backprop", "memory.py", ["memory"], ["--quick"], minutes=21),
    Section(
        "Backprop baselines: FedAvg of PEFT parameters in PyTorch",
        "baselines.py",
        ["baselines"],
        ["--quick"],
        minutes=28,
    ),
    Section(
        "Training recipe: BBC News, final accuracy over 3 seeds",
        "recipe.py",
        ["recipe"],
        ["--quick"],
        ["--lean"],
        minutes=27,
    ),
    Section(
        "Time to accuracy: AG News, fwdllm vs backprop",
        "time_to_accuracy.py",
        ["time_to_accuracy"],
        ["--quick"],
        after=("baselines.py", "memory.py"),
        minutes=14,
    ),
    Section(
        "AG News: final accuracy over 3 seeds, fwdllm's head recipe run longer vs backprop head",
        "agnews.py",
        ["agnews"],
        ["--quick"],
        minutes=45,
    ),
    Section("Scaling with clients per step", "scaling.py", ["scaling"], ["--quick"], minutes=5.5),
    Section(
        "llama.cpp: θ channels (LoRA file, control vector) vs plain evaluation",
        "llama_channels.py",
        ["llama_channels"],
        ["--quick"],
        timed=True,
    ),
    Section(
        "llama.cpp: a top-K suffix GGUF from cached hidden states vs the whole model",
        "llama_prefix.py",
        ["llama_prefix"],
        ["--quick"],
        timed=True,
    ),
    Section(
        "Decoders: what one perturbed evaluation costs, top-K suffix vs full graph",
        "decoder_cost.py",
        ["decoder_cost"],
        ["--quick"],
        timed=True,
    ),
    Section(
        "Decoders: SmolLM2-135M + LoRA classifying BBC News by label words",
        "decoder.py",
        ["decoder"],
        ["--quick"],
        minutes=170,  # 15 variants, 2 more seeds of 4 of them, 4 demo runs (4-8 min each), backprop at 60, 100 rounds
    ),
    Section(
        "LLaMA-7B on paper: memory and seconds per perturbed evaluation, extrapolated from SmolLM2",
        "llama7b.py",
        ["llama7b"],
        ["--quick"],
        timed=True,
    ),
    Section(
        "Device runtime: perturbed vs plain inference, P batching, memory, prefix reuse (MiniLM, 8×64)",
        "device.py",
        ["device"],
        ["--quick"],
        timed=True,
    ),
    Section(
        "fwdllm on Flower: time per step and memory vs fwdllm simulate, bytes vs FedAvg",
        "flower.py",
        ["flower"],
        ["--quick"],
        timed=True,
        minutes=30,
    ),
]


def _stamped(name: str) -> str:
    """A result's Markdown, preceded by when it was measured (results can come from separate runs)."""
    doc = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    return f"*Measured {doc['machine']['date']}.*\n\n" + (RESULTS_DIR / f"{name}.md").read_text()


def run_sections(sections: list[Section], quick: bool, jobs: int) -> dict[str, tuple[int, str, float]]:
    """Run the timed sections one by one, then the others up to ``jobs`` at a time:
    script -> (exit, stderr, seconds)."""
    done: dict[str, tuple[int, str, float]] = {}

    def start(sec: Section) -> tuple[subprocess.Popen, float]:
        # stderr (progress bars included) goes to a file: a pipe nobody reads would fill and stall the script
        log = LOGS_DIR / f"{Path(sec.script).stem}.log"
        cmd = [sys.executable, str(ROOT / "bench" / sec.script), *(sec.quick_args if quick else sec.full_args)]
        with open(log, "w") as err:
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT), time.perf_counter()

    def finish(sec: Section, proc: subprocess.Popen, began: float) -> None:
        proc.wait()
        stderr = (LOGS_DIR / f"{Path(sec.script).stem}.log").read_text(errors="replace")
        done[sec.script] = (proc.returncode, stderr, time.perf_counter() - began)
        ok = proc.returncode == 0
        print(
            f"{'ok' if ok else 'FAILED'} {sec.script} ({done[sec.script][2]:.0f} s)"
            + ("" if ok else f"\n{stderr[-3000:]}"),
            file=sys.stdout if ok else sys.stderr,
            flush=True,
        )

    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    for sec in (s for s in sections if s.timed):
        finish(sec, *start(sec))

    def chain(sec: Section) -> float:  # its minutes and the longest chain of sections waiting for it
        return sec.minutes + max((chain(s) for s in sections if sec.script in s.after), default=0)

    waiting = sorted((s for s in sections if not s.timed), key=lambda s: -chain(s))
    running: list[tuple[Section, subprocess.Popen, float]] = []
    while waiting or running:
        ready = [s for s in waiting if all(a in done for a in s.after if any(x.script == a for x in sections))]
        while ready and len(running) < jobs:
            sec = ready.pop(0)
            waiting.remove(sec)
            running.append((sec, *start(sec)))
        time.sleep(1)
        for entry in [r for r in running if r[1].poll() is not None]:
            running.remove(entry)
            finish(*entry)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats: checks the scripts still run")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="run nothing: assemble the report from bench/results as the scripts last wrote them",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="untimed sections run this many at a time (default: the number of cores)",
    )
    parser.add_argument(
        "--sections",
        nargs="*",
        metavar="SCRIPT",
        help="run only these scripts (e.g. recipe.py); the report takes the others' last results",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections or []) - {s.script for s in SECTIONS})
    if unknown:
        parser.error(f"unknown section script(s) {unknown}; known: {[s.script for s in SECTIONS]}")

    info = machine()
    started = time.perf_counter()
    selected = [] if args.from_results else [s for s in SECTIONS if args.sections is None or s.script in args.sections]
    outcomes = run_sections(selected, args.quick, max(1, args.jobs))
    flags = "".join(
        f
        for f, on in (
            (" --quick", args.quick),
            (" --from-results", args.from_results),
            (" --sections " + " ".join(args.sections or []), args.sections),
        )
        if on
    )
    parts = [
        "# fwdllm benchmarks\n",
        f"Generated by `python bench/run_all.py{flags}` on {info['date']}"
        f"{'' if args.from_results else f' in {(time.perf_counter() - started) / 60:.0f} min'}: "
        f"{info['cpu']}, {info['cores']} cores, {info['platform']}, Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + ". "
        "Timed sections ran alone; the others (accuracy, bytes, peak memory) ran side by side, one per core. Medians "
        "over repeated runs; compare ratios measured in the same run, not absolute times.\n",
    ]
    failed = 0
    for sec in SECTIONS:
        parts.append(f"\n## {sec.title}\n")
        code, stderr, _ = outcomes.get(sec.script, (0, "", 0.0))
        if code != 0:
            failed += 1
            parts.append(f"**`bench/{sec.script}` failed** (exit {code}):\n\n```\n{stderr[-3000:]}\n```\n")
        elif any(not (RESULTS_DIR / f"{n}.md").is_file() for n in sec.results):
            parts.append(f"Not measured yet: run `python bench/{sec.script}`.\n")
        else:
            parts.append("\n".join(_stamped(n) for n in sec.results))
    args.out.write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
