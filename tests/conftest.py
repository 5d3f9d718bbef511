"""Fixtures of the tests; the helpers they use are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_image_tree


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """3 classes, 4 train and 2 val JPEGs each."""
    return write_image_tree(tmp_path / "imagenet")
