"""Splitting a data set's training examples across federated clients, and the partition folder.

Three schemes (all seeded, all covering every training example exactly once):

* **IID**, equal sizes: a shuffled split.
* **Dirichlet over labels, equal sizes** (FwdLLM's ``niid_label``, the default): each client
  draws its label mix from Dirichlet(α · global label proportions) and takes its share from
  what is left of each label. Low α gives clients few labels each; large α approaches IID.
* **Dirichlet over labels, natural sizes** (the FedML/Hsu et al. "hetero" split): each label's
  examples are divided among clients by Dirichlet(α), so client sizes vary as well.

The folder a partition is written to is what devices are given: ``client-00000.jsonl`` …
(one example per line, ``{"text", "label"}`` with the label's name, or ``{"prompt",
"target"}``), ``heldout.jsonl``, and ``partition.json`` (written last) describing it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from fwdllm.data.datasets import DataError, Dataset, LoadOptions, label_ids, load_dataset
from fwdllm.data.textfiles import read_jsonl

DEFAULT_ALPHA = 0.5
SIZES = ("equal", "natural")
PARTITION_FILE = "partition.json"
HELDOUT_FILE = "heldout.jsonl"


def client_file(index: int) -> str:
    return f"client-{index:05d}.jsonl"


def partition_indices(
    labels: np.ndarray, num_labels: int, num_clients: int, *, alpha: float | None, seed: int, sizes: str = "equal"
) -> list[np.ndarray]:
    """Example indices per client. ``alpha=None`` means IID."""
    n = len(labels)
    if num_clients < 1:
        raise DataError(f"--clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise DataError(f"{num_clients} clients but only {n} training examples; use at most {n} clients")
    if sizes not in SIZES:
        raise DataError(f"--sizes must be one of {SIZES}, got {sizes!r}")
    if alpha is not None and not alpha > 0:
        raise DataError(f"--alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    if alpha is None:
        if sizes != "equal":
            raise DataError(
                "natural client sizes come from the per-label Dirichlet draw; use --alpha with --sizes natural"
            )
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if sizes == "equal":
        return _dirichlet_equal(labels, num_labels, num_clients, alpha, rng)
    return _dirichlet_natural(labels, num_labels, num_clients, alpha, rng)


def _dirichlet_equal(
    labels: np.ndarray, num_labels: int, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    pools = [rng.permutation(np.flatnonzero(labels == k)).tolist() for k in range(num_labels)]
    prior = np.array([len(p) for p in pools], dtype=np.float64) / len(labels)
    sizes = [len(part) for part in np.array_split(np.arange(len(labels)), num_clients)]
    parts = []
    for size in sizes:
        mix = rng.dirichlet(np.maximum(alpha * prior, 1e-12))
        counts = np.zeros(num_labels, dtype=np.int64)
        want = size
        while want:
            # Draw what is still missing from the client's mix, capped by what each label has left;
            # when the mix only covers exhausted labels, the labels left by their prior fill the rest.
            left = np.array([len(p) for p in pools]) - counts
            weights = mix * (left > 0)
            weights = weights if weights.sum() > 0 else prior * (left > 0)
            draw = np.minimum(rng.multinomial(want, weights / weights.sum()), left)
            counts += draw
            want -= int(draw.sum())
        parts.append(
            np.sort(np.array([pools[k].pop() for k, c in enumerate(counts) for _ in range(c)], dtype=np.int64))
        )
    return parts


def _dirichlet_natural(
    labels: np.ndarray,
    num_labels: int,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    tries: int = 100,
) -> list[np.ndarray]:
    for _ in range(tries):
        members: list[list[int]] = [[] for _ in range(num_clients)]
        for k in range(num_labels):
            idx = rng.permutation(np.flatnonzero(labels == k))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                members[client].extend(chunk.tolist())
        if min(len(m) for m in members) >= min_size:
            return [np.sort(np.array(m, dtype=np.int64)) for m in members]
    raise DataError(
        f"after {tries} draws some of the {num_clients} clients still had no examples with natural sizes at α={alpha}; "
        "use fewer clients, a larger --alpha, or --sizes equal"
    )


def label_skew(histograms: ArrayLike) -> float:
    """Mean total-variation distance between each client's label mix and the overall one (0 = IID, 1 = disjoint)."""
    histograms = np.asarray(histograms, dtype=np.float64)
    overall = histograms.sum(0) / histograms.sum()
    mixes = histograms / np.maximum(histograms.sum(1, keepdims=True), 1)
    return float(0.5 * np.abs(mixes - overall).sum(1).mean())


