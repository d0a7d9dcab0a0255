"""adb-shim: the subset of `adb` the harness uses, served by a root filesystem instead of a phone.

Run as ``android_harness/bin/adb-shim`` (standard library only, so any python3 runs it).
Its devices come from the JSON file named by ``$FWDLLM_ADB_SHIM_CONFIG``::

    {"state_dir": "/tmp/shim-state",
     "devices": [{"serial": "emu-arm64", "mode": "chroot", "root": "/root/.cache/fwdllm/arm64-rootfs",
                  "state": "device", "props": {"ro.product.cpu.abi": "arm64-v8a", ...},
                  "faults": {"drop_push_after_bytes": 1000}}]}

``mode`` ``chroot`` runs every shell command with ``chroot ROOT /bin/sh -c`` (the emulated
aarch64 Debian of ``rootfs.sh``; device paths are paths inside ROOT). ``mode`` ``dir`` runs
them with the host's ``/bin/sh`` in ROOT as working directory (device paths are host paths):
the fast stand-in the normal test suite uses. ``getprop`` answers from ``props``, as
Android's property service would. Both modes share the host's network, so ``reverse
tcp:P tcp:P`` is a recorded identity mapping. ``faults.drop_push_after_bytes`` makes the
next push stop after that many bytes and fail like a pulled cable (then the fault clears):
this is how the tests drop a connection mid-deploy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

CONFIG_ENV = "FWDLLM_ADB_SHIM_CONFIG"
DEVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ShimError(Exception):
    """Printed as ``adb: error: ...`` with exit status 1, as adb does."""


def load_config() -> dict:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ShimError(f"set ${CONFIG_ENV} to the shim's JSON device table")
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShimError(f"cannot read the shim config {path}: {exc}") from exc


def save_config(config: dict) -> None:
    Path(os.environ[CONFIG_ENV]).write_text(json.dumps(config, indent=2))


def pick_device(config: dict, serial: str | None) -> dict:
    devices = config.get("devices", [])
    if serial:
        for dev in devices:
            if dev["serial"] == serial:
                if dev.get("state", "device") != "device":
                    raise ShimError(f"device {dev.get('state')}")
                return dev
        raise ShimError(f"device '{serial}' not found")
    ready = [d for d in devices if d.get("state", "device") == "device"]
    if not ready:
        raise ShimError("no devices/emulators found")
    if len(ready) > 1:
        raise ShimError("more than one device/emulator")
    return ready[0]


# ----------------------------------------------------------------- commands


def cmd_devices(config: dict, args: list[str]) -> int:
    long = "-l" in args
    print("List of devices attached")
    for i, dev in enumerate(config.get("devices", []), 1):
        line = f"{dev['serial']}\t{dev.get('state', 'device')}"
        if long:
            props = dev.get("props", {})
            props = {k: str(v).replace(" ", "_") for k, v in props.items()}
            line += (
                f" product:{props.get('ro.product.name', 'unknown')} model:{props.get('ro.product.model', 'unknown')}"
                f" device:{props.get('ro.product.device', 'unknown')} transport_id:{i}"
            )
        print(line)
    print()
    return 0


def cmd_shell(dev: dict, args: list[str]) -> int:
    command = " ".join(args)
    words = command.split()
    if words and words[0] == "getprop":
        props = dev.get("props", {})
        if len(words) == 1:
            for key in sorted(props):
                print(f"[{key}]: [{props[key]}]")
        else:
            print(props.get(words[1], ""))
        return 0
    sys.stdout.flush()
    root = dev["root"]
    if dev.get("mode", "dir") == "chroot":
        env = {"PATH": DEVICE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
        argv = ["chroot", root, "/bin/sh", "-c", command]
    else:
        env = {"PATH": os.environ.get("PATH", DEVICE_PATH), "HOME": root, "LANG": "C.UTF-8", "TMPDIR": root}
        argv = ["/bin/sh", "-c", command]
        os.chdir(root)
    os.execvpe(argv[0], argv, env)
    return 127  # unreachable: exec replaced this process


def device_path(dev: dict, remote: str) -> Path:
    """Where a device path lives on the host."""
    if dev.get("mode", "dir") == "chroot":
        return Path(dev["root"]) / remote.lstrip("/")
    return Path(remote)


def _copy(src: Path, dst: Path, limit: int | None) -> int:
    """Copy src to dst (a file); with limit, stop after that many bytes and report a dropped link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if limit is None:
        shutil.copyfile(src, dst)
        return src.stat().st_size
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(fi.read(limit))
    raise ShimError(f"failed to copy '{src}' to '{dst}': connection reset by peer (after {limit} bytes)")


