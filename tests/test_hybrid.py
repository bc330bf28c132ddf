"""Hybrid negatives: the blurred-threshold mask and the mixing of two digits."""
import numpy as np

import ff_hybrid_mnist as ff


def naive_blur(m, n_blur):
    """n_blur passes of [1/4, 1/2, 1/4] along rows then columns, edge-padded, in loops."""
    m = m.astype(np.float64)
    for _ in range(n_blur):
        for axis in (1, 0):
            p = np.pad(m, [(1, 1) if a == axis else (0, 0) for a in range(2)], mode="edge")
            lo = p[:-2, :] if axis == 0 else p[:, :-2]
            mid = p[1:-1, :] if axis == 0 else p[:, 1:-1]
            hi = p[2:, :] if axis == 0 else p[:, 2:]
            m = 0.25 * lo + 0.5 * mid + 0.25 * hi
    return m


def mean_run_length(masks):
    """Mean length of runs of equal values along the rows of (n, 28, 28) masks."""
    changes = (masks[:, :, 1:] != masks[:, :, :-1]).sum()
    return masks.shape[0] * 28 * 28 / (masks.shape[0] * 28 + changes)


def test_blur_matrix_matches_separable_passes():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 2, (28, 28))
    for n_blur in (0, 1, 6, 10):
        B = ff.blur_matrix(n_blur)
        np.testing.assert_allclose(B @ m @ B.T, naive_blur(m, n_blur), atol=1e-14)


def test_masks_equal_thresholded_naive_blur():
    """The fast mask is exactly the SPEC's: regenerate its random bits and blur them naively."""
    for n_blur in (2, 6, 8):
        masks = ff.make_masks(20, np.random.default_rng(7), n_blur).reshape(20, 28, 28)
        bits = np.unpackbits(np.frombuffer(np.random.default_rng(7).bytes(20 * 784 // 8), np.uint8))
        bits = bits.reshape(20, 28, 28)
        want = np.stack([naive_blur(b, n_blur) > 0.5 for b in bits])
        assert masks.dtype == bool and masks.shape == (20, 28, 28)
        np.testing.assert_array_equal(masks, want)


def test_constant_mask_stays_constant():
    B = ff.blur_matrix(6)
    for value in (0.0, 1.0):
        np.testing.assert_allclose(B @ np.full((28, 28), value) @ B.T, value, atol=1e-15)


def test_more_blur_gives_larger_regions():
    runs = [mean_run_length(ff.make_masks(200, np.random.default_rng(1), n).reshape(-1, 28, 28))
            for n in (0, 2, 6, 10)]
    assert runs[0] < 2.5  # unblurred random bits: mean run about 2
    assert all(a < b for a, b in zip(runs, runs[1:])), runs


def test_masks_reproducible_and_balanced():
    a = ff.make_masks(50, np.random.default_rng(3))
    b = ff.make_masks(50, np.random.default_rng(3))
    c = ff.make_masks(50, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert 0.35 < a.mean() < 0.65


def test_hybrid_pixels_come_from_a_or_b_by_the_mask():
    rng = np.random.default_rng(5)
    a = rng.random((30, 784)).astype(np.float32)
    b = rng.random((30, 784)).astype(np.float32) + 2
    hyb, masks = ff.make_hybrid_batch(a, b, rng)
    np.testing.assert_array_equal(hyb, np.where(masks, a, b))
    per_pair = masks.reshape(30, -1).mean(axis=1)
    assert len(np.unique(per_pair)) > 1, "each pair needs its own mask"
