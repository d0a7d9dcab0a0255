"""Backprop federated fine-tuning in PyTorch: the baselines fwdllm is measured against.

The model is the exporter's (``fwdllm.export.plan`` + ``perturbable``): the same PEFT
sites, θ layout, zero-initialised head and mean pooling as a bundle, so a baseline and a
forward-gradient run start from the same θ. Here θ is a leaf tensor with a gradient instead
of a graph input. ``full`` fine-tuning trains θ (the head) and every frozen weight too.

A decoder learns classification as generation when the data set poses it so (label words,
e.g. ``bbc-lm``): the loss is the cross-entropy over the label words' first tokens at the
prompt's last token, exactly as a ``--label-names`` causal-lm bundle computes it, and prompts
are encoded by the devices' own tokenizer, so both sides train on the same token ids.

One round is FedAvg with a server optimizer (FedOpt, Reddi et al. 2021): each sampled client
starts from the global parameters, runs ``local_steps`` SGD steps on its own batches, and
uploads its change; the server averages the changes (weighted by client examples) and applies
them as a gradient with SGD or Adam. With one local step and local lr 1 this is the
reference's FedSGD baseline with a server Adam.

``fedadapter`` is FedAdapter (Cai et al., MobiCom'22) with a *fixed* progressive schedule instead of
the paper's trial groups of clients: bottleneck adapters on the top ``depth`` layers, ``width``
wide, growing in equal stages over the rounds (``fedadapter_schedule``). An upgrade keeps every
trained value and adds new ones that leave the model's function unchanged (``grow``); the
server Adam restarts then (zero moments for every value: the new values would otherwise share the
old ones' step count and skip Adam's bias correction). Uploads count the current stage's values.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fwdllm.baseline_model import EncodedExamples, TrainableModel, grow
from fwdllm.baseline_report import write_report
from fwdllm.data.partition import DEFAULT_ALPHA, FederatedData, open_federated
from fwdllm.errors import UserError
from fwdllm.proto.manifest import save_theta
from fwdllm.proto.names import Task

PEFTS = ("head", "bitfit", "adapter", "fedadapter", "lora", "full")
#: Server learning rates (Adam) that reach the calibration accuracies on BBC in a few rounds.
DEFAULT_LR = {"head": 1e-2, "bitfit": 1e-3, "adapter": 1e-3, "fedadapter": 1e-3, "lora": 1e-3, "full": 5e-5}
METRICS_FILE = "metrics.jsonl"
THETA_FILE = "theta.safetensors"  # the final θ, named as in a bundle (full fine-tuning: the head only)


@dataclass
class BaselineConfig:
    data: str
    peft: str = "bitfit"
    model: str = "minilm"
    trainable_layers: str = "all"  # layers the PEFT method adapts: all | top:K (as `fwdllm export`)
    clients: int = 100
    per_step: int = 10
    steps: int = 50
    alpha: float | None = DEFAULT_ALPHA  # None: IID
    batch_size: int = 8
    seq_len: int = 64
    local_steps: int = 1
    local_lr: float = 1.0
    optimizer: str = "adam"  # the server's: adam | sgd
    lr: float | None = None  # server lr; None: DEFAULT_LR[peft]
    eval_every: int = 5
    eval_limit: int | None = None  # held-out examples evaluated (None: all)
    seed: int = 0
    threads: int = 1

    def check(self) -> None:
        if self.peft not in PEFTS:
            raise UserError(f"--peft {self.peft!r} is not one of {', '.join(PEFTS)}")
        if self.optimizer not in ("adam", "sgd"):
            raise UserError(f"--optimizer {self.optimizer!r} is not adam or sgd")
        if not 1 <= self.per_step <= self.clients:
            raise UserError(f"--per-step must lie in 1..--clients ({self.clients}), got {self.per_step}")
        if self.peft == "fedadapter" and self.trainable_layers != "all":
            raise UserError(
                "--trainable-layers: fedadapter chooses its own depth (a growing schedule); leave it at all"
            )
        for name in ("steps", "batch_size", "seq_len", "local_steps", "eval_every", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def evaluate(
    model: TrainableModel, data: EncodedExamples, frozen: dict[int, torch.Tensor], batch_size: int = 32
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``data``.

    ``frozen`` (batch start -> hidden states) is kept between evaluations where the model has a frozen prefix: a
    decoder's frozen layers are most of its cost, and their output on the held-out batches never changes, so it is
    computed at the first evaluation and every later one runs only the layers above (the exporter's prefix and
    suffix, which compute what ``full`` does). Training runs the whole model, as a device would; classifiers also
    evaluate it whole each time, as their recorded numbers were measured.
    """
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            ids, mask, labels = data.batch(np.arange(start, min(start + batch_size, len(data))))
            hidden = None
            if model.frozen_prefix:
                if start not in frozen:
                    frozen[start] = model.pm.prefix(ids, mask)
                hidden = frozen[start]
            loss, logits = model.loss_logits(ids, mask, labels, hidden)
            total_loss += float(loss) * len(labels)
            correct += int((logits.argmax(-1) == labels).sum())
    return total_loss / len(data), correct / len(data)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_baseline(cfg: BaselineConfig, out: Path, fed: FederatedData | None = None, progress: bool = True) -> list[dict]:
    """Train, writing one JSON line per evaluation to ``out/metrics.jsonl``, then ``theta.safetensors``,
    ``report.md`` and ``convergence.png``; returns the records."""
    cfg.check()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    fed = fed or open_federated(cfg.data, cfg.clients, alpha=cfg.alpha, seed=cfg.seed)
    label_words = fed.task == Task.CAUSAL_LM and bool(fed.labels)
    if fed.task != Task.SEQ_CLS and not label_words:
        raise UserError(
            f"the backprop baselines train classifiers (or decoders answering with label words, such as "
            f"bbc-lm); {cfg.data} is a {fed.task} data set without labels"
        )
    model = TrainableModel(
        cfg.model,
        cfg.peft,
        fed.labels,
        cfg.seed,
        task=fed.task,
        trainable_layers=cfg.trainable_layers,
        label_words=label_words,
    )
    clients = [EncodedExamples(model, c, fed.labels, cfg.seq_len) for c in fed.clients]
    heldout_examples = fed.heldout[: cfg.eval_limit] if cfg.eval_limit else fed.heldout
    heldout = EncodedExamples(model, heldout_examples, fed.labels, cfg.seq_len)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.peft]
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    server_opt = opt_cls(model.params, lr=lr)
    rng = np.random.default_rng(cfg.seed)
    cursors = [0] * len(clients)  # each client walks its own shuffled examples
    orders = [rng.permutation(len(c)) for c in clients]

    out.mkdir(parents=True, exist_ok=True)
    config = {
        **asdict(cfg),
        "lr": lr,
        "num_trainable": model.num_trainable,
        "heldout_examples": len(heldout),
        "label_words": fed.labels if label_words else None,
        **({"stages": model.schedule} if model.stage else {}),
        "partition": {k: v for k, v in fed.info.items() if k != "clients"},
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    records: list[dict] = []
    device_seconds, bytes_up, t0 = 0.0, 0, time.perf_counter()

    frozen: dict[int, torch.Tensor] = {}

    def record(step: int, train_loss: float | None) -> None:
        loss, acc = evaluate(model, heldout, frozen)
        rec = {
            "step": step,
            "heldout_loss": loss,
            "heldout_accuracy": acc,
            "train_loss": train_loss,
            "device_seconds": device_seconds,
            "bytes_up": bytes_up,
            "peak_rss_mib": peak_rss_mib(),
            "wall_seconds": time.perf_counter() - t0,
            **model.stage,
        }
        records.append(rec)
        with open(out / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")

    (out / METRICS_FILE).unlink(missing_ok=True)
    bar = tqdm(total=cfg.steps, desc=f"baseline {cfg.peft}", unit="step", disable=not progress)
    record(0, None)
    for step in range(1, cfg.steps + 1):
        if model.stage:  # fedadapter: equal stages over the rounds
            stage = model.schedule[(step - 1) * len(model.schedule) // cfg.steps]
            if stage != (model.stage["depth"], model.stage["width"]):
                model = grow(model, cfg.model, fed.labels, cfg.seed, stage)
                server_opt = opt_cls(model.params, lr=lr)
        start = model.state()
        chosen = np.sort(rng.choice(len(clients), cfg.per_step, replace=False))
        delta_sum = [torch.zeros_like(v) for v in start]
        weight_sum, losses = 0, []
        for c in chosen:
            model.load(start)
            tic = time.perf_counter()
            for _ in range(cfg.local_steps):
                rows = orders[c][np.arange(cursors[c], cursors[c] + cfg.batch_size) % len(clients[c])]
                cursors[c] = (cursors[c] + cfg.batch_size) % len(clients[c])
                loss, _ = model.loss_logits(*clients[c].batch(rows))
                grads = torch.autograd.grad(loss, model.params)
                with torch.no_grad():
                    for p, g in zip(model.params, grads):
                        p.sub_(cfg.local_lr * g)
                losses.append(float(loss.detach()))
            device_seconds += time.perf_counter() - tic
            bytes_up += model.num_trainable * 4
            n = len(clients[c])
            for acc, p, s in zip(delta_sum, model.params, start):
                acc.add_(s - p.detach(), alpha=n)
            weight_sum += n
        model.load(start)
        server_opt.zero_grad()
        for p, d in zip(model.params, delta_sum):
            p.grad = d / weight_sum
        server_opt.step()
        if not all(torch.isfinite(p).all() for p in model.params):
            bar.close()
            raise UserError(f"training diverged at step {step} (non-finite parameters); lower --lr (now {lr})")
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record(step, float(np.mean(losses)))
    bar.close()
    save_theta(out / THETA_FILE, model.layout, model.theta.detach()[0].numpy())
    write_report(out, config, records)
    return records


def summarize(records: list[dict], cfg: BaselineConfig) -> str:
    last = records[-1]
    return (
        f"{cfg.peft} on {cfg.data}: held-out accuracy "
        f"{records[0]['heldout_accuracy']:.3f} → {last['heldout_accuracy']:.3f} "
        f"(loss {records[0]['heldout_loss']:.3f} → {last['heldout_loss']:.3f}) after {last['step']} steps; "
        f"device compute {last['device_seconds']:.1f} s, uploaded {last['bytes_up'] / 2**20:.1f} MiB, "
        f"peak RSS {last['peak_rss_mib']:.0f} MiB"
    )
