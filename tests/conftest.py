"""Shared fixtures: one local Ray instance and one moto S3 server per test session.

Nothing here downloads: Hugging Face is offline, Ray and S3 stay on 127.0.0.1.
"""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)
os.environ["ONESTEP_CPU_BF16"] = "0"  # fp32 on every CPU, AMX or not: the same numbers on any machine;
# tests/pipeline/test_bf16_on_cpu.py runs the bf16 paths
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # `import helpers`
# Ray workers import test modules' task functions by module name: give them the same paths.
TEST_DIRS = sorted(str(d) for d in TESTS.rglob("*") if d.is_dir() and d.name != "__pycache__")
os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *TEST_DIRS, os.environ.get("PYTHONPATH", "")])

BUCKET = "onestep-test"


@pytest.fixture(scope="session")
def s3_bucket() -> str:
    """A real S3 API (moto) on 127.0.0.1 with an empty bucket; returns 's3://bucket'.

    The endpoint and dummy credentials go into the environment, as a user's would, so Ray
    workers started afterwards see them too.
    """
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
    })
    fsspec.config.set_conf_env(fsspec.config.conf)
    fsspec.filesystem("s3").mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_bucket: str):
    """The one local Ray instance (2 CPUs here) that every Ray test shares."""
    import ray

    from pipeline.executor import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For modules of small tensors: extra intra-op threads only add sync cost (and stall on a busy core)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole DAGs, Ray jobs, sweeps and fault injection (tests/e2e, tests/faults) are slow: `-m "not slow"`
    leaves them out of the fast inner loop."""
    for item in items:
        if {"e2e", "faults"} & set(Path(item.fspath).parts):
            item.add_marker(pytest.mark.slow)
