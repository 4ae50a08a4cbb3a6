import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where torch sees a CUDA device and are skipped, saying why, everywhere else."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tok():
    from qcorda.testing import tiny

    return tiny.tokenizer()


@pytest.fixture(scope="session")
def gemma_path():
    """The real Gemma-3-270M as a cached fp32 HF directory (converted once)."""
    from qcorda.models import gemma3_270m

    return gemma3_270m()
