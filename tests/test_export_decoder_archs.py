"""Decoders people run on phones (Llama 3.x, Qwen2/3, Gemma 2/3, Phi-3), tiny and random, through the exporter.

Every check compares with an independent computation: the Hugging Face model's own forward
(its own masks, rotary embeddings and soft-capping; peft's LoRA layers for θ), never the stage
driver the graphs are traced from. The exports' recorded validation errors are that comparison
made by the exporter on its graphs; the PyTorch checks make it here on the stage driver.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fwdllm.proto.names import Task

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 49152  # SmolLM2's tokenizer.json, copied into every checkpoint
SMALL = dict(
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    max_position_embeddings=128,
    vocab_size=VOCAB,
)
GEMMA = dict(SMALL, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=4)

# Sliding windows of 4 tokens bite on the exporter's 16-token validation batch; layer kinds mix.
TINY = {
    # Llama 3.x: rope_type llama3 rescales the low rotary frequencies (a static change rotary_emb makes).
    "llama3": (
        "LlamaConfig",
        dict(
            SMALL,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "qwen2": ("Qwen2Config", dict(SMALL, num_hidden_layers=2, tie_word_embeddings=True)),
    # Qwen3 with HF's sliding window on the layers from max_window_layers on (q/k norms in every layer).
    "qwen3": (
        "Qwen3Config",
        dict(
            SMALL,
            num_hidden_layers=2,
            head_dim=16,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
    ),
    # Gemma 2: sliding and global layers alternate; the default soft-caps (attention 50, final 30).
    "gemma2": ("Gemma2Config", GEMMA),
    # Gemma 3: local layers rotate with base 1e4, the global one with 1e6 and linear scaling.
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            GEMMA,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
    # Phi-3 with every layer sliding and partial rotary dimensions (half of each head rotates).
    "phi3": (
        "Phi3Config",
        dict(SMALL, num_hidden_layers=2, sliding_window=4, partial_rotary_factor=0.5, pad_token_id=0),
    ),
}


def tiny_model(arch: str, **overrides):
    """A seeded random ``*ForCausalLM`` of ``arch``, eager attention as the exporter loads it; biases made non-zero."""
    import torch
    import transformers

    cls_name, kw = TINY[arch]
    cfg = getattr(transformers, cls_name)(**dict(kw, **overrides))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0, 0.02)
    return model.eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(arch)``: a folder with config.json, model.safetensors and SmolLM2's tokenizer.json (made once)."""
    from fwdllm.export.models import resolve

    tokenizer = resolve("smollm2")[0] / "tokenizer.json"
    made = {}

    def get(arch):
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            tiny_model(arch).save_pretrained(folder)
            shutil.copyfile(tokenizer, folder / "tokenizer.json")
            made[arch] = folder
        return made[arch]

    return get


