"""Shared test setup: never reach a model hub; keep torch to the machine's cores."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest


@pytest.fixture(scope="session")
def reasoner_dir(tmp_path_factory):
    """A tiny toy reasoner, trained from scratch for a few seconds: reliable on short sums, not on long ones.

    Built in a fresh directory for the session (never a developer's cache), so CI sees a cold build.
    """
    from trl_hsstar.toy.world import toy_reasoner_path

    return toy_reasoner_path(cache_dir=tmp_path_factory.mktemp("toy-cache"))
