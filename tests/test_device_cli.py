"""`fwdllm device info`, `fwdllm device run` errors and `fwdllm bench` on the stand-in bundle."""

from __future__ import annotations

import json

from device_standin import shared_bundle, write_jsonl

from fwdllm.cli import main


def test_device_info_lists_backends_and_what_a_bundle_uses(capsys):
    bundle = shared_bundle()[0]
    capsys.readouterr()  # building the stand-in prints converter progress
    assert main(["device", "info", "--json", "--bundle", str(bundle)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "cpu" in report["backends"]["onnxruntime"]["providers"] and report["cpu_count"] >= 1
    assert report["bundle"]["onnxruntime"]["providers"] == ["CPUExecutionProvider"]
    assert report["bundle"]["litert"]["delegates"] == ["XNNPACK"]
    assert "gguf" in report["bundle"]["llama.cpp"]["unavailable"]  # the stand-in has no GGUF graph


def test_device_run_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine", "label": "no-such-label"}])
    rc = main(
        ["device", "run", "--coordinator", "127.0.0.1:1", "--bundle", str(shared_bundle()[0]), "--data", str(data)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "unknown label 'no-such-label'" in err and "Traceback" not in err
    rc = main(["device", "run", "--coordinator", "127.0.0.1:1", "--bundle", str(tmp_path), "--data", str(data)])
    assert rc == 2 and "fwdllm export" in capsys.readouterr().err


def test_bench_writes_table_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = main(
        [
            "bench",
            "--bundle",
            str(shared_bundle()[0]),
            "--backend",
            "onnxruntime",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--seeds",
            "4",
            "--no-backprop",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ]
    )
    assert rc == 0
    result = json.loads(out_json.read_text())
    rows = result["configurations"]
    assert [r["options"]["prefix_reuse"] for r in rows] == [True, False]
    for row in rows:
        assert "error" not in row, row
        assert row["inference_avg_ms"] > 0 and row["perturbed_eval_ms"] > 0 and row["peak_rss_mb"] > 0
        assert row["perturbations_per_s"] > 0 and row["rss_vs_plain"] > 0
    assert result["prefix_reuse_ratios"][0]["speedup"] > 0
    assert "Inference (avg) ms" in out_md.read_text() and "prefix reuse" in capsys.readouterr().out
