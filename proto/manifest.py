"""The bundle manifest: the one schema that the exporter writes and devices and coordinator read.

A bundle is a folder holding ``manifest.json``, the initial trainable vector theta
(``theta.safetensors``), the tokenizer and the graphs. The manifest fixes the layout of the
flat vector theta (tensor names, shapes, offsets), which is the element order the
perturbation spec uses; that layout is computed here and nowhere else. Field meanings are
documented in export/BUNDLE.md. This module needs numpy and safetensors only, so a phone
can import it.

A manifest is input from wherever the bundle came from: ``load_manifest`` checks it against
the schema and the files on disk (``manifest_check.py``) before anything is sized or opened
from it, and reports each problem as one BundleError naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.errors import UserError
from fwdllm.proto.names import GraphRole, Task, ThetaChannel

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
THETA_FILE = "theta.safetensors"


class BundleError(UserError):
    """A bundle that cannot be used as it is; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class TensorSlot:
    """One trainable tensor's place in the flat vector theta."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # Python ints: an absurd shape is refused by size, never wrapped around


@dataclass(frozen=True)
class ThetaLayout:
    """The order of trainable tensors in theta: concatenated, each row-major, float32."""

    tensors: tuple[TensorSlot, ...]

    @classmethod
    def from_shapes(cls, named_shapes: list[tuple[str, tuple[int, ...]]]) -> ThetaLayout:
        slots, offset = [], 0
        for name, shape in named_shapes:
            slot = TensorSlot(name, tuple(int(s) for s in shape), offset)
            slots.append(slot)
            offset += slot.size
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            raise BundleError(f"duplicate trainable tensor names in theta layout: {names}")
        return cls(tuple(slots))

    @property
    def dim(self) -> int:
        last = self.tensors[-1] if self.tensors else None
        return last.offset + last.size if last else 0

    def flatten(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """Concatenate named tensors into theta in layout order."""
        missing = [s.name for s in self.tensors if s.name not in tensors]
        if missing:
            raise BundleError(f"theta is missing tensors {missing[:5]}")
        flat = np.empty(self.dim, dtype=np.float32)
        for s in self.tensors:
            value = np.asarray(tensors[s.name], dtype=np.float32)
            if value.shape != s.shape:
                raise BundleError(f"tensor {s.name} has shape {value.shape}, the layout says {s.shape}")
            flat[s.offset : s.offset + s.size] = value.reshape(-1)
        return flat

    def split(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Views of theta (shape ``[..., dim]``) per tensor, shaped ``[..., *shape]``."""
        self.check(theta)
        lead = theta.shape[:-1]
        return {s.name: theta[..., s.offset : s.offset + s.size].reshape(*lead, *s.shape) for s in self.tensors}

    def check(self, theta: np.ndarray) -> None:
        if theta.shape[-1:] != (self.dim,):
            raise BundleError(f"theta has length {theta.shape[-1:]}, the bundle's layout needs {self.dim}")

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "size": s.size} for s in self.tensors]

    @classmethod
    def from_json(cls, items: list[dict[str, Any]]) -> ThetaLayout:
        layout = cls.from_shapes([(t["name"], tuple(t["shape"])) for t in items])
        for slot, item in zip(layout.tensors, items):
            if (slot.offset, slot.size) != (item["offset"], item.get("size", slot.size)):
                raise BundleError(
                    f"manifest offset and size of {slot.name} are {item['offset']} and {item.get('size')}, "
                    f"its shapes give {slot.offset} and {slot.size}; re-export the bundle"
                )
        return layout


