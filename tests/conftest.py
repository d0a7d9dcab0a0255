"""Shared test set-up: tests import the independent reference implementations beside them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from export_helpers import export_head_bundle  # noqa: E402


@pytest.fixture(scope="session")
def minilm_head_bundle(tmp_path_factory) -> Path:
    """MiniLM-L6 with a new head for BBC's topics, exported once per test session."""
    return export_head_bundle(tmp_path_factory.mktemp("minilm-head") / "bundle", "minilm")
