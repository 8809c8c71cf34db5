import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


os.environ["VAECLI_CPU_BF16"] = "0"  # default decodes in fp32 on every machine (the exact tests' reference);
# tests of the bf16 default set it themselves (tests/test_precision.py)


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`, the README's command) each worker computes on one thread, and so do the
    subprocesses it starts: two workers with two threads each on two cores spin against each other and the tiny
    tensors of these tests run several times slower (measured: the streaming tiles test 17 s alone, 237 s so)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


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
