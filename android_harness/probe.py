"""doctor: what a phone or board is (ABI, OS, SoC, accelerators, Python, memory), asked over adb."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from fwdllm.android_harness.adb import Adb

TERMUX_PYTHON = "/data/data/com.termux/files/usr/bin/python"
#: ABIs the device runtime has wheels for (onnxruntime, ai-edge-litert, numpy, grpcio).
RUNTIME_ABIS = ("arm64-v8a", "x86_64")
_UNAME_ABI = {
    "aarch64": "arm64-v8a",
    "arm64": "arm64-v8a",
    "x86_64": "x86_64",
    "armv7l": "armeabi-v7a",
    "armv8l": "armeabi-v7a",
    "i686": "x86",
}
#: ELF e_machine of each ABI, to refuse a benchmark_model built for another one.

_PROPS = {
    "abi": "ro.product.cpu.abi",
    "abilist": "ro.product.cpu.abilist",
    "android": "ro.build.version.release",
    "sdk": "ro.build.version.sdk",
    "manufacturer": "ro.product.manufacturer",
    "model": "ro.product.model",
    "soc_manufacturer": "ro.soc.manufacturer",
    "soc_model": "ro.soc.model",
    "board": "ro.board.platform",
    "hardware": "ro.hardware",
    "egl": "ro.hardware.egl",
    "vulkan": "ro.hardware.vulkan",
}
#: Libraries whose presence tells which accelerators a phone exposes to native code.
_ACCEL_LIBS = {
    "gpu-opencl": ["/vendor/lib64/libOpenCL.so", "/system/vendor/lib64/libOpenCL.so", "/system/lib64/libOpenCL.so"],
    "gpu-vulkan": ["/system/lib64/libvulkan.so", "/usr/lib/aarch64-linux-gnu/libvulkan.so.1"],
    "nnapi": ["/system/lib64/libneuralnetworks.so"],
    "qnn-htp": ["/vendor/lib64/libQnnHtp.so", "/vendor/lib64/libcdsprpc.so"],
    "mediatek-apu": ["/vendor/lib64/libneuron_adapter.so", "/vendor/lib64/libapuwareapusys.so"],
    "dri-render-node": ["/dev/dri/renderD128"],
}


@dataclass
class DeviceInfo:
    serial: str
    abi: str
    abilist: list[str]
    os: str
    model: str
    soc: str
    accelerators: list[str]
    termux: bool
    python: str  # the device python deploy would use ("" when none)
    memory_mb: int | None
    props: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return self.__dict__.copy()


def probe(adb: Adb) -> DeviceInfo:
    """Ask the selected device what it is, in one shell round trip plus getprop calls."""
    entry = adb.select()
    listing = adb.getprops()
    props = {k: listing.get(v, "") for k, v in _PROPS.items()}
    checks = " ".join(
        f"[ -e {shlex.quote(p)} ] && echo lib:{name};" for name, paths in _ACCEL_LIBS.items() for p in paths
    )
    script = (
        f"{checks} echo uname:$(uname -m); echo kernel:$(uname -sr);"
        " (pm list packages com.termux 2>/dev/null | grep -qx package:com.termux"
        f" || [ -x {TERMUX_PYTHON} ]) && echo termux:yes;"
        f" for p in {TERMUX_PYTHON} python3 python;"
        " do command -v $p >/dev/null 2>&1 && echo python:$(command -v $p) && break; done;"
        " grep -m1 MemTotal /proc/meminfo 2>/dev/null;"
        " grep -m1 -E '^(Hardware|model name)' /proc/cpuinfo 2>/dev/null;"
        " . /etc/os-release 2>/dev/null && echo os:$PRETTY_NAME; true"
    )
    out = adb.shell_text(script)
    facts: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        facts.setdefault(key.strip(), []).append(value.strip())
    abi = props["abi"] or _UNAME_ABI.get((facts.get("uname") or [""])[0], (facts.get("uname") or ["unknown"])[0])
    abilist = [a for a in props["abilist"].split(",") if a] or [abi]
    if props["android"]:
        os_name = f"Android {props['android']} (API {props['sdk']})"
    else:
        os_name = (facts.get("os") or facts.get("kernel") or ["unknown"])[0]
    accelerators = sorted(set(facts.get("lib", [])))
    if props["egl"]:
        accelerators.append(f"gpu-egl:{props['egl']}")
    if props["sdk"].isdigit() and int(props["sdk"]) >= 27 and "nnapi" not in accelerators:
        accelerators.append("nnapi")
    mem = facts.get("MemTotal")
    soc = " ".join(filter(None, [props["soc_manufacturer"], props["soc_model"] or props["board"] or props["hardware"]]))
    soc = soc or (facts.get("Hardware") or facts.get("model name") or ["unknown"])[0]
    return DeviceInfo(
        serial=entry.serial,
        abi=abi,
        abilist=abilist,
        os=os_name,
        model=" ".join(filter(None, [props["manufacturer"], props["model"]])) or entry.info.get("model", "unknown"),
        soc=soc,
        accelerators=accelerators,
        termux="yes" in facts.get("termux", []),
        python=(facts.get("python") or [""])[0],
        memory_mb=int(mem[0].split()[0]) // 1024 if mem else None,
        props={k: v for k, v in props.items() if v},
    )