def _transfer(src: Path, dst: Path, dst_is_dir: bool, limit: int | None) -> int:
    if not src.exists():
        raise ShimError(f"cannot stat '{src}': No such file or directory")
    if dst_is_dir:
        dst = dst / src.name
    if src.is_dir():
        total = 0
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            total += _copy(f, dst / f.relative_to(src), limit)
        return total
    return _copy(src, dst, limit)


def cmd_push(config: dict, dev: dict, args: list[str]) -> int:
    if len(args) != 2:
        raise ShimError("push requires LOCAL and REMOTE")
    local, remote = Path(args[0]), args[1]
    dst = device_path(dev, remote)
    faults = dev.get("faults", {})
    limit = faults.pop("drop_push_after_bytes", None)
    if limit is not None:
        save_config(config)  # the fault fires once, like one pulled cable
    size = _transfer(local, dst, remote.endswith("/") or dst.is_dir(), limit)
    print(f"{local}: 1 file pushed. {size} bytes")
    return 0


def cmd_pull(dev: dict, args: list[str]) -> int:
    if len(args) != 2:
        raise ShimError("pull requires REMOTE and LOCAL")
    src, local = device_path(dev, args[0]), Path(args[1])
    size = _transfer(src, local, local.is_dir(), None)
    print(f"{args[0]}: 1 file pulled. {size} bytes")
    return 0


def cmd_reverse(config: dict, dev: dict, args: list[str]) -> int:
    state = Path(config.get("state_dir", "/tmp/fwdllm-adb-shim")) / f"{dev['serial']}.reverse.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(state.read_text()) if state.is_file() else {}
    if args[:1] == ["--list"]:
        for remote, local in table.items():
            print(f"{dev['serial']} {remote} {local}")
        return 0
    if args[:1] == ["--remove-all"]:
        table = {}
    elif args[:1] == ["--remove"] and len(args) == 2:
        if table.pop(args[1], None) is None:
            raise ShimError(f"listener '{args[1]}' not found")
    elif len(args) == 2 and not args[0].startswith("-"):
        if args[0] != args[1]:
            raise ShimError("the shim's device shares the host network: reverse needs the same port on both ends")
        table[args[0]] = args[1]
        print(args[0].split(":", 1)[-1])
    else:
        raise ShimError("usage: reverse [--list | --remove REMOTE | --remove-all | REMOTE LOCAL]")
    state.write_text(json.dumps(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    serial = os.environ.get("ANDROID_SERIAL")
    while args and args[0].startswith("-") and args[0] != "-l":
        flag = args.pop(0)
        if flag == "-s" and args:
            serial = args.pop(0)
        else:
            print(f"adb: unsupported option {flag} (adb-shim speaks -s only)", file=sys.stderr)
            return 1
    if not args:
        print(
            "usage: adb-shim [-s SERIAL] devices [-l] | shell CMD | push L R | pull R L | reverse ...", file=sys.stderr
        )
        return 1
    command, rest = args[0], args[1:]
    try:
        config = load_config()
        if command == "devices":
            return cmd_devices(config, rest)
        if command in ("start-server", "kill-server"):
            return 0
        dev = pick_device(config, serial)
        if command == "shell":
            return cmd_shell(dev, rest)
        if command == "push":
            return cmd_push(config, dev, rest)
        if command == "pull":
            return cmd_pull(dev, rest)
        if command == "reverse":
            return cmd_reverse(config, dev, rest)
        raise ShimError(f"unknown command {command} (adb-shim speaks devices, shell, push, pull, reverse)")
    except ShimError as exc:
        print(f"adb: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
