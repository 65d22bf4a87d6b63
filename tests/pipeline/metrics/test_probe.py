"""The probe classifier: its held-out split, its augmentation, and that it learns labels, not noise."""

import numpy as np
import pytest
import torch

from pipeline.data.sources import SyntheticSource
from pipeline.metrics.probe import ProbeNet, ProbeTraining, _augment, embed, holdout_mask, to_input, train_probe


def test_the_split_is_keyed_to_the_dataset_index():
    index = np.arange(10000)
    mask = holdout_mask(index, 0.1, seed=3)
    assert abs(mask.mean() - 0.1) < 0.01
    subset = np.array([9999, 17, 5000, 17])  # any order, any subset: the same decision per index
    assert holdout_mask(subset, 0.1, seed=3).tolist() == mask[subset].tolist()
    assert holdout_mask(index, 0.1, seed=4).tolist() != mask.tolist()


def test_augmentation_flips_and_translates_whole_images():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    out = _augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for a, b in zip(out, x):  # every output pixel is an input pixel of the same channel, nearby
        flipped = [b, b.flip(-1)]
        assert any(torch.equal(a[:, 2:-2, 2:-2], f[:, 2 + dy:14 + dy, 2 + dx:14 + dx])
                   for f in flipped for dy in range(-2, 3) for dx in range(-2, 3))


def _train(shuffle: bool) -> float:
    torch.manual_seed(0)
    source = SyntheticSource(1600, 16, 10, seed=0)
    images, labels = zip(*(source.load(i)[:2] for i in range(len(source))))
    x, y = to_input(np.stack(images), 16, "cpu"), torch.tensor(labels)
    hold = torch.from_numpy(holdout_mask(np.arange(len(y)), 0.25, seed=0))
    train_labels = y[~hold][torch.randperm(int((~hold).sum()))] if shuffle else y[~hold]
    net = ProbeNet(10, 16, (16, 32, 64), 64)
    train_probe(net, x[~hold], train_labels, ProbeTraining(epochs=20, batch=32), seed=0)
    _, predicted = embed(net, x[hold])
    return float((predicted == y[hold].numpy()).mean())


@pytest.mark.slow
def test_the_probe_learns_shapes_but_not_shuffled_labels(one_thread):
    assert _train(shuffle=False) > 0.8
    assert _train(shuffle=True) < 0.2  # chance is 0.1: nothing to learn from shuffled labels
