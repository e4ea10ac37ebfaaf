import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The strict device mode (phoenix.runtime.strict_group): on the cpu backend every process
# group that is not explicitly gloo refuses host tensors, as NCCL does. Every test runs
# under it, and the processes the tests start (torchrun, spawn) inherit it.
os.environ.setdefault("PHOENIX_NCCL_STRICT", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end test (CI runs them all)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU machines)")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from phoenix.testing.tiny import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
