import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The strict device mode (phoenix.runtime.strict_group): on the cpu backend every process
# group that is not explicitly gloo refuses host tensors, as NCCL does. Every test runs
# under it, and the processes the tests start (torchrun, spawn) inherit it.
os.environ.setdefault("PHOENIX_NCCL_STRICT", "1")
# The sample-index cache that runs share (phoenix.data.plan_cache.shared_index_cache): one
# per test session, not the user's ~/.cache, inherited by the processes tests start.
if "PHOENIX_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PHOENIX_CACHE_DIR"] = tempfile.mkdtemp(prefix="phoenix-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PHOENIX_CACHE_DIR"], True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end test (CI runs them all)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU machines)")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from phoenix.testing.tiny import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
