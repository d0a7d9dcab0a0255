"""Parse the log of LiteRT's ``benchmark_model`` into one result per delegate.

The format is the stock tool's (tensorflow/lite/tools/benchmark), lines optionally prefixed
by ``INFO: `` / ``ERROR: ``:

- ``count=50 first=… curr=… min=… max=… avg=… std=…`` (older builds: ``Timings (microseconds): count=…``)
- ``Inference timings in us: Init: …, First inference: …, Warmup (avg): …, Inference (avg): …``
- ``Memory footprint delta from the start of the tool (MB): init=… overall=…``
- ``Overall peak memory footprint (MB) via periodic monitoring: …``
- ``Explicitly applied X delegate, and the model graph will be completely executed by the delegate.``
  or ``… partially executed by the delegate w/ N delegate kernels.``
- ``Though X delegate is explicitly applied, the model graph will not be executed by the delegate.``
- ``Failed to apply X delegate.``, ``X acceleration is unsupported on this platform.``, ``Benchmarking failed.``

A delegate is ``ok`` when it took part of the graph, ``not-applied`` when the tool ran but
the graph stayed on the CPU (the timing is then the CPU's, and says so), and ``failed``
when no timing came out.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

#: The provider name benchmark_model prints for each of the harness's delegate choices.
DELEGATE_NAMES = {"cpu": "", "xnnpack": "XNNPACK", "gpu": "GPU", "nnapi": "NNAPI", "qnn": "EXTERNAL"}

_PREFIX = r"^(?:[A-Z]+: )?"
_NUM = r"([-+0-9.eE]+)"
_RE_COUNT = re.compile(_PREFIX + r"(?:Timings \(microseconds\): )?count=(\d+)(.*)$")
_RE_KV = re.compile(r"(\w+)=" + _NUM)
_RE_SUMMARY = re.compile(
    _PREFIX
    + r"Inference timings in us: Init: "
    + _NUM
    + r", First inference: "
    + _NUM
    + r", Warmup \(avg\): "
    + _NUM
    + r", Inference \(avg\): "
    + _NUM
)
_RE_MEMORY = re.compile(
    _PREFIX + r"Memory footprint delta from the start of the tool \(MB\): init=" + _NUM + r" overall=" + _NUM
)
_RE_PEAK = re.compile(_PREFIX + r"Overall peak memory footprint \(MB\) via periodic monitoring: " + _NUM)
_RE_APPLIED = re.compile(
    _PREFIX
    + r"Explicitly applied (\S+) delegate, and the model graph will be (completely|partially) executed"
    + r"(?: by the delegate w/ (\d+) delegate kernels)?"
)
_RE_NOT_APPLIED = re.compile(
    _PREFIX + r"Though (\S+) delegate is explicitly applied, the model graph will not be executed"
)
_RE_UNSUPPORTED = re.compile(_PREFIX + r"(\S+) acceleration is unsupported on this platform")
_RE_FAILED_APPLY = re.compile(_PREFIX + r"Failed to apply (\S+) delegate")
_RE_ERROR = re.compile(r"^(?:ERROR: |E\d{4} )(.*)$")


@dataclass
class DelegateResult:
    """One benchmark_model run with one delegate choice; times in microseconds, memory in MB."""

    delegate: str
    status: str = "failed"  # ok | not-applied | failed
    delegate_kernels: int | None = None
    fully_delegated: bool | None = None
    init_us: float | None = None
    first_us: float | None = None
    warmup_avg_us: float | None = None
    avg_us: float | None = None
    std_us: float | None = None
    min_us: float | None = None
    max_us: float | None = None
    runs: int | None = None
    memory_init_mb: float | None = None
    memory_overall_mb: float | None = None
    peak_memory_mb: float | None = None
    exit_code: int | None = None
    message: str = ""
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def parse_benchmark_output(text: str, delegate: str, exit_code: int = 0) -> DelegateResult:
    """Turn one run's combined stdout+stderr into a :class:`DelegateResult` for ``delegate``."""
    res = DelegateResult(delegate=delegate, exit_code=exit_code)
    wanted = DELEGATE_NAMES.get(delegate, delegate.upper())
    applied = not_applied = unsupported = False
    for raw in text.splitlines():
        line = raw.strip()
        if m := _RE_COUNT.match(line):
            kv = {k: float(v) for k, v in _RE_KV.findall(m.group(2))}
            res.runs = int(m.group(1))
            res.std_us, res.min_us, res.max_us = kv.get("std"), kv.get("min"), kv.get("max")
        elif m := _RE_SUMMARY.match(line):
            res.init_us, res.first_us, res.warmup_avg_us, res.avg_us = (float(g) for g in m.groups())
        elif m := _RE_MEMORY.match(line):
            res.memory_init_mb, res.memory_overall_mb = float(m.group(1)), float(m.group(2))
        elif m := _RE_PEAK.match(line):
            res.peak_memory_mb = float(m.group(1))
        elif (m := _RE_APPLIED.match(line)) and m.group(1) == wanted:
            applied = True
            res.fully_delegated = m.group(2) == "completely"
            res.delegate_kernels = int(m.group(3)) if m.group(3) else 1
        elif (m := _RE_NOT_APPLIED.match(line)) and m.group(1) == wanted:
            not_applied = True
        elif (m := _RE_UNSUPPORTED.match(line)) and m.group(1).upper() == wanted:
            unsupported = True
            res.errors.append(line.split(": ", 1)[-1] if line.startswith(("INFO", "ERROR")) else line)
        elif _RE_FAILED_APPLY.match(line) or _RE_ERROR.match(line):
            error = _RE_ERROR.match(line)
            res.errors.append((error.group(1) if error else line).strip())
    if res.avg_us is None or exit_code != 0:
        res.status = "failed"
        tail = [t.strip() for t in text.strip().splitlines()[-3:]]
        res.message = "; ".join(res.errors or tail or ["no output"])
        if exit_code != 0:
            res.message = f"exit {exit_code}: {res.message}"
    elif wanted and not applied:
        res.status = "not-applied"
        if unsupported:
            res.message = f"{wanted} is unsupported here; the timing is the CPU's"
        elif not_applied:
            res.message = f"{wanted} took no part of the graph; the timing is the CPU's"
        else:
            res.message = f"no sign that {wanted} was applied; the timing is the CPU's"
    else:
        res.status = "ok"
    return res
