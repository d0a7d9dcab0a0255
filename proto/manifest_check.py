"""Checks of a manifest.json that came from elsewhere, run before anything is built or sized from it.

A bundle is copied between machines, so its manifest is input like any other: a hand edit, a
truncated copy or a hostile file must give one BundleError naming the field and the fix, never a
traceback, an allocation sized by a number in the file, or a file opened outside the bundle.
``check_json`` checks the parsed JSON against the schema dataclasses of ``manifest.py`` (every
field's type, shapes, sizes, roles, formats and precisions from the known sets, file names
relative and without ``..``); ``check_files`` checks what the names lead to on disk (no symlink
out of the bundle, a θ file holding exactly θ's float32 values). ``load_manifest`` runs both.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

from fwdllm.proto.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    BundleError,
    GraphSpec,
    Manifest,
    ModelInfo,
    PeftInfo,
)
from fwdllm.proto.names import GraphFormat, GraphRole, Precision, Task, ThetaChannel

#: Bound on the sequence length, batch and perturbation counts a manifest may make a device allocate for.
MAX_RUN_SIZE = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20  # real manifests are kilobytes; a bigger file is not read into memory

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEYS = {
    "schema_version": int,
    "fwdllm_version": str,
    "created": str,
    "fingerprint": str,
    "model": ModelInfo,
    "peft": PeftInfo,
    "theta": dict,
    "cut_layer": int | None,
    "graphs": list[GraphSpec],
    "files": dict[str, str],
}
_THETA_KEYS = {"file": str, "dim": int, "dtype": str, "tensors": list}
_TENSOR_KEYS = {"name": str, "shape": Any, "offset": int, "size": int}  # shape: checked on its own


def read_manifest_json(bundle: Path) -> Any:
    """The parsed manifest.json of ``bundle``, read only when its size is that of a manifest."""
    path = Path(bundle) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{bundle} is not a bundle: it has no {MANIFEST_FILE}. Create one with `fwdllm export`.")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{path} is {path.stat().st_size:,} bytes, more than any manifest "
            f"({MAX_MANIFEST_BYTES:,}); re-export the bundle"
        )
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, numbers of thousands of digits, deep nesting
        raise BundleError(f"{path} is not valid JSON ({str(exc)[:200]}); re-export the bundle") from exc


def check_json(d: Any) -> None:
    """Refuse a parsed manifest.json that does not follow the schema; afterwards every constructor call succeeds."""
    if not isinstance(d, dict):
        _fail("", f"must hold a JSON object, not {_shown(d)}")
    if "schema_version" in d and d["schema_version"] != SCHEMA_VERSION:
        raise BundleError(
            f"manifest schema version {d.get('schema_version')!r} is not supported (this fwdllm reads "
            f"{SCHEMA_VERSION}); re-export the bundle with this fwdllm version"
        )
    _check_object(d, _MANIFEST_KEYS, set(_MANIFEST_KEYS) - {"fwdllm_version", "created", "cut_layer"}, "")
    theta, model, graphs = d["theta"], d["model"], d["graphs"]
    _check_object(theta, _THETA_KEYS, set(_THETA_KEYS), "theta")
    _one_of(theta["dtype"], ("float32",), "theta.dtype")
    for i, tensor in enumerate(theta["tensors"]):
        _check_object(tensor, _TENSOR_KEYS, {"name", "shape", "offset"}, f"theta.tensors[{i}]")
        shape = tensor["shape"]
        if not isinstance(shape, list) or not all(type(n) is int and n > 0 for n in shape):
            _fail(f"theta.tensors[{i}].shape", f"must be a list of positive ints, not {_shown(shape)}")
    if not _SHA256.fullmatch(d["fingerprint"]):
        _fail("fingerprint", "must be 64 lowercase hex digits (a sha256)")
    _one_of(model["task"], Task, "model.task")
    sizes = {"model.max_seq_len": model["max_seq_len"]}
    for i, g in enumerate(graphs):
        at = f"graphs[{i}]"
        _one_of(g["role"], GraphRole, f"{at}.role")
        _one_of(g["format"], GraphFormat, f"{at}.format")
        _one_of(g["precision"], Precision, f"{at}.precision")
        _one_of(g.get("theta_channel", ThetaChannel.INPUT), ThetaChannel, f"{at}.theta_channel")
        _bundle_path(g["file"], f"{at}.file")
        sizes.update({f"{at}.{k}": g[k] for k in ("perturbations", "batch_size", "seq_len") if g.get(k) is not None})
        for kind in ("inputs", "outputs"):
            for j, t in enumerate(g.get(kind, [])):
                if 0 in t["shape"]:  # ints are >= 0 by type; the rest are axis names
                    _fail(
                        f"{at}.{kind}[{j}].shape", f"must list positive sizes or axis names, not {_shown(t['shape'])}"
                    )
    for where, size in sizes.items():
        if not 1 <= size <= MAX_RUN_SIZE:
            _fail(where, f"must lie in 1..{MAX_RUN_SIZE}, not {size}")
    _bundle_path(theta["file"], "theta.file")
    _bundle_path(model["tokenizer"], "model.tokenizer")
    for name, digest in d["files"].items():
        _bundle_path(name, f"files key {_shown(name)}")
        if not _SHA256.fullmatch(digest):
            _fail(f"files[{_shown(name)}]", "must be the file's sha256 (64 lowercase hex digits)")
    if unlisted := sorted({theta["file"], model["tokenizer"], *(g["file"] for g in graphs)} - set(d["files"])):
        _fail("files", f"has no checksum of {_shown(unlisted[0])}, which the bundle uses")


def check_files(bundle: Path, manifest: Manifest) -> None:
    """Every bundle file resolves inside the bundle folder, and the θ file holds exactly θ's float32 values.

    Neither reads more than θ's 8-byte header length, so both run even where checksums are skipped; the θ size
    check keeps a manifest from sizing an allocation that its θ file cannot fill.
    """
    root = Path(bundle).resolve()
    for name in manifest.files:  # the schema check made every file the bundle uses an entry here
        try:
            inside = (Path(bundle) / name).resolve().is_relative_to(root)
        except (OSError, RuntimeError):  # a symlink loop
            inside = False
        if not inside:
            raise BundleError(
                f"bundle file {name} is a symlink that leads out of {bundle}; "
                "put the file itself into the bundle folder"
            )
    path = Path(bundle) / manifest.theta_file
    if not path.is_file():
        raise BundleError(
            f"bundle file {manifest.theta_file} is missing from {bundle}; copy the whole bundle folder again"
        )
    with open(path, "rb") as fh:  # safetensors: an 8-byte little-endian header length, the header, then the data
        data = path.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
    need = manifest.theta.dim * 4
    if data != need:
        raise BundleError(
            f"manifest theta.tensors add up to {manifest.theta.dim:,} float32 values ({need:,} bytes) "
            f"but {manifest.theta_file} holds {max(data, 0):,} bytes of tensor data: the manifest does "
            "not belong to this θ file; re-export the bundle"
        )


def _fail(where: str, problem: str) -> NoReturn:
    raise BundleError(
        f"manifest.json{' ' + where if where else ''} {problem}; re-export the bundle with "
        "`fwdllm export` (or copy its original manifest.json again)"
    )


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_text(hint: Any) -> str:
    text = hint.__name__ if type(hint) is type else re.sub(r"[\w.]+\.(\w+)", r"\1", str(hint))  # no module paths
    return re.sub(r"\bint\b", "int >= 0", text)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether parsed JSON ``value`` has the annotated type ``hint``; an int is 0 to 2**63 - 1 and never a bool."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(v, args[1]) for v in value.values())
    if args:  # a union such as int | None
        return any(_conforms(value, a) for a in args)
    if hint is int:
        return type(value) is int and 0 <= value < 1 << 63
    return value is None if hint is type(None) else isinstance(value, hint)


def _check_object(value: Any, hints: dict[str, Any], required: set[str], where: str) -> None:
    """``value`` is a JSON object with the ``required`` keys and no key outside ``hints``, each of its hinted type.

    A hint that is a schema dataclass, or a list of one, is checked field by field, so an error names the nested field.
    """
    if not isinstance(value, dict):
        _fail(where, f"must be a JSON object, not {_shown(value)}")
    for key in value:
        if key not in hints:
            _fail(f"{where}.{key}".lstrip("."), f"is not a field of manifest schema version {SCHEMA_VERSION}")
    for key, hint in hints.items():
        at = f"{where}.{key}".lstrip(".")
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if key not in value:
            if key in required:
                _fail(at, "is missing")
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            _check_object(value[key], *_dataclass_keys(hint), at)
        elif isinstance(item, type) and dataclasses.is_dataclass(item) and isinstance(value[key], list):
            for i, element in enumerate(value[key]):
                _check_object(element, *_dataclass_keys(item), f"{at}[{i}]")
        elif not _conforms(value[key], hint):
            _fail(at, f"must be {_type_text(hint)}, not {_shown(value[key])}")


def _dataclass_keys(cls: type) -> tuple[dict[str, Any], set[str]]:
    """(field -> type, required fields) of a schema dataclass."""
    hints, fields = typing.get_type_hints(cls), dataclasses.fields(cls)
    return (
        {f.name: hints[f.name] for f in fields},
        {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING},
    )


def _one_of(value: Any, known: Iterable[str], where: str) -> None:
    allowed = tuple(known)
    if value not in allowed:
        _fail(where, f"is {_shown(value)}, not one of {', '.join(allowed)}")


def _bundle_path(name: str, where: str) -> None:
    """A file name a bundle may use: relative and without ``..``, so it cannot name a file outside the bundle."""
    path = PurePosixPath(name)
    if not name or "\0" in name or path.is_absolute() or ".." in path.parts:
        _fail(
            where,
            f"is {_shown(name)}: bundle files are named relative to the bundle folder, without '..' "
            '(e.g. "full.onnx")',
        )