def _export(checkpoint_dir, out, *extra):
    from fwdllm.cli import main
    from fwdllm.proto.manifest import load_manifest

    argv = [
        "export",
        "--model",
        str(checkpoint_dir),
        "--task",
        "causal-lm",
        "--trainable-layers",
        "top:1",
        "--format",
        "onnx",
        "--seq-len",
        "32",
        "--out",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    return load_manifest(out)


def _theta_names(manifest) -> list[str]:
    return [t.name for t in manifest.theta.tensors]


def _validated(manifest) -> dict[str, float]:
    """The exporter's recorded scale-relative error against transformers+peft, per graph role."""
    return {role: manifest.graph("onnx", role).validation["max_rel_err"] for role in ("full", "suffix")}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_lora_export_matches_hf(arch, checkpoint, tmp_path):
    manifest = _export(checkpoint(arch), tmp_path / "b", "--peft", "lora")
    assert (
        manifest.model.extra["model_type"] == json.loads((checkpoint(arch) / "config.json").read_text())["model_type"]
    )
    assert manifest.cut_layer == manifest.model.num_layers - 1
    errors = _validated(manifest)
    assert max(errors.values()) < 1e-4, errors
    targets = {name.split(".")[-3] for name in _theta_names(manifest)}
    assert targets == ({"qkv_proj"} if arch == "phi3" else {"q_proj", "v_proj"})


def test_qwen2_bitfit_trains_the_checkpoints_qkv_biases(checkpoint, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "b"
    manifest = _export(checkpoint("qwen2"), out, "--peft", "bitfit")
    errors = _validated(manifest)
    assert max(errors.values()) < 1e-4, errors
    theta = load_file(str(out / "theta.safetensors"))
    weights = load_file(str(checkpoint("qwen2") / "model.safetensors"))
    top = "model.layers.1."
    for proj in ("q_proj", "k_proj", "v_proj"):  # the checkpoint's own biases start θ
        np.testing.assert_array_equal(theta[f"{top}self_attn.{proj}.bias"], weights[f"{top}self_attn.{proj}.bias"])
    for new in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # bias-free Linears get zero ones
        assert not theta[f"{top}{new}.bias"].any()


def test_gemma2_adapter_export_matches_hf(checkpoint, tmp_path):
    manifest = _export(checkpoint("gemma2"), tmp_path / "b", "--peft", "adapter", "--adapter-reduction", "8")
    errors = _validated(manifest)
    assert max(errors.values()) < 1e-4, errors
    assert {n.rsplit(".adapter.", 1)[0] for n in _theta_names(manifest)} == {
        "model.layers.2.self_attn.o_proj",
        "model.layers.2.mlp.down_proj",
    }


def test_llama3_rope_scaling_is_in_effect():
    """The Llama 3 test model really rotates with rescaled low frequencies (else it would test plain RoPE)."""
    import torch

    model = tiny_model("llama3")
    rotary = model.model.rotary_emb
    dim = model.config.head_dim
    plain = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    assert rotary.rope_type == "llama3"
    assert torch.equal(rotary.inv_freq[:1], plain[:1])  # wavelengths under 32 / high_freq_factor kept
    assert torch.allclose(rotary.inv_freq[-1], plain[-1] / 8.0)  # the lowest divided by the factor


def _driver_and_hf(model, token_ids, rows=2, seed=0):
    """For θ rows around θ0: the final hidden states from the stage driver and ``spec.final``
    (``[P, B, S, H]``, with the patched model they ran on), and the HF model's logits at ``token_ids``
    with each row applied by peft (``[P, B, S, C]``)."""
    import torch

    from fwdllm.export.materialize import materialize
    from fwdllm.export.perturbable import PerturbableModel
    from fwdllm.export.plan import PeftOptions, build_plan

    plan = build_plan(model, Task.CAUSAL_LM, None, PeftOptions(method="lora", trainable_layers="top:1"))
    gen = torch.Generator().manual_seed(seed)
    theta = plan.theta0()[None] + 0.05 * torch.randn(rows, plan.layout.dim, generator=gen)
    ids = torch.randint(5, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    pm = PerturbableModel(model, plan).eval()
    with torch.no_grad():
        pm.src.bind(theta)
        h, _ = pm._run(ids, mask, theta, 0, plan.num_layers + 1)
        final = plan.spec.final(pm.model, h).reshape(rows, *ids.shape, -1)
        want = torch.stack(
            [
                materialize(model, plan, row.numpy())(input_ids=ids, attention_mask=mask).logits[..., token_ids]
                for row in theta
            ]
        )
    return final, pm.model, want.double().numpy()


def _rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("arch", sorted(TINY))
def test_label_head_over_the_stage_driver_equals_hf_logits(arch):
    import torch

    from fwdllm.export.archs import ArchSpec, spec_for

    # Gemma with a final soft-cap small enough to bite on a tiny random model's logits.
    caps = {"final_logit_softcapping": 0.05} if arch.startswith("gemma") else {}
    model = tiny_model(arch, **caps)
    spec = spec_for(model.config.model_type)
    words = [7, 4242, 31000, VOCAB - 1]
    final, patched, want = _driver_and_hf(model, words)
    with torch.no_grad():
        got = spec.label_head(patched, words)(final)
        uncapped = ArchSpec.label_head(spec, patched, words)(final)
    assert _rel(got, want) < 1e-4
    if caps:  # the cap is in effect: the plain LM head rows miss the model's own logits
        assert _rel(uncapped, want) > 1e-2


def _lm_loss_error(model) -> float:
    """Next-token loss of the traced module against HF's for two θ rows, scale-relative."""
    import torch

    from fwdllm.export.materialize import reference
    from fwdllm.export.perturbable import PerturbableModel
    from fwdllm.export.plan import PeftOptions, build_plan

    plan = build_plan(model, Task.CAUSAL_LM, None, PeftOptions(method="lora", trainable_layers="top:1"))
    gen = torch.Generator().manual_seed(1)
    theta = plan.theta0()[None] + 0.05 * torch.randn(2, plan.layout.dim, generator=gen)
    ids = torch.randint(5, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = torch.where(mask == 1, ids, -100)
    want, _ = reference(model, plan, theta.numpy(), ids.numpy(), mask.numpy(), labels.numpy())
    with torch.no_grad():
        (got,) = PerturbableModel(model, plan).eval().full(ids, mask, labels, theta)
    return _rel(got.numpy(), want)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_lm_loss_with_large_activations_equals_hf(arch):
    """Weights large enough that attention logits and norms leave their small-value range, where
    attention soft-capping and RMSNorm details show (Gemma 2's final cap: the next test)."""
    caps = {"final_logit_softcapping": None} if arch == "gemma2" else {}
    assert _lm_loss_error(tiny_model(arch, initializer_range=0.5, **caps)) < 1e-4


def test_gemma2_lm_loss_applies_the_final_soft_cap():
    assert _lm_loss_error(tiny_model("gemma2", initializer_range=0.5)) < 1e-4


def test_phi3_longrope_graph_switches_factors_with_the_sequence_length(tmp_path):
    """LongRoPE rotates with its short factors up to the original context (8 here) and its long ones
    beyond; one exported graph must follow HF on both sides of that length."""
    from export_helpers import hf_reference

    from fwdllm.export.models import resolve
    from fwdllm.export.onnx_graphs import run

    half = 4  # rotary dims / 2: head_dim 16 × partial_rotary_factor 0.5
    rope = {
        "rope_type": "longrope",
        "original_max_position_embeddings": 8,
        "short_factor": [1.0] * half,
        "long_factor": [16.0] * half,
    }
    folders = {}
    for name, long_factor in (("longrope", rope["long_factor"]), ("short-only", rope["short_factor"])):
        folders[name] = tmp_path / name
        tiny_model(
            "phi3",
            initializer_range=0.3,
            original_max_position_embeddings=8,
            rope_scaling=dict(rope, long_factor=long_factor),
        ).save_pretrained(folders[name])
        shutil.copyfile(resolve("smollm2")[0] / "tokenizer.json", folders[name] / "tokenizer.json")
    manifest = _export(folders["longrope"], tmp_path / "b", "--peft", "lora")
    assert max(_validated(manifest).values()) < 1e-4
    rng = np.random.default_rng(4)
    for seq in (6, 8, 9, 24):
        ids = rng.integers(5, VOCAB, size=(2, seq))
        batch = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "labels": ids,
            "theta": (0.05 * rng.standard_normal((2, manifest.theta.dim))).astype(np.float32),
        }
        want, _ = hf_reference(folders["longrope"], manifest, batch, task=Task.CAUSAL_LM)
        assert _rel(run(tmp_path / "b" / manifest.graph("onnx").file, batch)["loss"], want) < 1e-4, seq
        if seq > 8:  # the long factors matter here: short ones alone give another loss
            short, _ = hf_reference(folders["short-only"], manifest, batch, task=Task.CAUSAL_LM)
            assert _rel(short, want) > 1e-3, seq


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3"])
def test_gguf_export_runs_on_llama_cpp_like_hf(arch, tmp_path):
    """Base and suffix GGUFs (f16) of a label-word LoRA bundle, validated by the exporter through the device's
    llama.cpp backend against transformers+peft. Weights large enough that attention is far from uniform, so
    the rotary details show: Llama 3's rescaled frequencies (``rope_freqs``), Qwen's q/k/v biases and NEOX rotary
    order (rows not permuted), tied embeddings, Qwen3's per-head q/k norms (a wrong row order measured 1.47)."""
    from fwdllm.export.models import resolve

    folder = tmp_path / "ckpt"
    tiny_model(arch, use_sliding_window=False, initializer_range=0.5).save_pretrained(folder)
    shutil.copyfile(resolve("smollm2")[0] / "tokenizer.json", folder / "tokenizer.json")
    manifest = _export(
        folder,
        tmp_path / "b",
        "--peft",
        "lora",
        "--format",
        "gguf",
        "--precision",
        "f16",
        "--label-names",
        "business,entertainment,politics,sports,tech",
    )
    errors = {role: manifest.graph("gguf", role, "f16").validation["max_rel_err"] for role in ("base", "suffix")}
    assert max(errors.values()) < 5e-3, errors


def test_gguf_export_refuses_what_llama_cpp_would_run_differently(checkpoint, tmp_path, capsys):
    from fwdllm.cli import main

    for arch, says in (("qwen3", "sliding-window attention"), ("gemma2", "GGUF export supports llama, qwen2, qwen3")):
        argv = ["export", "--model", str(checkpoint(arch)), "--task", "causal-lm", "--peft", "lora"]
        argv += ["--trainable-layers", "top:1", "--format", "gguf", "--out", str(tmp_path / arch)]
        assert main(argv) == 2
        assert says in capsys.readouterr().err
