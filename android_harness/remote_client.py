"""run-client: `fwdllm device run` on the phone, its coordinator port forwarded over adb, its log streamed back."""

from __future__ import annotations

import shlex
import threading
import time
from pathlib import Path

from fwdllm.android_harness.adb import Adb
from fwdllm.android_harness.deploy import DEFAULT_REMOTE_DIR, read_device_state, sync_files
from fwdllm.android_harness.probe import probe
from fwdllm.errors import UserError


def run_client(
    adb: Adb,
    port: int,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    client_args: list[str] | None = None,
    data: Path | None = None,
    log_path: Path | None = None,
    duration: float | None = None,
    echo=print,
    stop: threading.Event | None = None,
) -> int:
    """Forward the coordinator port into the device, run `fwdllm device run` there, stream its log, stop it cleanly.

    The client is stopped on Ctrl-C here, after ``duration`` seconds, or when ``stop`` is set (e.g.
    by an ``echo`` callback that saw a log line). Returns the client's exit status, 130 when stopped.
    """
    info = probe(adb)
    R = remote_dir.rstrip("/")
    state = read_device_state(adb, R)
    if not state.get("python"):
        raise UserError(
            f"the device runtime is not deployed on {info.serial}: run `fwdllm android deploy --bundle B` first"
        )
    args = ["device", "run", "--coordinator", f"127.0.0.1:{port}", "--bundle", state.get("bundle", f"{R}/bundle")]
    if data is not None:
        sync_files(adb, [(data, f"{R}/data/{data.name}")], desc="data")
        args += ["--data", f"{R}/data/{data.name}"]
    args += list(client_args or [])
    pidfile = f"{R}/client.pid"
    command = (
        f"cd {shlex.quote(R)} && echo $$ > {pidfile} && exec {shlex.quote(state['python'])} -u -m fwdllm.cli -v "
        + " ".join(shlex.quote(a) for a in args)
    )
    adb.reverse(f"tcp:{port}", f"tcp:{port}")
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    proc = adb.popen_shell(command)
    stop = stop or threading.Event()
    done, stopped = threading.Event(), threading.Event()

    def watch() -> None:
        deadline = None if duration is None else time.monotonic() + duration
        while not done.wait(0.2):
            if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                stopped.set()
                _stop_remote(adb, pidfile)
                return

    watcher = threading.Thread(target=watch, name="fwdllm-run-client-stop", daemon=True)
    watcher.start()
    try:
        if proc.stdout is None:  # popen_shell always pipes stdout
            raise RuntimeError("the device command's output is not piped")
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            echo(line)
            if log:
                log.write(line + "\n")
                log.flush()
        code = proc.wait()
    except KeyboardInterrupt:
        stopped.set()
        _stop_remote(adb, pidfile)
        code = proc.wait(timeout=30)
    finally:
        done.set()
        watcher.join(timeout=60)
        if proc.poll() is None:
            proc.kill()
        adb.reverse_remove(f"tcp:{port}")
        adb.shell(f"rm -f {pidfile}", check=False)
        if log:
            log.close()
    return 130 if stopped.is_set() and code != 0 else code


def _stop_remote(adb: Adb, pidfile: str, grace: float = 10.0) -> None:
    """SIGINT the device client (Ctrl-C: it stops between RPCs), then SIGTERM, then SIGKILL if it lingers."""
    for sig in ("INT", "TERM"):
        adb.shell(f"[ -f {pidfile} ] && kill -{sig} $(cat {pidfile}) 2>/dev/null; true", check=False)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            alive = adb.shell(
                f"[ -f {pidfile} ] && kill -0 $(cat {pidfile}) 2>/dev/null && echo alive; true", check=False
            )
            if b"alive" not in alive.stdout:
                return
            time.sleep(0.5)
    adb.shell(f"[ -f {pidfile} ] && kill -KILL $(cat {pidfile}) 2>/dev/null; true", check=False)
