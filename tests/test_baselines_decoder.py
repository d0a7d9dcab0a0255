"""The backprop baseline of a decoder answering with label words (SmolLM2 + LoRA on bbc-lm).

Checked against Hugging Face's Llama with a peft LoRA (loss, logits and gradient), its prompts against the
tokenizer file read directly and against a real bundle's device batches.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fwdllm.baselines import BaselineConfig, run_baseline
from fwdllm.data.datasets import load_dataset
from fwdllm.data.partition import FederatedData, federate
from fwdllm.proto.names import Task


@pytest.fixture(scope="module")
def bbc_lm():
    return load_dataset("bbc-lm")


@pytest.fixture(scope="module")
def smol(bbc_lm):
    from fwdllm.baselines import TrainableModel

    return TrainableModel(
        "smollm2", "lora", bbc_lm.labels, seed=0, task=Task.CAUSAL_LM, trainable_layers="top:2", label_words=True
    )


def _smol_folder():
    from fwdllm.export.models import resolve

    return resolve("smollm2")[0]


def test_prompts_are_encoded_as_devices_do_right_padded_keeping_the_end(smol, bbc_lm):
    """Against the tokenizer file read directly: a long prompt loses its start (the 'Topic:' cue at the end
    survives), a short one is padded on the right with the model's pad id."""
    from tokenizers import Tokenizer

    folder = _smol_folder()
    prompts = [e["prompt"] for e in bbc_lm.heldout[:4]] + ["Article: Rain.\nTopic:"]
    seq_len = 24
    ids, mask = smol.encode(prompts, seq_len)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    pad = json.loads((folder / "config.json").read_text())["pad_token_id"]
    cue = tok.encode("\nTopic:", add_special_tokens=False).ids
    for row, prompt in enumerate(prompts):
        whole = tok.encode(prompt).ids
        kept = whole[-seq_len:]
        assert ids[row].tolist() == kept + [pad] * (seq_len - len(kept))
        assert mask[row].tolist() == [1] * len(kept) + [0] * (seq_len - len(kept))
        assert kept[-len(cue) :] == cue
    assert mask[0].sum() == seq_len < len(tok.encode(prompts[0]).ids) and mask[-1].sum() < seq_len


@pytest.mark.slow
def test_prompt_batches_equal_a_bundles_device_batches(smol, bbc_lm, tmp_path):
    """The token ids a device feeds: a real causal-lm bundle's tokenizer, fixed length and as ONNX Runtime pads
    (to the batch's longest row, as the baseline cuts its batches)."""
    from fwdllm.baseline_model import EncodedExamples
    from fwdllm.cli import main
    from fwdllm.device_runtime.backend import Tokenizer, open_backend
    from fwdllm.device_runtime.examples import Example
    from fwdllm.proto.manifest import load_manifest

    bundle = tmp_path / "bundle"
    assert (
        main(
            [
                "export",
                "--model",
                "smollm2",
                "--task",
                "causal-lm",
                "--label-names",
                ",".join(bbc_lm.labels),
                "--peft",
                "lora",
                "--trainable-layers",
                "top:2",
                "--format",
                "onnx",
                "--seq-len",
                "48",
                "--out",
                str(bundle),
            ]
        )
        == 0
    )
    manifest = load_manifest(bundle)
    long = {"prompt": "Article: " + "word " * 80 + "\nTopic:", "label": "tech"}
    for chosen in (bbc_lm.heldout[:7], bbc_lm.heldout[7:12] + [long]):
        examples = [Example(prompt=e["prompt"], label=bbc_lm.labels.index(e["label"])) for e in chosen]
        encoded = EncodedExamples(smol, chosen, bbc_lm.labels, manifest.model.max_seq_len)
        fixed = Tokenizer(bundle, manifest).batch(examples)
        np.testing.assert_array_equal(encoded.ids.numpy(), fixed.input_ids)
        np.testing.assert_array_equal(encoded.mask.numpy(), fixed.attention_mask)
        with open_backend(bundle, "onnxruntime") as backend:
            device = backend.tokenizer().batch(examples)
        ids, mask, labels = encoded.batch(np.arange(len(chosen)))
        for got, want in ((ids, device.input_ids), (mask, device.attention_mask), (labels, device.labels)):
            np.testing.assert_array_equal(got.numpy(), want)
    assert device.seq_len == 48 and fixed.attention_mask[:-1].sum(1).max() < 48  # the long prompt was cut


