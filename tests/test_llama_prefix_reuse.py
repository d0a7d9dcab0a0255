"""llama.cpp prefix reuse: hidden states from the base GGUF, θ rows through the suffix GGUF.

The export is the real one (SmolLM2, BBC topic words, LoRA on the top 2 layers, f16 and q8_0);
every check compares the cut backend with an independent computation: the same bundle's
uncut base model on llama.cpp (same precision, same kernels) and the Hugging Face model.
"""

import numpy as np
import pytest
from export_helpers import rel_err

from fwdllm.data.datasets import load_dataset
from fwdllm.proto.names import Task

BBC_WORDS = ["business", "entertainment", "politics", "sports", "tech"]
TOP = 2


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from fwdllm.cli import main

    out = tmp_path_factory.mktemp("smol-llama-cut") / "bundle"
    assert (
        main(
            [
                "export",
                "--model",
                "smollm2",
                "--task",
                "causal-lm",
                "--label-names",
                ",".join(BBC_WORDS),
                "--peft",
                "lora",
                "--trainable-layers",
                f"top:{TOP}",
                "--format",
                "gguf",
                "--precision",
                "f16,q8_0",
                "--seq-len",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def examples():
    data = load_dataset("bbc-lm")
    return data.heldout[:8]


def _open(bundle, precision, reuse):
    from fwdllm.device_runtime.backend import open_backend

    return open_backend(bundle, "llama.cpp", precision, {"threads": 1, "prefix_reuse": reuse})


def _batch(backend, examples):
    from fwdllm.device_runtime.examples import Example

    return backend.tokenizer().batch([Example(prompt=e["prompt"], label=BBC_WORDS.index(e["label"])) for e in examples])


def _thetas(bundle, rows, scale=0.1):
    """θ0 plus noise that moves LoRA's B off zero, so the adapter changes the logits."""
    from fwdllm.proto.manifest import load_manifest, load_theta

    theta0 = load_theta(bundle, load_manifest(bundle))
    rng = np.random.default_rng(7)
    return (theta0 + scale * rng.standard_normal((rows, theta0.size))).astype(np.float32)


def test_export_writes_a_validated_suffix_per_precision(bundle):
    from fwdllm.proto.manifest import load_manifest

    manifest = load_manifest(bundle)
    assert manifest.cut_layer == 30 - TOP
    for precision in ("f16", "q8_0"):
        suffix = manifest.graph("gguf", "suffix", precision)
        assert suffix.file == f"suffix.{precision}.gguf" and suffix.theta_channel == "lora-adapter"
        assert suffix.validation["max_rel_err"] <= suffix.validation["tolerance"]
        assert suffix.validation["max_rel_err_vs_base"] < 1e-6
        # two layers and five output rows: far below the base file with its 49,152-row vocabulary matrix
        base = (bundle / manifest.graph("gguf", "base", precision).file).stat().st_size
        assert (bundle / suffix.file).stat().st_size < base / 10


@pytest.mark.parametrize("precision", ["f16", "q8_0"])
def test_prefix_then_suffix_equals_the_uncut_model_on_bbc_prompts(bundle, examples, precision):
    """Same precision, same kernels: the cut must give the uncut model's label logits (f16 within 1e-3)."""
    thetas = _thetas(bundle, 2)
    with _open(bundle, precision, True) as cut, _open(bundle, precision, False) as uncut:
        assert cut.info()["prefix_reuse"] and not uncut.info()["prefix_reuse"]
        batch = _batch(cut, examples)
        for theta in thetas:
            got, want = cut.logits(batch, theta), uncut.logits(batch, theta)
            assert rel_err(got, want) < 1e-3, precision
        moved = uncut.logits(batch, np.zeros_like(thetas[0]))
        assert rel_err(moved, want) > 1e-2  # θ reaches the suffix: the check above is not vacuous


def test_cut_label_logits_match_pytorch(bundle, examples):
    """prefix → suffix at f16 against the Hugging Face model's vocabulary-wide logits picked at the label words."""
    import torch

    from fwdllm.export.materialize import materialize
    from fwdllm.export.models import load
    from fwdllm.export.plan import plan_from_manifest
    from fwdllm.proto.manifest import load_manifest

    manifest = load_manifest(bundle)
    theta = _thetas(bundle, 1)[0]
    hf = load("smollm2", Task.CAUSAL_LM).model
    tuned = materialize(hf, plan_from_manifest(hf, manifest), theta)
    with _open(bundle, "f16", True) as cut:
        batch = _batch(cut, examples)
        got = cut.logits(batch, theta)
    ids, mask = (torch.as_tensor(x) for x in (batch.input_ids, batch.attention_mask))
    with torch.no_grad():
        out = tuned(input_ids=ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    want = out[torch.arange(len(last)), last][:, manifest.model.label_token_ids].double().numpy()
    assert rel_err(got, want) < 2e-2  # f16 weights (measured 3e-3 on random prompts at export)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_p_rows_equal_single_rows_and_the_prefix_runs_once_per_example(bundle, examples):
    thetas = _thetas(bundle, 3)
    with _open(bundle, "q8_0", True) as cut, _open(bundle, "q8_0", False) as uncut:
        batch = _batch(cut, examples)
        together = cut.losses(batch, thetas)
        assert cut.prefix_runs == len(examples)  # three θ rows, one prefix pass per prompt
        one_by_one = np.array([cut.losses(batch, row[None])[0] for row in thetas])
        assert cut.prefix_runs == len(examples)  # later calls on the same prompts hit the cache
        want = uncut.losses(batch, thetas)
        cut.clear_cache()
        cut.losses(batch, thetas[:1])
        assert cut.prefix_runs == 2 * len(examples)
    np.testing.assert_allclose(together, one_by_one, rtol=1e-6)
    np.testing.assert_allclose(together, want, rtol=1e-5)
    assert np.ptp(want) > 1e-3  # the rows differ, so matching them row by row means something


def test_forward_gradient_through_the_suffix_matches_the_uncut_backend(bundle, examples):
    from fwdllm.device_runtime.engine import forward_gradients

    theta = _thetas(bundle, 1)[0]
    seeds = [21, 22, 23, 24]
    with _open(bundle, "f16", True) as cut, _open(bundle, "f16", False) as uncut:
        batch = _batch(cut, examples[:4])
        got = forward_gradients(cut, batch, theta, seeds, epsilon=0.01).jvp
        want = forward_gradients(uncut, batch, theta, seeds, epsilon=0.01).jvp
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert np.abs(want).max() > 0


def test_whole_vocabulary_logits_need_the_uncut_model(bundle, examples):
    from fwdllm.device_runtime.backend import BackendError

    with _open(bundle, "f16", True) as cut:
        tokens = _batch(cut, examples).input_ids[0, :5].astype(np.int32)
        with pytest.raises(BackendError, match="prefix_reuse=False"):
            cut.token_logits(tokens, np.array([4]))


def test_suffix_adapter_names_count_from_the_cut():
    from fwdllm.proto.gguf_lora import gguf_lora_name
    from fwdllm.proto.manifest import BundleError

    name = "base_model.model.model.layers.29.self_attn.v_proj.lora_B.default.weight"
    assert gguf_lora_name(name, first_layer=28) == "blk.1.attn_v.weight.lora_b"
    with pytest.raises(BundleError, match="below layer 28"):
        gguf_lora_name(name.replace("29", "27"), first_layer=28)
