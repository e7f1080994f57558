import os

import pytest
import torch

# 2-core CI machine: one intra-op thread per test process keeps timings and results repeatable.
torch.set_num_threads(int(os.environ.get("LERPFAST_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
