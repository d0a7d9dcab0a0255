"""What a careless or hostile file cannot do: each is one line of error, never a traceback or an absurd allocation.

Bundles: a real MiniLM export is copied per test and its manifest edited the way a hand edit, a truncated
copy or an attacker would; ``load_manifest``, ``fwdllm inspect`` and ``fwdllm coordinator serve`` must each
refuse it with the same one-line BundleError, with the peak memory of the command that of a run on a good
bundle. Data: example files with a latin-1 byte must be refused naming the file and line by every reader.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from fwdllm.cli import main
from fwdllm.data.datasets import DataError as DataSetError
from fwdllm.data.datasets import load_dataset
from fwdllm.device_runtime.examples import DataError, load_examples
from fwdllm.proto.manifest import BundleError, Manifest, ModelInfo, PeftInfo, ThetaLayout, load_manifest, sha256_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SLACK_KB = 32 << 10  # peak RSS a refused bundle may add over the same command on a good one


def fwdllm(*args: str) -> tuple[int, str, int]:
    """Run the fwdllm command in its own process: (exit code, stderr, that process's peak RSS in KiB)."""
    with open(os.devnull, "w") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fwdllm.cli", *args], stdout=out, stderr=err, env=ENV)
        killer = threading.Timer(300, proc.kill)  # a command that does not refuse its input would serve forever
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read(), usage.ru_maxrss


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real bundle, and the peak RSS of `inspect` and of `coordinator serve` start-up on it."""
    root = tmp_path_factory.mktemp("hostile")
    bundle = root / "bundle"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fwdllm.cli",
            "export",
            "--model",
            "minilm",
            "--task",
            "seq-cls",
            "--labels",
            "2",
            "--peft",
            "head",
            "--trainable-layers",
            "head",
            "--format",
            "onnx",
            "--out",
            str(bundle),
        ],
        check=True,
        capture_output=True,
        env=ENV,
    )
    rc, err, inspect_kb = fwdllm("inspect", str(bundle))
    assert rc == 0, err
    (root / "broken.toml").write_text("[run\n")  # serve imports everything, then stops at the config
    rc, err, serve_kb = fwdllm(
        "coordinator",
        "serve",
        "--bundle",
        str(bundle),
        "--state",
        str(root / "state"),
        "--port",
        "0",
        "--config",
        str(root / "broken.toml"),
    )
    assert rc == 2 and "not valid TOML" in err
    return bundle, {"inspect": inspect_kb, "serve": serve_kb}


def copy_bundle(source: Path, dest: Path) -> Path:
    """A copy to edit: graphs hard-linked (no test writes them), every other file copied."""
    dest.mkdir()
    for f in source.iterdir():
        (os.link if f.suffix == ".onnx" else shutil.copy2)(f, dest / f.name)
    return dest


def refingerprint(m: dict) -> None:
    """Sign an edited manifest as the exporter would, so that only the checks after the fingerprint can stop it."""
    m["fingerprint"] = Manifest(
        ModelInfo(**m["model"]),
        PeftInfo(**m["peft"]),
        ThetaLayout.from_json(m["theta"]["tensors"]),
        [],
        files=m["files"],
        theta_file=m["theta"]["file"],
    ).fingerprint()


def layout(m: dict, shapes: dict[str, list[int]]) -> None:
    """Replace θ's tensors by ``shapes``, with offsets, sizes and dim consistent with them."""
    tensors, offset = [], 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        tensors.append({"name": name, "shape": shape, "offset": offset, "size": size})
        offset += size
    m["theta"].update(tensors=tensors, dim=offset)


def field(path: tuple, value):
    def edit(m, b, src):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def drop_fingerprint(m, b, src):
    del m["fingerprint"]


def huge_layout(sign: bool):
    def edit(m, b, src):
        layout(m, {"classifier.weight": [400_000, 1_000_000]})  # 4e11 values: 1.46 TiB as float32
        if sign:
            refingerprint(m)
        else:
            drop_fingerprint(m, b, src)

    return edit


def huge_dim(m, b, src):
    layout(m, {"classifier.weight": [2, 1_000_000_000], "classifier.bias": [2]})
    refingerprint(m)


def absolute_graph(m, b, src):
    outside = str(src / "full.onnx")  # a valid graph, outside the bundle, with its true checksum
    m["files"][outside] = m["files"].pop("full.onnx")
    m["graphs"][0]["file"] = outside


def theta_outside(m, b, src):
    shutil.copy2(b / "theta.safetensors", b.parent / "outside.safetensors")
    m["files"]["../outside.safetensors"] = m["files"].pop("theta.safetensors")
    m["theta"]["file"] = "../outside.safetensors"
    refingerprint(m)


def unlisted_graph(m, b, src):
    del m["files"]["suffix.onnx"]


def symlink_out(m, b, src):
    (b / "tokenizer.json").unlink()
    (b / "tokenizer.json").symlink_to(src / "tokenizer.json")  # the same content, but out of the bundle


HOSTILE = {
    "a list": (lambda m, b, src: [], "manifest.json must hold a JSON object, not []"),
    "an empty object": (lambda m, b, src: {}, "manifest.json schema_version is missing"),
    "shape abc": (
        field(("theta", "tensors", 0, "shape"), "abc"),
        'theta.tensors[0].shape must be a list of positive ints, not "abc"',
    ),
    "negative dims": (
        field(("theta", "tensors", 0, "shape"), [-2, 384]),
        "theta.tensors[0].shape must be a list of positive ints, not [-2, 384]",
    ),
    "4e11 values without fingerprint": (huge_layout(sign=False), "manifest.json fingerprint is missing"),
    "4e11 values re-signed": (huge_layout(sign=True), "add up to 400,000,000,000 float32 values"),
    "huge dim, small theta file": (huge_dim, "add up to 2,000,000,002 float32 values"),
    "../ graph path": (
        field(("graphs", 0, "file"), "../../../etc/passwd"),
        'graphs[0].file is "../../../etc/passwd": bundle files are named relative',
    ),
    "absolute graph path": (absolute_graph, 'graphs[0].file is "/'),
    "theta file outside": (theta_outside, 'theta.file is "../outside.safetensors"'),
    "symlink out of the bundle": (symlink_out, "bundle file tokenizer.json is a symlink that leads out of"),
    "missing fingerprint": (drop_fingerprint, "manifest.json fingerprint is missing"),
    "unknown task": (field(("model", "task"), "token-cls"), 'model.task is "token-cls", not one of seq-cls, causal-lm'),
    "unknown role": (
        field(("graphs", 0, "role"), "middle"),
        'graphs[0].role is "middle", not one of full, prefix, suffix, base',
    ),
    "unknown format": (field(("graphs", 1, "format"), "pickle"), 'graphs[1].format is "pickle", not one of onnx'),
    "unknown precision": (
        field(("graphs", 2, "precision"), "fp8"),
        'graphs[2].precision is "fp8", not one of fp32, fp16, int8, f16, q8_0, q4_0',
    ),
    "unknown theta channel": (
        field(("graphs", 0, "theta_channel"), "telepathy"),
        'graphs[0].theta_channel is "telepathy", not one of input, lora-adapter, control-vector',
    ),
    "absurd sequence length": (field(("model", "max_seq_len"), 10**12), "model.max_seq_len must lie in 1.."),
    "graph without checksum": (unlisted_graph, 'files has no checksum of "suffix.onnx"'),
    "not UTF-8": (None, "is not valid JSON"),
}


@pytest.fixture(params=list(HOSTILE))
def hostile(request, exported, tmp_path):
    """(edited bundle, the message it must be refused with)."""
    source = exported[0]
    bundle = copy_bundle(source, tmp_path / "bundle")
    edit, message = HOSTILE[request.param]
    if edit is None:
        (bundle / "manifest.json").write_bytes(b'{"created": "caf\xe9"}')
    else:
        m = json.loads((bundle / "manifest.json").read_text())
        edited = edit(m, bundle, source)
        (bundle / "manifest.json").write_text(json.dumps(m if edited is None else edited))
    return bundle, message


def test_a_copy_of_the_bundle_loads(exported, tmp_path):
    bundle = copy_bundle(exported[0], tmp_path / "bundle")
    assert load_manifest(bundle).theta.dim == 770


def test_load_manifest_refuses_it_in_one_line(hostile):
    bundle, message = hostile
    for verify in (True, False):  # skipping checksums skips no schema, path or size check
        with pytest.raises(BundleError, match="^[^\n]*$") as info:
            load_manifest(bundle, verify_checksums=verify)
        assert message in str(info.value)


def test_inspect_and_serve_refuse_it_in_one_line(hostile, exported, tmp_path):
    bundle, message = hostile
    baseline = exported[1]
    for command, args in (
        ("inspect", ["inspect", str(bundle)]),
        ("serve", ["coordinator", "serve", "--bundle", str(bundle), "--state", str(tmp_path / "s"), "--port", "0"]),
    ):
        rc, err, peak_kb = fwdllm(*args)
        assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert message in err
        assert peak_kb < baseline[command] + SLACK_KB, f"{command} peaked at {peak_kb >> 10} MiB"


def test_an_edited_manifest_is_still_caught_by_its_fingerprint(exported, tmp_path):
    bundle = copy_bundle(exported[0], tmp_path / "bundle")
    m = json.loads((bundle / "manifest.json").read_text())
    m["model"]["labels"] = ["spam", "ham"]
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="edited by hand"):
        load_manifest(bundle, verify_checksums=False)


