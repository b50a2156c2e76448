import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dit_files(tmp_path_factory):
    """A tiny DiT written once per session in both layouts: {'sharded': folder, 'single': file}."""
    from tests.factory.dit import KIJAI_NAME, write_dit_sharded, write_dit_single

    root = tmp_path_factory.mktemp("dit")
    return {
        "sharded": write_dit_sharded(root / "FramePackI2V_HY"),
        "single": write_dit_single(root / KIJAI_NAME),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A full set of tiny models (every checkpoint a generation or training run needs), written once per module."""
    from tests.factory.models import write_all_models

    return write_all_models(tmp_path_factory.mktemp("models"))