@dataclass
class FederatedData:
    """A data set spread over clients: what the simulator and the baselines train on."""

    spec: str
    task: str
    labels: list[str]
    clients: list[list[dict]]
    heldout: list[dict]
    info: dict  # what partition.json holds

    def label_ids(self, examples: list[dict]) -> np.ndarray:
        return label_ids(self.labels, examples)


def federate(
    data: Dataset, num_clients: int, *, alpha: float | None = DEFAULT_ALPHA, seed: int = 0, sizes: str = "equal"
) -> FederatedData:
    """Partition ``data.train`` over ``num_clients`` (``alpha=None``: IID)."""
    if not data.labels and alpha is not None:
        raise DataError(f"{data.spec} has no labels to skew; partition it with --iid")
    labels = data.label_ids(data.train) if data.labels else np.zeros(len(data.train), dtype=np.int64)
    parts = partition_indices(labels, max(len(data.labels), 1), num_clients, alpha=alpha, seed=seed, sizes=sizes)
    clients = [[data.train[j] for j in part] for part in parts]
    hist = (lambda xs: data.histogram(xs)) if data.labels else (lambda xs: {})
    info = {
        "dataset": data.spec,
        "task": data.task,
        "labels": data.labels,
        "num_clients": num_clients,
        "scheme": "iid" if alpha is None else "dirichlet",
        "alpha": alpha,
        "sizes": sizes,
        "seed": seed,
        "train_size": len(data.train),
        "label_skew": label_skew([list(hist(c).values()) for c in clients]) if data.labels else 0.0,
        "heldout": {"file": HELDOUT_FILE, "size": len(data.heldout), "histogram": hist(data.heldout)},
        "clients": [{"file": client_file(i), "size": len(c), "histogram": hist(c)} for i, c in enumerate(clients)],
    }
    return FederatedData(data.spec, data.task, data.labels, clients, data.heldout, info)


def write_partition(fed: FederatedData, out: Path) -> None:
    """Write the partition folder; partition.json goes last, so a folder with it is complete."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / PARTITION_FILE).exists():
        (out / PARTITION_FILE).unlink()  # the folder is not a partition while it is rewritten
    for stale in out.glob("client-*.jsonl"):
        stale.unlink()
    for meta, examples in zip(fed.info["clients"], fed.clients):
        _write_jsonl(out / meta["file"], examples)
    _write_jsonl(out / HELDOUT_FILE, fed.heldout)
    (out / PARTITION_FILE).write_text(json.dumps(fed.info, indent=1) + "\n")


def read_partition(folder: Path) -> FederatedData:
    """A partition folder written by `fwdllm data partition`, read back."""
    folder = Path(folder)
    file = folder / PARTITION_FILE
    if not file.exists():
        raise DataError(
            f"{folder} is not a partition folder (no {PARTITION_FILE}); write one with `fwdllm data partition`"
        )
    info = json.loads(file.read_text())
    clients = [read_examples(folder / c["file"]) for c in info["clients"]]
    return FederatedData(
        info["dataset"], info["task"], info["labels"], clients, read_examples(folder / HELDOUT_FILE), info
    )


def open_federated(
    data: str,
    num_clients: int,
    *,
    alpha: float | None = DEFAULT_ALPHA,
    seed: int = 0,
    sizes: str = "equal",
    options: LoadOptions | None = None,
) -> FederatedData:
    """``data`` is a partition folder (used as it is) or a data set spec (partitioned here)."""
    if (Path(data) / PARTITION_FILE).exists():
        fed = read_partition(Path(data))
        if len(fed.clients) != num_clients:
            raise DataError(
                f"partition {data} has {len(fed.clients)} clients, not {num_clients}; "
                f"pass --clients {len(fed.clients)} or partition it again"
            )
        return fed
    dataset = load_dataset(data, options)
    if not dataset.labels:  # open-ended targets: nothing to skew
        alpha = None
    return federate(dataset, num_clients, alpha=alpha, seed=seed, sizes=sizes)


def read_examples(file: Path) -> list[dict]:
    """The examples of one client file or the held-out file; a line that is not UTF-8 or JSON is a DataError."""
    if not Path(file).is_file():
        raise DataError(
            f"{file} is missing from its partition folder; write the partition again with `fwdllm data partition`"
        )
    return read_jsonl(Path(file))


def _write_jsonl(file: Path, examples: list[dict]) -> None:
    tmp = file.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for e in examples:
            fh.write(json.dumps(e, ensure_ascii=False) + "\n")
    tmp.replace(file)
