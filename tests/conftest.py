import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def imagenet_sample() -> Path:
    path = SHARED_DATA / "imagenet-sample"
    if not path.is_dir():
        pytest.skip(f"shared test images not found at {path}")
    return path


@pytest.fixture
def bad_images() -> Path:
    path = SHARED_DATA / "bad-images"
    if not path.is_dir():
        pytest.skip(f"shared bad images not found at {path}")
    return path


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
