"""θ as a llama.cpp LoRA adapter GGUF: the layout mapping, the RoPE permutation and a fast rewriter.

A contract beside the manifest: the exporter writes the adapter at θ0 and the device's llama.cpp
backend rewrites it for every perturbed θ. It needs numpy, and ``gguf`` only inside the functions
that write a file, so a device imports it without torch and proto stays importable with numpy alone.

Adapter layout (llama.cpp ``src/llama-adapter.cpp``): keys ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``; one ``<base tensor>.lora_a`` / ``.lora_b``
pair per adapted matrix. PyTorch's A (r, in) and B (out, r) are written as they are: numpy's
row-major shape read backwards is ggml's ``ne``, so ``a.ne = (in, r)`` and ``b.ne = (r, out)``
as llama.cpp expects. llama.cpp scales the product by ``alpha / r``, the same as peft.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fwdllm.proto.manifest import BundleError, ThetaLayout

#: Hugging Face llama projection -> GGUF tensor base name (``blk.N.<name>.weight``).
HF_TO_GGUF_PROJ = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
#: llama.cpp architectures fwdllm writes -> whether llama.cpp rotates their q/k rows in adjacent pairs. Llama does
#: (its converter permutes Hugging Face's rows, and LoRA's B rows with them: ``rope_permute``); Qwen2/Qwen3 use
#: NEOX RoPE, which rotates halves as Hugging Face does, so their rows are written as they are.
GGUF_ARCHS = {"llama": True, "qwen2": False, "qwen3": False}

_LORA_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face -> GGUF row order of a q/k projection (llama.cpp's converter ``permute``).

    HF llama rotates the two halves of each head; llama.cpp rotates adjacent pairs, so the
    converter interleaves each head's rows. ``n_head`` is the number of heads that the rows
    hold (key/value heads for k). The same permutation applies to the rows of LoRA's B.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_lora_name(theta_name: str, first_layer: int = 0) -> str:
    """``...layers.3.self_attn.q_proj.lora_A.weight`` -> ``blk.3.attn_q.weight.lora_a``.

    ``first_layer`` renumbers for a suffix GGUF that holds only the layers from there up
    (``gguf_suffix.py``): its block 0 is the full model's layer ``first_layer``.
    """
    match = _LORA_NAME.search(theta_name)
    if not match or match.group(2) not in HF_TO_GGUF_PROJ:
        raise BundleError(
            f"θ tensor {theta_name!r} is not a LoRA matrix of a llama projection "
            f"({', '.join(HF_TO_GGUF_PROJ)}); the llama.cpp backend runs LoRA bundles only: "
            "re-export with `--peft lora`"
        )
    layer, proj, ab = match.groups()
    if int(layer) < first_layer:
        raise BundleError(
            f"θ tensor {theta_name!r} lies below layer {first_layer}, where the suffix GGUF starts; "
            "open the backend with prefix_reuse=False or re-export the bundle"
        )
    return f"blk.{int(layer) - first_layer}.{HF_TO_GGUF_PROJ[proj]}.weight.lora_{ab.lower()}"


def lora_alpha(peft_config: dict) -> float:
    """LoRA's alpha from the manifest's PEFT config (``lora_alpha`` as peft names it, or ``alpha``)."""
    for key in ("lora_alpha", "alpha"):
        if key in peft_config:
            return float(peft_config[key])
    raise BundleError(f"the bundle's LoRA config {peft_config} has no lora_alpha; re-export the bundle")


@dataclass(frozen=True)
class _Slot:
    gguf_name: str
    theta_slice: slice
    shape: tuple[int, ...]
    rope_heads: int | None  # rows to permute for q/k lora_b


class LoraAdapterWriter:
    """Writes θ as an adapter GGUF; after the first file, only the tensor bytes change.

    The first ``write`` lays the file out with ``gguf.GGUFWriter``; later ones copy θ into
    a cached image of that file at the recorded tensor offsets and write it in one call
    (about 1 ms for SmolLM2's 460k LoRA values), which is what makes a new adapter per
    perturbation cheap. ``first_layer`` names the tensors for a suffix GGUF (``gguf_lora_name``).
    """

    def __init__(
        self, layout: ThetaLayout, alpha: float, n_head: int, n_head_kv: int, arch: str = "llama", first_layer: int = 0
    ):
        if arch not in GGUF_ARCHS:
            raise BundleError(
                f"llama.cpp architecture {arch!r} has no LoRA adapter layout here; supported: {', '.join(GGUF_ARCHS)}"
            )
        self.alpha, self.arch = float(alpha), arch
        slots = []
        for s in layout.tensors:
            name = gguf_lora_name(s.name, first_layer)
            heads = None
            if GGUF_ARCHS[arch] and name.endswith("lora_b") and (".attn_q." in name or ".attn_k." in name):
                heads = n_head if ".attn_q." in name else n_head_kv
                if s.shape[0] % (2 * heads):
                    raise BundleError(f"{s.name} has {s.shape[0]} rows, not a whole number of {heads} rotary heads")
            slots.append(_Slot(name, slice(s.offset, s.offset + s.size), s.shape, heads))
        names = [s.gguf_name for s in slots]
        missing = {n[:-1] + ("b" if n.endswith("a") else "a") for n in names} - set(names)
        if missing:
            raise BundleError(f"θ has LoRA matrices without their partner: {sorted(missing)[:4]}")
        self._slots = slots
        self._image: bytearray | None = None
        self._views: list[np.ndarray] = []

    def tensors(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """θ as the adapter's named tensors (GGUF names, q/k B rows permuted for llama), float32."""
        theta = np.asarray(theta, dtype=np.float32)
        out = {}
        for s in self._slots:
            value = theta[s.theta_slice].reshape(s.shape)
            out[s.gguf_name] = rope_permute(value, s.rope_heads) if s.rope_heads else value
        return out

    def write(self, path: Path, theta: np.ndarray) -> Path:
        path = Path(path)
        if self._image is None:
            self._layout_file(path, theta)
        else:
            for view, value in zip(self._views, self.tensors(theta).values()):
                view[...] = value
            with open(path, "wb") as fh:
                fh.write(self._image)
        return path

    def _layout_file(self, path: Path, theta: np.ndarray) -> None:
        import gguf

        writer = gguf.GGUFWriter(str(path), self.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, self.alpha)
        for name, value in self.tensors(theta).items():
            writer.add_tensor(name, np.ascontiguousarray(value))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        reader = gguf.GGUFReader(str(path))
        offsets = {t.name: int(t.data_offset) for t in reader.tensors}
        del reader
        self._image = bytearray(path.read_bytes())
        self._views = [
            np.frombuffer(
                self._image, dtype=np.float32, count=int(np.prod(s.shape)), offset=offsets[s.gguf_name]
            ).reshape(s.shape)
            for s in self._slots
        ]
