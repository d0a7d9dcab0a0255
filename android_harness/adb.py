"""A thin client for the `adb` executable: the only way the harness talks to a device.

Everything goes through the `adb` program the user names (``--adb`` or ``$ADB``, else
``adb`` on PATH), with the same subset of commands on a real phone, a dev board running
adbd, or the emulated aarch64 root filesystem behind ``android_harness/bin/adb-shim``.
Every failure becomes an :class:`AdbError` that says what to do.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

from fwdllm.errors import UserError


class AdbError(UserError):
    """adb is missing, no usable device is attached, or a device command failed."""


@dataclass(frozen=True)
class DeviceEntry:
    """One line of ``adb devices -l``."""

    serial: str
    state: str  # device | offline | unauthorized | ...
    info: dict[str, str] = field(default_factory=dict)  # product:, model:, device:, transport_id:


def find_adb(explicit: str | None = None) -> str:
    """The adb executable to run: --adb, then $ADB, then `adb` on PATH."""
    candidate = explicit or os.environ.get("ADB") or "adb"
    path = shutil.which(candidate)
    if path is None:
        raise AdbError(
            f"cannot run adb ({candidate!r} is not an executable): install Android platform-tools "
            "(`apt-get install adb`), or pass --adb PATH / set $ADB"
        )
    return path


def parse_devices(text: str) -> list[DeviceEntry]:
    """Parse ``adb devices -l`` output (header line, daemon notices and blank lines are skipped)."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*", "adb server")):
            continue
        parts = line.split()
        if len(parts) < 2:
            continue
        info = dict(p.split(":", 1) for p in parts[2:] if ":" in p)
        entries.append(DeviceEntry(parts[0], parts[1], info))
    return entries


class Adb:
    """One device behind one adb executable; ``serial`` is resolved by :meth:`select`."""

    def __init__(self, adb: str | None = None, serial: str | None = None, timeout: float = 600.0):
        self.exe = find_adb(adb)
        self.serial = serial
        self.timeout = timeout

    # ----- plumbing -----
    def _argv(self, *args: str, device: bool = True) -> list[str]:
        prefix = [self.exe] + (["-s", self.serial] if device and self.serial else [])
        return prefix + list(args)

    def run(
        self,
        *args: str,
        check: bool = True,
        device: bool = True,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> subprocess.CompletedProcess:
        argv = self._argv(*args, device=device)
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise AdbError(
                f"`{shlex.join(argv)}` did not finish in {exc.timeout:.0f} s; is the device connected?"
            ) from exc
        if check and proc.returncode != 0:
            err = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise AdbError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): {err or 'no message'}")
        return proc

    # ----- devices -----
    def devices(self) -> list[DeviceEntry]:
        return parse_devices(self.run("devices", "-l", device=False).stdout.decode(errors="replace"))

    def select(self) -> DeviceEntry:
        """Pick the device to use: the one named by --serial, or the only one attached."""
        entries = self.devices()
        ready = [e for e in entries if e.state == "device"]
        if self.serial:
            match = [e for e in entries if e.serial == self.serial]
            if not match:
                have = ", ".join(e.serial for e in entries) or "none"
                raise AdbError(f"no device with serial {self.serial!r} is attached (attached: {have})")
            if match[0].state != "device":
                raise AdbError(
                    f"device {self.serial} is {match[0].state}: {_STATE_FIX.get(match[0].state, 'reconnect it')}"
                )
            return match[0]
        if not ready:
            others = ", ".join(f"{e.serial} ({e.state})" for e in entries)
            hint = f"; attached but not usable: {others}" if others else ""
            raise AdbError(
                "no device attached: connect the phone by USB with USB debugging on (Settings > Developer options), "
                f"or `adb connect HOST:PORT` for a board or wireless debugging{hint}"
            )
        if len(ready) > 1:
            raise AdbError(
                f"{len(ready)} devices are attached "
                f"({', '.join(e.serial for e in ready)}); choose one with --serial SERIAL"
            )
        self.serial = ready[0].serial
        return ready[0]

    # ----- device commands -----
    def shell(self, command: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run one shell command line on the device; its exit status is adb's (adb >= 24 passes it through)."""
        return self.run("shell", command, check=check, timeout=timeout)

    def shell_text(self, command: str, check: bool = True) -> str:
        return self.shell(command, check=check).stdout.decode(errors="replace").strip()

    def getprops(self) -> dict[str, str]:
        """All system properties (``getprop`` lists ``[key]: [value]`` lines); empty off Android."""
        text = self.run("shell", "getprop", check=False).stdout.decode(errors="replace")
        return dict(_PROP_LINE.findall(text))

    def push(self, local: str, remote: str) -> None:
        self.run("push", local, remote)

    def reverse(self, remote: str, local: str) -> None:
        self.run("reverse", remote, local)

    def reverse_remove(self, remote: str) -> None:
        self.run("reverse", "--remove", remote, check=False)

    def popen_shell(self, command: str) -> subprocess.Popen:
        """Start a long device command whose output streams back line by line (stderr folded into stdout)."""
        return subprocess.Popen(self._argv("shell", command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


_PROP_LINE = re.compile(r"^\[([^\]]+)\]: \[(.*)\]$", re.M)
_STATE_FIX = {
    "unauthorized": "accept the 'Allow USB debugging' prompt on the phone",
    "offline": "unplug and replug it, or run `adb kill-server`",
    "no": "check the USB cable and udev rules (`adb devices` shows 'no permissions')",
}
