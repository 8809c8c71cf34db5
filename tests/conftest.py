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
    """One set of valid files (tiny model, clip, latents) for every test that mutates or reads them: made once
    per session. Tests must not modify these files; copy them first."""
    import fuzzcases

    return fuzzcases.Corpus(tmp_path_factory.mktemp("corpus"))
