"""The README's Python API example, run as written (in a scratch folder), with its results checked."""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_safetensors

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**Python API**") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_and_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    printed = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(_readme_example(), "README.md (Python API)", "exec"), scope)
    result = scope["result"]
    before, after = (float(x) for x in printed.getvalue().splitlines()[0].split(" -> "))
    assert after > before  # the trained head beats the zero one
    from fwdllm.proto.manifest import load_manifest, load_theta

    saved = tmp_path / "runs" / "api-bbc" / "theta.safetensors"
    manifest = load_manifest(tmp_path / "bundles" / "api-bbc")
    assert np.array_equal(manifest.theta.flatten(load_safetensors(saved)), result.theta)
    assert not np.array_equal(load_theta(tmp_path / "bundles" / "api-bbc", manifest), result.theta)


def test_import_fwdllm_stays_light():
    """A phone imports fwdllm without torch or transformers; the API functions load on first use."""
    code = (
        "import sys, fwdllm; fwdllm.load_dataset; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.strip() == "[]"
