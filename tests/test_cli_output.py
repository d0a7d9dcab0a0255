"""The `fwdllm` command's terminal is fwdllm's own: library chatter goes to a log file, a closed pipe is no error.

Each command runs as its own process, as a user or a script runs it; ``FWDLLM_CACHE`` points the
log folder into the test's temporary directory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from export_helpers import tiny_checkpoint

#: fwdllm's log records on stderr: "<date> <time> LEVEL fwdllm.<module>: message".
OWN_RECORD = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) fwdllm(\.[\w.]+)?: ")
THIRD_PARTY = ("Warning", "torchao", "triton", "_pytree")


def fwdllm(*args: str, cache, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FWDLLM_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "fwdllm.cli", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=900,
    )


def export_args(model, out, peft=("--peft", "head", "--trainable-layers", "head")) -> list[str]:
    return [
        "export",
        "--model",
        str(model),
        "--task",
        "seq-cls",
        "--labels",
        "3",
        *peft,
        "--format",
        "onnx",
        "--seq-len",
        "16",
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint exported to ONNX at default verbosity: (process, bundle, log folder)."""
    root = tmp_path_factory.mktemp("cli-output")
    checkpoint = tiny_checkpoint("bert", root / "checkpoint")
    proc = fwdllm(*export_args(checkpoint, root / "bundle"), cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, root / "bundle", root / "cache" / "logs", checkpoint


def test_export_shows_only_fwdllms_lines_and_logs_the_libraries(exported):
    proc, bundle, logs, _ = exported
    inspect = fwdllm("inspect", str(bundle), cache=logs.parent)
    assert proc.stdout == inspect.stdout and inspect.stdout.startswith(f"bundle {bundle}")  # stdout: the summary
    stderr = proc.stderr.splitlines()
    assert stderr and all(OWN_RECORD.match(line) for line in stderr), proc.stderr  # fwdllm's progress
    terminal = proc.stdout + proc.stderr
    assert not [word for word in THIRD_PARTY if word in terminal], terminal
    # The libraries did speak (Python logging, torch's own handler on fd 2): into the export's log file.
    (log,) = logs.glob("export-*.log")
    text = log.read_text()
    assert "torchao" in text and "_pytree" in text
    assert [line for line in text.splitlines() if OWN_RECORD.match(line)] == stderr  # and fwdllm's lines too


def test_verbose_export_shows_the_library_lines(exported, tmp_path):
    checkpoint = exported[3]
    proc = fwdllm("-v", *export_args(checkpoint, tmp_path / "bundle"), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchao" in proc.stderr and "_pytree" in proc.stderr
    assert (tmp_path / "bundle" / "manifest.json").is_file()


def test_a_failed_export_names_its_log_in_one_error_line(exported, tmp_path):
    """The LoRA targets are checked against the loaded model, so the libraries have spoken by then."""
    peft = ("--peft", "lora", "--lora-targets", "nosuch", "--trainable-layers", "top:1")
    proc = fwdllm(*export_args(exported[3], tmp_path / "bundle", peft), cache=tmp_path / "cache")
    assert proc.returncode == 2 and proc.stdout == ""
    (log,) = (tmp_path / "cache" / "logs").glob("export-*.log")
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("fwdllm export: error: ")
    assert "match no Linear layer" in proc.stderr and proc.stderr.strip().endswith(f"(library output: {log})")
    assert "torchao" in log.read_text()


def test_inspect_into_a_closed_pipe_ends_quietly(exported):
    """`fwdllm inspect --json B | head -2`: the reader is gone before the first write (no reader at all here)."""
    _, bundle, logs, _ = exported
    read, write = os.pipe()
    os.close(read)
    try:
        proc = fwdllm("inspect", "--json", str(bundle), cache=logs.parent, stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 128 + signal.SIGPIPE
    assert proc.stderr == ""


def test_inspect_json_through_head(exported):
    """The same through a real shell pipe: head's two lines, nothing on stderr whoever finishes first."""
    _, bundle, logs, _ = exported
    env = {**os.environ, "FWDLLM_CACHE": str(logs.parent)}
    shell = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m fwdllm.cli inspect --json "{bundle}" | head -2'],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert shell.stdout.splitlines() == ["{", '  "schema_version": 1,'] and shell.stderr == ""


def test_serve_says_serving_at_info_by_default(tmp_path):
    """`coordinator serve` is a server: its "serving" line is progress (INFO) and shown without -v."""
    from test_coordinator_fixtures import make_bundle

    bundle = make_bundle(tmp_path / "b")
    env = {**os.environ, "FWDLLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fwdllm.cli",
            "coordinator",
            "serve",
            "--bundle",
            str(bundle),
            "--state",
            str(tmp_path / "s"),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert "listening on" in proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    serving = [line for line in err.splitlines() if ": serving " in line]
    assert len(serving) == 1 and " INFO fwdllm.coordinator: serving " in serving[0], err
    assert " WARNING " not in err, err