def _peft_reference(theta_values: dict[str, np.ndarray], layers: list[int]):
    """SmolLM2 as Hugging Face's LlamaForCausalLM with a peft LoRA (r 8, alpha 16 on q/v of ``layers``) holding θ."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(_smol_folder()), dtype=torch.float32).eval()
    model = get_peft_model(
        hf,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=layers, lora_dropout=0.0
        ),
    )
    state = {
        "base_model.model."
        + n.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): torch.from_numpy(v)
        for n, v in theta_values.items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k]
    return model


def test_label_word_loss_and_gradient_equal_hf_llama_with_peft_lora(smol, bbc_lm):
    from transformers import AutoTokenizer

    with torch.no_grad():  # B ≠ 0: the LoRA updates change the logits
        smol.theta.copy_(torch.randn(smol.theta.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    examples = bbc_lm.heldout[:6]
    ids, mask = smol.encode([e["prompt"] for e in examples], 34)  # some prompts are cut: their ends are scored
    assert mask.sum(1).max() == 34 > mask.sum(1).min()
    labels = torch.tensor([bbc_lm.labels.index(e["label"]) for e in examples])
    loss, logits = smol.loss_logits(ids, mask, labels)
    (grad,) = torch.autograd.grad(loss, smol.theta)

    values = smol.layout.split(smol.theta.detach()[0].numpy().copy())
    assert sorted({int(n.split(".")[2]) for n in values}) == [28, 29]  # top:2 of 30 layers
    ref = _peft_reference(values, [28, 29])
    words = [
        AutoTokenizer.from_pretrained(str(_smol_folder()))(" " + w, add_special_tokens=False).input_ids[0]
        for w in bbc_lm.labels
    ]
    causal_lm = ref.base_model.model  # LlamaForCausalLM with LoRA layers in place
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    last = mask.sum(1) - 1  # the prompt's last token, right padding
    want_logits = causal_lm.lm_head(hidden[torch.arange(len(last)), last])[:, words]  # vocabulary-wide, then picked
    want = torch.nn.functional.cross_entropy(want_logits, labels)
    want.backward()

    torch.testing.assert_close(logits.detach(), want_logits.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation runs the layers above the frozen ones on their kept output: the same numbers
        assert smol.frozen_prefix
        reused = smol.loss_logits(ids, mask, labels, smol.pm.prefix(ids, mask))
    torch.testing.assert_close(reused[1], logits.detach(), rtol=1e-5, atol=1e-5)
    grads = smol.layout.split(grad[0].numpy())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            theta_name = name.removeprefix("base_model.model.").replace(".default.", ".")
            np.testing.assert_allclose(grads[theta_name], p.grad.numpy(), rtol=1e-3, atol=1e-6, err_msg=name)
    assert float(want.detach()) > 0.1 and abs(grad).max() > 1e-4


def _lora_values(layers: int) -> int:
    """LoRA r=8 on q (hidden → hidden) and v (hidden → kv heads × head size) of ``layers`` SmolLM2 layers."""
    cfg = json.loads((_smol_folder() / "config.json").read_text())
    hidden = cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * hidden // cfg["num_attention_heads"]
    return layers * 8 * ((hidden + hidden) + (hidden + kv))


def test_short_fedsgd_label_word_run_lowers_heldout_loss(bbc_lm, tmp_path):
    fed = federate(bbc_lm, 20, alpha=0.5, seed=1)
    cfg = BaselineConfig(
        data="bbc-lm",
        model="smollm2",
        peft="lora",
        trainable_layers="top:1",
        clients=20,
        per_step=2,
        steps=3,
        seq_len=24,
        lr=1e-2,
        eval_every=3,
        eval_limit=24,
    )
    records = run_baseline(cfg, tmp_path, fed, progress=False)
    assert [r["step"] for r in records] == [0, 3]
    assert records[-1]["heldout_loss"] < records[0]["heldout_loss"] - 0.05
    assert records[-1]["bytes_up"] == 3 * 2 * _lora_values(1) * 4


def test_fedavg_label_word_run_from_the_cli_counts_bytes_and_writes_report_and_plot(tmp_path):
    from fwdllm.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "baseline",
                "--data",
                "bbc-lm",
                "--model",
                "smollm2",
                "--peft",
                "lora",
                "--trainable-layers",
                "top:1",
                "--clients",
                "20",
                "--per-step",
                "2",
                "--steps",
                "2",
                "--local-steps",
                "2",
                "--local-lr",
                "0.5",
                "--seq-len",
                "24",
                "--eval-every",
                "2",
                "--eval-limit",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    # each sampled client uploads every trainable value once per round, whatever its local steps
    assert [r["bytes_up"] for r in records] == [0, 2 * 2 * _lora_values(1) * 4]
    config = json.loads((out / "config.json").read_text())
    assert (
        config["local_steps"] == 2
        and config["trainable_layers"] == "top:1"
        and config["num_trainable"] == _lora_values(1)
    )
    theta = load_file(str(out / "theta.safetensors"))
    assert any(np.abs(v).max() > 0 for n, v in theta.items() if "lora_B" in n)  # trained: B starts at zero
    report = (out / "report.md").read_text()
    first, last = records[0], records[-1]
    assert f"| held-out accuracy | {first['heldout_accuracy']:.3f} | {last['heldout_accuracy']:.3f} |" in report
    assert "round 0 (zero-shot)" in report and "FedAvg: 2 local SGD steps" in report
    assert f"{last['bytes_up']:,} bytes" in report and f"Peak RSS {last['peak_rss_mib']:,.0f} MiB" in report
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_words_config_errors_name_the_flag(tmp_path):
    from fwdllm.errors import UserError

    with pytest.raises(UserError, match="--trainable-layers"):
        run_baseline(BaselineConfig(data="bbc", peft="fedadapter", trainable_layers="top:2"), tmp_path)
    fed = FederatedData(
        "x", Task.CAUSAL_LM, [], [[{"prompt": "a", "target": " b"}]], [{"prompt": "a", "target": " b"}], {}
    )
    with pytest.raises(UserError, match="without labels"):
        run_baseline(BaselineConfig(data="x", model="smollm2", peft="lora", clients=1, per_step=1), tmp_path, fed)
