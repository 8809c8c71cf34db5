import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The valid files (tiny model, clip, latents) that fuzz and hardening tests read or mutate copies of: made
    once per session, so no test may write to them in place."""
    import fuzzcases

    return fuzzcases.Corpus(tmp_path_factory.mktemp("corpus"))
