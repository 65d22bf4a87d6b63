import os

import pytest

from pipeline.executor import InlineExecutor, RayExecutor, Resources


def square(x: int) -> int:
    return x * x


def die_once(args: tuple[str, int]) -> int:
    """Kills its worker process the first time it sees an item (a lost worker), then succeeds."""
    marker, x = args
    path = f"{marker}-{x}"
    if not os.path.exists(path):
        open(path, "w").close()
        os._exit(1)
    return x + 100


def test_inline_and_ray_give_the_same_results_in_order(ray_session):
    items = list(range(13))
    ray_results = RayExecutor(max_in_flight=2).map(square, items, Resources(num_cpus=1), desc="test")
    assert ray_results == InlineExecutor().map(square, items) == [x * x for x in items]


def test_ray_retries_a_task_whose_worker_died(ray_session, tmp_path):
    items = [(str(tmp_path / "m"), x) for x in range(3)]
    assert RayExecutor(max_in_flight=3).map(die_once, items) == [100, 101, 102]


def test_gpu_request_without_gpus_is_refused_before_work(ray_session):
    with pytest.raises(ValueError, match=r"encode asks for 1 GPU\(s\) .* set encode.num_gpus=0"):
        RayExecutor().check(Resources(num_gpus=1), "encode")
    with pytest.raises(ValueError, match="encode.num_gpus=0"):
        InlineExecutor().check(Resources(num_gpus=1), "encode")
    with pytest.raises(ValueError, match="lower encode.num_cpus"):
        RayExecutor().check(Resources(num_cpus=64), "encode")
