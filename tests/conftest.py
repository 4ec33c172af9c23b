import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_family  # noqa: E402

# keep the sha256 cache of lock files out of the user's home during tests
os.environ.setdefault("MERGE_CLI_CACHE_DIR", tempfile.mkdtemp(prefix="merge-cli-test-cache-"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """A tiny fp32 Llama base + 3 experts (expert2 sharded). Read-only: do not write into these folders."""
    return tiny_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory) -> dict[str, Path]:
    return tiny_family(tmp_path_factory.mktemp("family_bf16"), dtype=torch.bfloat16)
