"""Backprop baselines: one FedAvg round equals an independent autograd computation; a short run learns.

The decoder baseline (label words) is tests/test_baselines_decoder.py.
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


@pytest.fixture(scope="session")
def bbc():
    return load_dataset("bbc")


def _independent_fedsgd_step(fed: FederatedData, lr: float, seq_len: int) -> dict[str, np.ndarray]:
    """θ after one FedSGD step computed on a plain HF BertModel: biases + a mean-pooled zero Linear head."""
    from transformers import AutoModel, AutoTokenizer

    from fwdllm.export.models import resolve

    folder, _ = resolve("minilm")
    tok = AutoTokenizer.from_pretrained(str(folder))
    bert = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    biases = {n: p for n, p in bert.named_parameters() if n.endswith("bias") and not n.startswith("pooler")}
    for p in bert.parameters():
        p.requires_grad_(False)
    head_w = torch.zeros(len(fed.labels), bert.config.hidden_size)
    head_b = torch.zeros(len(fed.labels))
    params = {**biases, "classifier.weight": head_w, "classifier.bias": head_b}
    for p in params.values():
        p.requires_grad_(True)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    total = sum(len(c) for c in fed.clients)
    for client in fed.clients:
        enc = tok(
            [e["text"] for e in client], truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"
        )
        labels = torch.tensor([fed.labels.index(e["label"]) for e in client])
        hidden = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        logits = ((hidden * m).sum(1) / m.sum(1)) @ head_w.T + head_b
        loss = torch.nn.functional.cross_entropy(logits, labels)
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            grads[n] += g * len(client) / total
    return {n: (p - lr * grads[n]).detach().numpy() for n, p in params.items()}


def test_one_round_equals_fedsgd_by_autograd(bbc, tmp_path):
    # 3 clients of 4 examples, all sampled, batch = client size: the round is one exact FedSGD step.
    fed = FederatedData("bbc", Task.SEQ_CLS, bbc.labels, [bbc.train[i : i + 4] for i in (0, 4, 8)], bbc.heldout[:8], {})
    lr, seq_len = 0.5, 24
    cfg = BaselineConfig(
        data="bbc",
        peft="bitfit",
        clients=3,
        per_step=3,
        steps=1,
        batch_size=4,
        seq_len=seq_len,
        optimizer="sgd",
        lr=lr,
        eval_limit=8,
    )
    run_baseline(cfg, tmp_path, fed, progress=False)
    got = load_file(str(tmp_path / "theta.safetensors"))
    want = _independent_fedsgd_step(fed, lr, seq_len)
    assert sorted(got) == sorted(want)
    assert sum(v.size for v in got.values()) == 27_653  # 25,728 encoder biases + 5×384+5 head
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=2e-6, err_msg=name)
    # the step moved θ: the comparison is not between two unchanged initial vectors
    assert np.abs(got["classifier.weight"]).max() > 1e-3


def test_short_bitfit_run_lowers_heldout_loss(bbc, tmp_path):
    fed = federate(bbc, 20, alpha=0.5, seed=1)
    cfg = BaselineConfig(
        data="bbc", peft="bitfit", clients=20, per_step=3, steps=6, seq_len=32, eval_every=3, eval_limit=80
    )
    records = run_baseline(cfg, tmp_path, fed, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["step"] for r in records] == [0, 3, 6]
    assert records[-1]["heldout_loss"] < records[0]["heldout_loss"] - 0.05
    assert records[-1]["heldout_accuracy"] > records[0]["heldout_accuracy"]
    assert records[-1]["bytes_up"] == 6 * 3 * 27_653 * 4
    assert records[-1]["device_seconds"] > 0 and records[-1]["peak_rss_mib"] > 100


def test_bad_config_names_the_flag(tmp_path):
    from fwdllm.errors import UserError

    with pytest.raises(UserError, match="--per-step"):
        run_baseline(BaselineConfig(data="bbc", clients=5, per_step=6), tmp_path)
    with pytest.raises(UserError, match="--peft"):
        run_baseline(BaselineConfig(data="bbc", peft="prefix"), tmp_path)


def test_full_finetuning_trains_every_used_weight(bbc, tmp_path):
    fed = FederatedData("bbc", Task.SEQ_CLS, bbc.labels, [bbc.train[i : i + 4] for i in (0, 4)], bbc.heldout[:8], {})
    cfg = BaselineConfig(
        data="bbc", peft="full", clients=2, per_step=2, steps=1, batch_size=4, seq_len=16, eval_limit=8
    )
    records = run_baseline(cfg, tmp_path, fed, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    # all MiniLM weights except the pooler (384*384 + 384), plus the 5-way head
    assert config["num_trainable"] == 22_713_216 - 147_840 + 5 * 384 + 5
    assert records[-1]["bytes_up"] == 2 * config["num_trainable"] * 4


def _adapter_count(depth: int, width: int, hidden: int = 384, labels: int = 5) -> int:
    """Trainable values of a fedadapter stage: two adapters (2·h·m + m + h) per adapted layer, plus the head."""
    return depth * 2 * (2 * hidden * width + width + hidden) + labels * hidden + labels


def test_fedadapter_upgrade_keeps_the_function(bbc):
    from fwdllm.baselines import TrainableModel, grow

    small = TrainableModel("minilm", "fedadapter", bbc.labels, seed=0, stage=(2, 8))
    with torch.no_grad():  # trained-looking values: non-zero up projections and head
        small.theta.copy_(torch.randn(small.theta.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    ids, mask = small.encode([e["text"] for e in bbc.heldout[:4]], 24)
    labels = torch.zeros(4, dtype=torch.long)
    before = small.loss_logits(ids, mask, labels)[1].detach()
    big = grow(small, "minilm", bbc.labels, 0, (4, 16))
    assert big.num_trainable == _adapter_count(4, 16) > small.num_trainable == _adapter_count(2, 8)
    after = big.loss_logits(ids, mask, labels)[1].detach()
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert before.abs().max() > 1e-2  # the logits carry the adapters and head, not zeros
    old, new = small.layout.split(small.theta.detach()[0].numpy()), big.layout.split(big.theta.detach()[0].numpy())
    name = next(n for n in old if n.endswith("adapter.down.weight"))
    np.testing.assert_array_equal(new[name][:8], old[name])
    assert np.abs(new[name][8:]).max() > 0  # new down rows are initialised, new up columns are zero
    assert not new[name.replace("down", "up")][:, 8:].any()


def test_fedadapter_schedule_and_bytes_up(bbc, tmp_path):
    fed = FederatedData("bbc", Task.SEQ_CLS, bbc.labels, [bbc.train[i : i + 4] for i in (0, 4, 8)], bbc.heldout[:8], {})
    cfg = BaselineConfig(
        data="bbc",
        peft="fedadapter",
        clients=3,
        per_step=2,
        steps=6,
        batch_size=4,
        seq_len=16,
        eval_every=1,
        eval_limit=8,
    )
    records = run_baseline(cfg, tmp_path, fed, progress=False)
    # the record after round r (1-based step r+1) was trained by round r's stage; step 0 shows the first stage
    stages = [(2, 8), (2, 8), (2, 8), (4, 16), (4, 16), (6, 32), (6, 32)]
    assert [(r["depth"], r["width"]) for r in records] == stages
    sent = 0
    for r, stage in zip(records[1:], stages[1:]):
        sent += _adapter_count(*stage) * 4 * cfg.per_step
        assert r["bytes_up"] == sent
    assert sum(v.size for v in load_file(str(tmp_path / "theta.safetensors")).values()) == _adapter_count(6, 32)


def test_short_fedadapter_run_lowers_heldout_loss(bbc, tmp_path):
    fed = federate(bbc, 20, alpha=0.5, seed=1)
    cfg = BaselineConfig(
        data="bbc", peft="fedadapter", clients=20, per_step=3, steps=6, seq_len=32, eval_every=3, eval_limit=80
    )
    records = run_baseline(cfg, tmp_path, fed, progress=False)
    assert records[-1]["heldout_loss"] < records[0]["heldout_loss"] - 0.05
    assert records[-1]["heldout_accuracy"] > records[0]["heldout_accuracy"]
