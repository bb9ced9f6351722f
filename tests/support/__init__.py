"""Helpers shared by the unit and integration tests (not tests themselves)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root, wherever a test file sits below tests/