@dataclass
class TensorSpec:
    """A graph input or output. Dimensions are ints, or names for axes fixed at run time."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass
class GraphSpec:
    """One graph file of the bundle and how to call it."""

    role: str  # a GraphRole
    format: str  # a GraphFormat
    precision: str  # a Precision
    file: str
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    perturbations: int | None = None  # fixed P of the perturbation axis; None when dynamic
    batch_size: int | None = None  # fixed batch; None when dynamic
    seq_len: int | None = None
    theta_channel: str = ThetaChannel.INPUT  # how theta enters: a ThetaChannel
    validation: dict[str, Any] = field(default_factory=dict)  # error against PyTorch measured at export
    delegation: dict[str, Any] = field(default_factory=dict)  # ops each delegate would take

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GraphSpec:
        d = dict(d)
        d["inputs"] = [TensorSpec(**t) for t in d.get("inputs", [])]
        d["outputs"] = [TensorSpec(**t) for t in d.get("outputs", [])]
        return cls(**d)


@dataclass
class ModelInfo:
    source: str  # where the weights came from (path or shipped default name)
    architecture: str  # e.g. bert, distilbert, albert, roberta, llama
    task: str  # a Task
    max_seq_len: int
    tokenizer: str  # tokenizer file inside the bundle (tokenizers JSON)
    num_labels: int | None = None
    labels: list[str] | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Decoders answering with a label word: the vocabulary id of each label's first token as it
    # follows the prompt (one per label in ``labels``, all distinct). None: open-ended targets.
    label_token_ids: list[int] | None = None

    @property
    def classifies(self) -> bool:
        """Whether the graphs score a closed label set (seq-cls, or a decoder's label words) and return logits."""
        return self.task == Task.SEQ_CLS or bool(self.label_token_ids)


@dataclass
class PeftInfo:
    method: str  # bitfit | adapter | lora | head
    trainable_layers: str  # head | top:K | all
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    model: ModelInfo
    peft: PeftInfo
    theta: ThetaLayout
    graphs: list[GraphSpec]
    cut_layer: int | None = None  # prefix graphs output the hidden states after this many layers
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    theta_file: str = THETA_FILE
    fwdllm_version: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    # ----- identity -----
    def fingerprint(self) -> str:
        """Identifies the model a device trains: model, PEFT, theta layout and initial theta.

        Two bundles of the same export with different graph formats share it, so a device
        holding only the TFLite graph still matches a coordinator holding the ONNX one.
        """
        model = asdict(self.model)
        if model["label_token_ids"] is None:  # bundles of open-ended decoders and encoders keep their fingerprint
            del model["label_token_ids"]
        ident = {
            "model": model,
            "peft": asdict(self.peft),
            "theta": self.theta.to_json(),
            "theta_sha256": self.files.get(self.theta_file, ""),
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    # ----- lookup -----
    def graph(self, format: str, role: str = GraphRole.FULL, precision: str | None = None) -> GraphSpec:
        found = [g for g in self.graphs if g.format == format and g.role == role and precision in (None, g.precision)]
        if not found:
            have = sorted({f"{g.format}/{g.role}/{g.precision}" for g in self.graphs})
            raise BundleError(
                f"the bundle has no {format} {role} graph{' at ' + precision if precision else ''}; "
                f"it has {have}. Re-export with `fwdllm export --format {format}`."
            )
        return found[0]

    # ----- (de)serialisation -----
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "fwdllm_version": self.fwdllm_version,
            "created": self.created,
            "fingerprint": self.fingerprint(),
            "model": asdict(self.model),
            "peft": asdict(self.peft),
            "theta": {
                "file": self.theta_file,
                "dim": self.theta.dim,
                "dtype": "float32",
                "tensors": self.theta.to_json(),
            },
            "cut_layer": self.cut_layer,
            "graphs": [asdict(g) for g in self.graphs],
            "files": self.files,
        }

    @classmethod
    def from_json(cls, d: Any) -> Manifest:
        """The manifest of parsed manifest.json ``d``, after the schema checks; a BundleError names what is wrong."""
        from fwdllm.proto.manifest_check import check_json  # it imports this module's dataclasses

        check_json(d)
        manifest = cls(
            model=ModelInfo(**d["model"]),
            peft=PeftInfo(**d["peft"]),
            theta=ThetaLayout.from_json(d["theta"]["tensors"]),
            theta_file=d["theta"]["file"],
            graphs=[GraphSpec.from_json(g) for g in d["graphs"]],
            cut_layer=d.get("cut_layer"),
            files=dict(d["files"]),
            fwdllm_version=d.get("fwdllm_version", ""),
            created=d.get("created", ""),
        )
        if manifest.theta.dim != d["theta"]["dim"]:
            raise BundleError(
                f"manifest theta.dim {d['theta']['dim']} disagrees with its tensors ({manifest.theta.dim}); "
                "re-export the bundle"
            )
        if d["fingerprint"] != manifest.fingerprint():
            raise BundleError(
                "manifest fingerprint does not match its contents: the manifest was edited by hand; "
                "re-export the bundle or copy its original manifest.json again"
            )
        return manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Record checksums of every file the manifest names, then write manifest.json last.

    The manifest is the bundle's commit point: a folder without it is never a bundle.
    """
    bundle = Path(bundle)
    names = {manifest.theta_file, manifest.model.tokenizer, *(g.file for g in manifest.graphs)}
    manifest.files = {name: sha256_file(bundle / name) for name in sorted(names)}
    tmp = bundle / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    tmp.replace(bundle / MANIFEST_FILE)


def load_manifest(bundle: Path, verify_checksums: bool = True) -> Manifest:
    """Read and check a bundle's manifest; every problem is a BundleError naming the fix.

    ``verify_checksums=False`` skips only hashing the files (for callers that hash them elsewhere or only
    list the graphs); the schema, the confinement of every file to the bundle and θ's size are always checked.
    """
    from fwdllm.proto.manifest_check import check_files, read_manifest_json  # it imports this module

    bundle = Path(bundle)
    manifest = Manifest.from_json(read_manifest_json(bundle))
    check_files(bundle, manifest)
    if verify_checksums:
        for name, expected in manifest.files.items():
            f = bundle / name
            if not f.is_file():
                raise BundleError(f"bundle file {name} is missing from {bundle}; copy the whole bundle folder again")
            if sha256_file(f) != expected:
                raise BundleError(f"bundle file {name} is corrupt or truncated (checksum mismatch); copy it again")
    return manifest


def load_theta(bundle: Path, manifest: Manifest) -> np.ndarray:
    """The initial theta of a bundle, flat float32 in layout order."""
    from safetensors.numpy import load_file

    return manifest.theta.flatten(load_file(str(Path(bundle) / manifest.theta_file)))


def warm_start(layout: ThetaLayout, theta: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    """θ with every tensor that ``path`` (a θ file of another run) also holds replaced by that file's values.

    Tensors are matched by name, so a run of one PEFT method can start from another's result:
    BitFit or LoRA from a trained head (linear probing, then fine-tuning). Returns the new θ and
    the names taken from the file.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"init θ {path} does not exist; give the theta.safetensors of an earlier run "
            "(`fwdllm simulate` writes one) or a coordinator checkpoint"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"init θ {path} is not a safetensors file ({exc})") from exc
    theta, taken = np.array(theta, dtype=np.float32, copy=True), []
    for slot in layout.tensors:
        if slot.name not in tensors:
            continue
        value = tensors[slot.name]
        if tuple(value.shape) != tuple(slot.shape):
            raise UserError(
                f"init θ {path}: {slot.name} has shape {list(value.shape)}, this bundle's is "
                f"{list(slot.shape)}; start from a run of the same model and labels"
            )
        if not np.isfinite(value).all():
            raise UserError(f"init θ {path}: {slot.name} holds NaN or Inf")
        theta[slot.offset : slot.offset + slot.size] = value.reshape(-1)
        taken.append(slot.name)
    if not taken:
        raise UserError(
            f"init θ {path} shares no tensor name with this bundle's θ ({layout.tensors[0].name}, ...); "
            "it comes from another model"
        )
    return theta, taken


def save_theta(path: Path, layout: ThetaLayout, theta: np.ndarray, metadata: dict[str, str] | None = None) -> None:
    """Write flat theta as named tensors, the format of ``theta.safetensors`` and coordinator checkpoints."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in layout.split(np.asarray(theta, dtype=np.float32)).items()}
    save_file(tensors, str(path), metadata=metadata)
