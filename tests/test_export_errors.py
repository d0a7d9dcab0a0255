"""Bad input to `fwdllm export`: each is a UserError naming the fix, and no bundle (or partial folder) is left."""

from __future__ import annotations

import json
import shutil

import pytest
from export_helpers import MINILM, tiny_checkpoint

from fwdllm.proto.names import Task

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return tiny_checkpoint("bert", tmp_path_factory.mktemp("tiny-bert"))


def _fails(capsys, tmp_path, *argv) -> str:
    """Run the CLI; assert exit code 2, no traceback, nothing left in tmp_path/out's folder."""
    from fwdllm.cli import main

    out = tmp_path / "out" / "bundle"
    assert main(["export", "--task", "seq-cls", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fwdllm export: error:" in err
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return err


def test_unknown_architecture(capsys, tmp_path, tiny_bert):
    d = tmp_path / "gpt2"
    shutil.copytree(tiny_bert, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    err = _fails(capsys, tmp_path, "--model", str(d), "--labels", "2")
    assert "'gpt2' is not supported" in err and "bert" in err


def test_missing_weights(capsys, tmp_path, tiny_bert):
    d = tmp_path / "noweights"
    d.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_bert / f, d / f)
    assert "has no weights" in _fails(capsys, tmp_path, "--model", str(d), "--labels", "2")


def test_missing_tokenizer(capsys, tmp_path, tiny_bert):
    d = tmp_path / "notok"
    shutil.copytree(tiny_bert, d)
    (d / "tokenizer.json").unlink()
    assert "save_pretrained" in _fails(capsys, tmp_path, "--model", str(d), "--labels", "2")


def test_missing_model_folder(capsys, tmp_path):
    assert "minilm" in _fails(capsys, tmp_path, "--model", str(tmp_path / "nope"), "--labels", "2")


def test_lora_targets_that_match_nothing(capsys, tmp_path, tiny_bert):
    err = _fails(
        capsys, tmp_path, "--model", str(tiny_bert), "--labels", "2", "--peft", "lora", "--lora-targets", "q_proj"
    )
    assert "match no Linear" in err and "query" in err


@pytest.mark.parametrize("labels", [["--labels", "1"], ["--label-names", "only"], []])
def test_fewer_than_two_labels(capsys, tmp_path, tiny_bert, labels):
    assert "--labels N (N >= 2)" in _fails(capsys, tmp_path, "--model", str(tiny_bert), *labels)


def test_sequence_length_above_the_model(capsys, tmp_path, tiny_bert):
    err = _fails(capsys, tmp_path, "--model", str(tiny_bert), "--labels", "2", "--seq-len", "4096")
    assert "--seq-len 512 or less" in err


def test_bad_trainable_layers(capsys, tmp_path, tiny_bert):
    assert "1..3" in _fails(capsys, tmp_path, "--model", str(tiny_bert), "--labels", "2", "--trainable-layers", "top:9")


def test_failure_midway_leaves_no_bundle(tmp_path, tiny_bert, monkeypatch):
    """A crash after graphs were written removes the partial folder; --out never appears."""
    from fwdllm.export import onnx_graphs
    from fwdllm.export.pipeline import ExportRequest, export

    def broken(*a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_graphs, "quantize_int8", broken)
    out = tmp_path / "b"
    with pytest.raises(RuntimeError):
        export(
            ExportRequest(model=str(tiny_bert), task=Task.SEQ_CLS, out=out, num_labels=2, precisions=["fp32", "int8"])
        )
    assert list(tmp_path.iterdir()) == []


def test_validation_failure_leaves_no_bundle(tmp_path, tiny_bert, monkeypatch):
    """A graph that disagrees with PyTorch fails the export (here: ONNX run perturbed by hand)."""
    from fwdllm.export import onnx_graphs
    from fwdllm.export.pipeline import ExportRequest, ValidationError, export

    real_run = onnx_graphs.run
    monkeypatch.setattr(onnx_graphs, "run", lambda path, feeds: {k: v + 1e-2 for k, v in real_run(path, feeds).items()})
    with pytest.raises(ValidationError, match="beyond the tolerance"):
        export(ExportRequest(model=str(tiny_bert), task=Task.SEQ_CLS, out=tmp_path / "b", num_labels=2))
    assert list(tmp_path.iterdir()) == []


def test_existing_out_is_not_overwritten(capsys, tmp_path):
    out = tmp_path / "out" / "bundle"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("x")
    from fwdllm.cli import main

    assert main(["export", "--model", str(MINILM), "--task", "seq-cls", "--labels", "2", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()


def test_task_that_does_not_fit_the_architecture(capsys, tmp_path, tiny_bert):
    from fwdllm.cli import main

    assert main(["export", "--model", str(tiny_bert), "--task", "causal-lm", "--out", str(tmp_path / "b")]) == 2
    assert "use --task seq-cls" in capsys.readouterr().err
