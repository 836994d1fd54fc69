import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """The tiny GPT-2 of helpers.py saved as an HF folder, for jobs that load it per rank."""
    from helpers import tiny_gpt2

    folder = tmp_path_factory.mktemp("pretrained")
    tiny_gpt2(seed=0).save_pretrained(folder)
    return str(folder)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (with the reason) where torch sees none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); run `make test-gpu` on a GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
