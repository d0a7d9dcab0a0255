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

from fwdllm.baseline_report import write_report
from fwdllm.data.partition import DEFAULT_ALPHA, FederatedData, open_federated
from fwdllm.errors import UserError
from fwdllm.proto.manifest import save_theta
from fwdllm.proto.names import Task

PEFTS = ("head", "bitfit", "adapter", "fedadapter", "lora", "full")
#: Server learning rates (Adam) that reach the calibration accuracies on BBC in a few rounds.
DEFAULT_LR = {"head": 1e-2, "bitfit": 1e-3, "adapter": 1e-3, "fedadapter": 1e-3, "lora": 1e-3, "full": 5e-5}
FEDADAPTER_WIDTHS = (8, 16, 32)  # bottleneck sizes of the stages; depths are 1/3, 2/3 and all of the layers
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


class TrainableModel:
    """The exporter's perturbable model with θ (and, for full fine-tuning, every weight) trainable."""

    def __init__(
        self,
        model: str,
        peft: str,
        labels: list[str],
        seed: int,
        stage: tuple[int, int] | None = None,
        task: str = Task.SEQ_CLS,
        trainable_layers: str = "all",
        label_words: bool = False,
    ):
        """``stage``: fedadapter's (depth, width); None = the schedule's first stage. ``task`` causal-lm: a decoder
        trained on next tokens (labels unused), as bench/memory.py measures it, or with ``label_words`` on
        ``labels`` as the words it answers with."""
        from fwdllm.export import models
        from fwdllm.export.archs import spec_for
        from fwdllm.export.perturbable import PerturbableModel
        from fwdllm.export.pipeline import label_word_ids
        from fwdllm.export.plan import PeftOptions, build_plan

        loaded = models.load(model, task)
        self.task, self.label_words = task, label_words
        word_ids = label_word_ids(loaded.tokenizer_file, labels) if label_words else None
        # full fine-tuning keeps the smallest θ beside every weight: the head, or a decoder's (zero) BitFit biases
        full = "head" if task == Task.SEQ_CLS else "bitfit"
        options = PeftOptions(
            method={"full": full, "fedadapter": "adapter"}.get(peft, peft), trainable_layers=trainable_layers, seed=seed
        )
        self.stage: dict[str, int] = {}  # fedadapter: the depth and width of this model's adapters
        if peft == "fedadapter":
            spec = spec_for(loaded.model.config.model_type)
            self.schedule = fedadapter_schedule(spec.num_layers(loaded.model))
            depth, width = stage or self.schedule[0]
            hidden = spec.hidden_size(loaded.model.config)
            if hidden % width:
                raise UserError(
                    f"fedadapter width {width} does not divide the hidden size {hidden}; use a divisor of {hidden}"
                )
            options.trainable_layers, options.adapter_reduction = f"top:{depth}", hidden // width
            self.stage = {"depth": depth, "width": width}
        plan = build_plan(loaded.model, task, len(labels) if task == Task.SEQ_CLS else None, options, word_ids)
        self.pm = PerturbableModel(loaded.model, plan)
        self.layout = plan.layout
        self.theta = torch.nn.Parameter(plan.theta0().unsqueeze(0))
        self.params = [self.theta]
        if peft == "full":  # every weight the stages run (an unused pooler stays out: it would upload zeros)
            stages = plan.spec.stage_modules(self.pm.model)
            weights = {id(p): p for roots in stages for root in roots for p in root.parameters()}
            for p in weights.values():
                p.requires_grad_(True)
            self.params += list(weights.values())
        self.num_trainable = sum(p.numel() for p in self.params)
        # the layers below the first trainable one stay as loaded (not with full fine-tuning, nor as fedadapter grows)
        self.frozen_prefix = label_words and peft not in ("full", "fedadapter") and plan.cut_layer is not None
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(loaded.tokenizer_file.parent))
        self._prompts = _PromptEncoder(loaded, plan, options, labels, word_ids) if label_words else None

    def encode(self, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts, or with label words their prompts, as ``seq_len`` token ids and mask (right padding)."""
        if self._prompts is not None:
            return self._prompts(texts, seq_len)
        enc = self.tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def loss_logits(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden``: what the frozen layers give for ``ids`` (``self.pm.prefix``); only the layers above then run."""
        if hidden is None:
            out = self.pm.full(ids, mask, labels, self.theta)  # (loss, logits); causal-lm: (loss,)
        else:
            out = self.pm.suffix(hidden, mask, labels, self.theta)
        return out[0][0], (out[1][0] if len(out) > 1 else None)

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def load(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)


def fedadapter_schedule(num_layers: int) -> list[tuple[int, int]]:
    """FedAdapter's (depth, width) per stage: adapters on the top third, two thirds, then all layers."""
    n = len(FEDADAPTER_WIDTHS)
    return [(max(1, round(num_layers * (i + 1) / n)), width) for i, width in enumerate(FEDADAPTER_WIDTHS)]


def grow(old: TrainableModel, model: str, labels: list[str], seed: int, stage: tuple[int, int]) -> TrainableModel:
    """The fedadapter model of ``stage``, computing the same function as ``old``.

    Each tensor of ``old`` fills the leading corner of its new tensor: a wider adapter keeps its down
    rows and up columns, its extra down rows start as the adapter method initialises them and its
    extra up columns at zero; a newly adapted layer has up = 0; the head is kept. So the extra
    values change nothing until they are trained.
    """
    new = TrainableModel(model, "fedadapter", labels, seed, stage, task=old.task, label_words=old.label_words)
    values = new.layout.split(new.theta.detach()[0].numpy().copy())
    for name, value in old.layout.split(old.theta.detach()[0].numpy()).items():
        values[name][tuple(slice(0, n) for n in value.shape)] = value
    new.load([torch.from_numpy(new.layout.flatten(values)).unsqueeze(0)])
    return new


class _PromptEncoder:
    """Label-word prompts encoded by the devices' tokenizer (``fwdllm.device_runtime.backend.Tokenizer``) from the
    model info an export writes: right padding, and truncation that cuts a long prompt's start, keeping the end where
    the answer is scored. Sharing the code, not copying it, keeps a baseline's token ids equal to a device's."""

    def __init__(self, loaded, plan, options, labels: list[str], word_ids: list[int]):
        from fwdllm.proto.manifest import ModelInfo, PeftInfo

        self.info = ModelInfo(
            source=loaded.source,
            architecture=plan.spec.name,
            task=Task.CAUSAL_LM,
            max_seq_len=0,
            tokenizer=loaded.tokenizer_file.name,
            num_labels=len(labels),
            labels=list(labels),
            pad_token_id=getattr(loaded.config, "pad_token_id", None),
            label_token_ids=list(word_ids),
        )
        self.peft = PeftInfo(method=options.method, trainable_layers=options.trainable_layers, config=options.config())
        self.folder, self.layout = loaded.tokenizer_file.parent, plan.layout
        self.tokenizers = {}  # seq_len -> Tokenizer (each reads tokenizer.json once)

    def __call__(self, prompts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        from dataclasses import replace

        from fwdllm.device_runtime.backend import Example, Tokenizer
        from fwdllm.proto.manifest import Manifest

        if seq_len not in self.tokenizers:  # the manifest of a bundle exported with --seq-len seq_len, less its graphs
            manifest = Manifest(
                model=replace(self.info, max_seq_len=seq_len), peft=self.peft, theta=self.layout, graphs=[]
            )
            self.tokenizers[seq_len] = Tokenizer(self.folder, manifest)
        batch = self.tokenizers[seq_len].batch([Example(prompt=p) for p in prompts])
        return torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)


class _Encoded:
    """Token ids of a list of examples, encoded once.

    Label-word batches are cut to their longest row, as devices with a dynamic sequence axis feed them: a
    decoder's right padding changes nothing before it, and the prompts are much shorter than ``seq_len``.
    """

    def __init__(self, model: TrainableModel, examples: list[dict], labels: list[str], seq_len: int):
        key = "prompt" if model.label_words else "text"
        self.ids, self.mask = model.encode([e[key] for e in examples], seq_len)
        self.trim = model.label_words
        index = {name: i for i, name in enumerate(labels)}
        self.labels = torch.tensor([index[e["label"]] for e in examples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray):
        rows = torch.as_tensor(rows)
        ids, mask = self.ids[rows], self.mask[rows]
        if self.trim:
            width = int(mask.sum(1).max())
            ids, mask = ids[:, :width], mask[:, :width]
        return ids, mask, self.labels[rows]


def evaluate(
    model: TrainableModel, data: _Encoded, frozen: dict[int, torch.Tensor], batch_size: int = 32
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
    clients = [_Encoded(model, c, fed.labels, cfg.seq_len) for c in fed.clients]
    heldout_examples = fed.heldout[: cfg.eval_limit] if cfg.eval_limit else fed.heldout
    heldout = _Encoded(model, heldout_examples, fed.labels, cfg.seq_len)
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
