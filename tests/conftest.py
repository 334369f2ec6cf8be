"""Shared test setup: never reach a model hub; keep torch to the machine's cores."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    """The session's own cache of world models (never a developer's), so CI sees every build cold."""
    return tmp_path_factory.mktemp("toy-cache")


@pytest.fixture(scope="session")
def reasoner_dir(world_cache):
    """The tiny toy reasoner: reliable on short sums, not on long ones. The package's shipped checkpoint, the same
    on every CPU; with ``TRL_HSSTAR_WORLD_SEED=N`` it is rebuilt from seed N into the session's cache instead, to
    show that no test depends on the shipped weights."""
    from trl_hsstar.toy.world import toy_reasoner_path

    return toy_reasoner_path(cache_dir=world_cache)
