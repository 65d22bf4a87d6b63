"""Cache keys of the demo and ci presets, pinned: a change that moves one reruns every user's stage
and everything after it, so it must be deliberate (a stage's VERSION, a new result field), never
the side effect of moving code."""

import pytest

from pipeline import config as C
from pipeline import dag

KEYS = {
    "demo": {"encode": "319065ca302e3bb0", "probe": "2adf7474bc916042", "refstats": "9ff3c7cf8d20e5a1",
             "teacher": "6b13eae12d16f781", "phema": "a6dc8278695fde94", "pairs": "ec276bd777055e0b",
             "distill": "fc35b774d16f5cde", "evaluate": "d49526d1038061be"},
    "ci": {"encode": "9803d7685336406c", "probe": "30590b34f7bb240b", "refstats": "72afa5dca41ddfeb",
           "teacher": "fc9faaadd1e2241a", "phema": "20ddd9a9fecc3108", "pairs": "fa5ecb890005db55",
           "distill": "7894fa7d23008167", "evaluate": "0eca1e9d28480a02"},
}


@pytest.mark.parametrize("preset", sorted(KEYS))
def test_the_presets_cache_keys_are_the_pinned_ones(preset, tmp_path):
    cfg = C.load_config(preset, storage=str(tmp_path))
    assert dag.cache_keys(dag.graph(), cfg) == KEYS[preset]
