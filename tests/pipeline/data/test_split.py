"""evaluate's real row: a seeded, class-stratified sample of the probe's held-out images, not the first
N in index order (an image folder is encoded class by class)."""

import numpy as np

from pipeline import store
from pipeline.data.split import stratified, write_split
from pipeline.evaluation import select_heldout


def test_a_stratified_sample_takes_every_class_in_proportion_seeded():
    labels = np.repeat([0, 1, 2, 3], [40, 40, 20, 100])  # stored class by class
    chosen = stratified(labels, 50, seed=1)
    assert np.bincount(labels[chosen]).tolist() == [10, 10, 5, 25]
    assert np.all(np.diff(chosen) > 0)  # in index order, no repeats
    assert np.array_equal(chosen, stratified(labels, 50, seed=1))
    assert not np.array_equal(chosen, stratified(labels, 50, seed=2))
    assert np.array_equal(stratified(labels, 500, seed=1), np.arange(200))  # more than there is: all of them


def test_the_real_row_of_a_folder_stored_class_by_class_covers_every_class():
    n = 300
    labels = np.repeat(np.arange(10), n // 10)  # what imagefolder/digits encode: class 0 first, ...
    artifact = store.Artifact("memory://split-test/probe")
    write_split(artifact, {"index": np.arange(n), "shard": np.arange(n) // 100, "position": np.arange(n) % 100,
                           "label": labels, "holdout": np.arange(n) % 3 == 0})
    heldout = select_heldout(artifact, 40, seed=0)
    assert np.bincount(heldout["label"], minlength=10).tolist() == [4] * 10  # the first 40 would be 4 classes
    assert np.all(heldout["index"] % 3 == 0) and np.array_equal(heldout["label"], labels[heldout["index"]])
    assert np.array_equal(heldout["shard"], heldout["index"] // 100)
