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