def test_checksums_catch_what_the_schema_cannot(exported, tmp_path):
    """A well-formed graph entry added by hand passes the cheap checks; hashing its file refuses it."""
    bundle = copy_bundle(exported[0], tmp_path / "bundle")
    m = json.loads((bundle / "manifest.json").read_text())
    m["graphs"].append({**m["graphs"][0], "precision": "int8", "file": "full.int8.onnx"})
    m["files"]["full.int8.onnx"] = sha256_file(bundle / "suffix.onnx")  # a real checksum, of another file
    (bundle / "full.int8.onnx").write_bytes(b"not a graph")
    (bundle / "manifest.json").write_text(json.dumps(m))
    load_manifest(bundle, verify_checksums=False)  # well-formed: only hashing can tell
    with pytest.raises(BundleError, match="full.int8.onnx is corrupt or truncated"):
        load_manifest(bundle)


def test_inspect_shows_free_form_records_it_cannot_format(exported, tmp_path, capsys):
    """Validation and delegation records are outside the fingerprint, so an edit there still loads."""
    bundle = copy_bundle(exported[0], tmp_path / "bundle")
    m = json.loads((bundle / "manifest.json").read_text())
    m["graphs"][0].update(validation={"max_rel_err": "tiny"}, delegation={"xnnpack": 3, "builtin": "all of them"})
    (bundle / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(bundle)]) == 0
    assert "XNNPACK takes 3 of ? ops" in capsys.readouterr().out


