"""Shared test set-up: tests import the independent reference implementations beside them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
