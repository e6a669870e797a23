"""breast_cancer and digits: split sizes, stratification, standardisation, exact round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from spamkern.data import DATASETS, DatasetSplit, dataset_names, load_dataset


def _row_index(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """For each row of ``rows`` the index of the identical row of ``table`` (asserting one)."""
    keys = {r.tobytes(): i for i, r in enumerate(table)}
    assert len(keys) == len(table), "reference table has duplicate rows"
    return np.array([keys[r.tobytes()] for r in rows])


def _check_stratified(y_train: torch.Tensor, y_test: torch.Tensor, y_all: np.ndarray):
    counts = np.bincount(y_all)
    test_counts = np.bincount(y_test.numpy(), minlength=len(counts))
    train_counts = np.bincount(y_train.numpy(), minlength=len(counts))
    np.testing.assert_array_equal(train_counts + test_counts, counts)
    # stratified: every class is split 80/20 up to rounding
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1.0), (test_counts, counts)


def test_names():
    assert dataset_names() == DATASETS
    assert set(DATASETS) == {
        "breast_cancer",
        "digits",
        "digits28",
        "mnist",
        "fashion_mnist",
        "cifar10",
    }


def test_unknown_name_lists_accepted_names():
    with pytest.raises(ValueError, match="unknown data set 'svhn'") as err:
        load_dataset("svhn")
    for name in DATASETS:
        assert name in str(err.value)
    with pytest.raises(TypeError, match="name must be a str"):
        load_dataset(3)
    with pytest.raises(TypeError, match="seed must be an int"):
        load_dataset("digits", seed=0.5)


def test_breast_cancer_split_and_standardisation():
    x_all, y_all = load_breast_cancer(return_X_y=True)
    seed = int(np.random.default_rng().integers(0, 2**31))
    split = load_dataset("breast_cancer", seed=seed)
    assert isinstance(split, DatasetSplit)
    (x_tr, y_tr), (x_te, y_te) = split.train, split.test
    assert (split.name, split.n_classes, split.input_shape) == ("breast_cancer", 2, (30,))
    assert x_tr.shape == (455, 30) and x_te.shape == (114, 30)
    assert x_tr.dtype == x_te.dtype == torch.float32
    assert y_tr.dtype == y_te.dtype == torch.int64
    _check_stratified(y_tr, y_te, y_all)

    raw = load_dataset("breast_cancer", seed=seed, normalize=False)
    assert raw.mean is None and raw.std is None
    idx_tr = _row_index(raw.train[0].numpy(), x_all.astype(np.float32))
    idx_te = _row_index(raw.test[0].numpy(), x_all.astype(np.float32))
    # a partition of all 569 rows, labels travelling with their rows
    assert sorted(np.concatenate([idx_tr, idx_te])) == list(range(len(x_all)))
    np.testing.assert_array_equal(raw.train[1].numpy(), y_all[idx_tr])
    np.testing.assert_array_equal(raw.test[1].numpy(), y_all[idx_te])
    # the same split whether standardised or not
    torch.testing.assert_close(split.train[1], raw.train[1], rtol=0, atol=0)

    # standardised with the TRAIN rows' mean and population std, in float64
    mean, std = x_all[idx_tr].mean(0), x_all[idx_tr].std(0)
    torch.testing.assert_close(split.mean.double(), torch.from_numpy(mean), rtol=1e-6, atol=0)
    torch.testing.assert_close(split.std.double(), torch.from_numpy(std), rtol=1e-6, atol=0)
    expected_tr = torch.from_numpy((x_all[idx_tr] - mean) / std)
    expected_te = torch.from_numpy((x_all[idx_te] - mean) / std)
    torch.testing.assert_close(x_tr.double(), expected_tr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_te.double(), expected_te, rtol=1e-5, atol=1e-5)
    assert x_tr.double().mean(0).abs().max() < 1e-5
    assert (x_tr.double().std(0, correction=0) - 1).abs().max() < 1e-5
    # the test rows were not standardised with their own statistics
    assert x_te.double().mean(0).abs().max() > 1e-3


def test_breast_cancer_seed_controls_split():
    a = load_dataset("breast_cancer", seed=1, normalize=False)
    b = load_dataset("breast_cancer", seed=1, normalize=False)
    c = load_dataset("breast_cancer", seed=2, normalize=False)
    torch.testing.assert_close(a.train[0], b.train[0], rtol=0, atol=0)
    assert not torch.equal(a.test[0], c.test[0])


@pytest.mark.parametrize("normalize", [True, False])
def test_digits_images_in_unit_range(normalize):
    bunch = load_digits()
    seed = int(np.random.default_rng().integers(0, 2**31))
    split = load_dataset("digits", seed=seed, normalize=normalize)
    (x_tr, y_tr), (x_te, y_te) = split.train, split.test
    assert (split.name, split.n_classes, split.input_shape) == ("digits", 10, (1, 8, 8))
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert split.mean is None and split.std is None
    _check_stratified(y_tr, y_te, bunch.target)
    for x in (x_tr, x_te):
        assert x.min() == 0 and x.max() == 1
    # exact: pixel = original 0..16 value / 16, labels travel with their image
    pixels = torch.cat([x_tr, x_te]).double() * 16
    torch.testing.assert_close(pixels, pixels.round(), rtol=0, atol=1e-5)
    flat = bunch.images.reshape(len(bunch.images), -1)
    order = _row_index(pixels.round().reshape(len(pixels), -1).numpy(), flat)
    labels = torch.cat([y_tr, y_te]).numpy()
    np.testing.assert_array_equal(labels, bunch.target[order])


def _bilinear_reference(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling with aligned corners, written out per output pixel (float64)."""
    n, c, h, w = images.shape
    out = np.empty((n, c, size, size))
    for i in range(size):
        yi = i * (h - 1) / (size - 1)
        y0 = min(int(np.floor(yi)), h - 2)
        fy = yi - y0
        for j in range(size):
            xj = j * (w - 1) / (size - 1)
            x0 = min(int(np.floor(xj)), w - 2)
            fx = xj - x0
            out[:, :, i, j] = (
                (1 - fy) * (1 - fx) * images[:, :, y0, x0]
                + (1 - fy) * fx * images[:, :, y0, x0 + 1]
                + fy * (1 - fx) * images[:, :, y0 + 1, x0]
                + fy * fx * images[:, :, y0 + 1, x0 + 1]
            )
    return out


def test_digits28_is_digits_upsampled_with_the_same_split():
    seed = int(np.random.default_rng().integers(0, 2**31))
    small = load_dataset("digits", seed=seed)
    big = load_dataset("digits28", seed=seed)
    assert (big.name, big.n_classes, big.input_shape) == ("digits28", 10, (1, 28, 28))
    assert big.mean is None and big.std is None
    for (xs, ys), (xb, yb) in ((small.train, big.train), (small.test, big.test)):
        assert xb.shape == (len(xs), 1, 28, 28) and xb.dtype == torch.float32
        torch.testing.assert_close(yb, ys, rtol=0, atol=0)  # same images, same order
        expected = _bilinear_reference(xs.double().numpy(), 28)
        torch.testing.assert_close(xb.double(), torch.from_numpy(expected), rtol=0, atol=1e-6)
        # corners are the original corner pixels; values stay in [0, 1]
        torch.testing.assert_close(xb[..., ::27, ::27], xs[..., ::7, ::7], rtol=0, atol=1e-7)
        assert xb.min() >= 0 and xb.max() <= 1
    # deterministic: a second load gives identical tensors
    again = load_dataset("digits28", seed=seed)
    torch.testing.assert_close(again.train[0], big.train[0], rtol=0, atol=0)