# ----- example files that are not UTF-8 ---------------------------------------------------------

LATIN1 = b'{"text": "fine", "label": 0}\n{"text": "caf\xe9", "label": 1}\n'
NOT_UTF8 = "not UTF-8; re-encode the file as UTF-8"


def one_line_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_device_examples(exported, tmp_path, capsys):
    data = tmp_path / "client.jsonl"
    data.write_bytes(LATIN1)
    with pytest.raises(DataError, match="^" + re.escape(f"{data}:2: {NOT_UTF8}")):
        load_examples(data, load_manifest(exported[0], verify_checksums=False))
    err = one_line_error(
        capsys, ["device", "run", "--coordinator", "127.0.0.1:1", "--bundle", str(exported[0]), "--data", str(data)]
    )
    assert f"{data}:2: {NOT_UTF8}" in err


def test_coordinator_eval_data(exported, tmp_path):
    data, config = tmp_path / "heldout.jsonl", tmp_path / "c.json"
    data.write_bytes(LATIN1)
    config.write_text(json.dumps({"eval": {"every": 1, "data": str(data)}}))
    rc, err, _ = fwdllm(
        "coordinator",
        "serve",
        "--bundle",
        str(exported[0]),
        "--state",
        str(tmp_path / "s"),
        "--port",
        "0",
        "--config",
        str(config),
    )
    assert rc == 2 and len(err.splitlines()) == 1 and f"{data}:2: {NOT_UTF8}" in err, err


@pytest.mark.parametrize(
    "spec,content",
    [
        ("jsonl", LATIN1),
        ("csv", b"text,label\ncaf\xe9,b\nfine,a\n"),
        ("tsv", b"text\tlabel\ncaf\xe9\tb\nfine\ta\n"),
        ("agnews", b'"1","fine","title"\n"2","caf\xe9","title"\n'),
        ("squad", b'{"data": [\n{"title": "caf\xe9"}]}\n'),
    ],
)
def test_data_set_loaders(tmp_path, spec, content):
    file = tmp_path / f"data.{spec}"
    file.write_bytes(content)
    with pytest.raises(DataSetError, match="^" + re.escape(f"{file}:2: {NOT_UTF8}")):
        load_dataset(f"{spec}:{file}")


def test_data_partition_and_partition_folders(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(LATIN1)
    err = one_line_error(
        capsys,
        ["data", "partition", "--data", f"jsonl:{data}", "--clients", "1", "--iid", "--out", str(tmp_path / "p")],
    )
    assert f"{data}:2: {NOT_UTF8}" in err
    data.write_text('{"text": "fine", "label": "a"}\n{"text": "cafe", "label": "b"}\n' * 5)
    assert (
        main(["data", "partition", "--data", f"jsonl:{data}", "--clients", "2", "--iid", "--out", str(tmp_path / "p")])
        == 0
    )
    client = tmp_path / "p" / "client-00001.jsonl"
    client.write_bytes(client.read_bytes() + b'{"text": "caf\xe9", "label": "b"}\n')
    err = one_line_error(capsys, ["data", "show", str(tmp_path / "p")])
    assert f"{client}:{len(client.read_bytes().splitlines())}: {NOT_UTF8}" in err
