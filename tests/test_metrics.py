"""Metrics against closed forms and brute-force references; the ADM-style npz files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nextscale.errors import InvalidInputError
from nextscale.eval.metrics import (
    class_accuracy,
    feature_stats,
    frechet_distance,
    inception_score,
    load_npz_samples,
    load_npz_stats,
    precision_recall,
    save_npz_samples,
)


def _random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 1e-3) * np.eye(d)


def _sqrtm_denman_beavers(a: np.ndarray, iters: int = 100) -> np.ndarray:
    """Matrix square root by the Denman-Beavers iteration (converges for matrices with positive eigenvalues)."""
    y, z = a.copy(), np.eye(len(a))
    for _ in range(iters):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def _fid_reference(mu1, s1, mu2, s2) -> float:
    covmean = _sqrtm_denman_beavers(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(16), _random_spd(rng, 16)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    singular = _random_spd(rng, 16, rank=4)  # rank-deficient, as with fewer samples than dimensions
    assert frechet_distance(mu, singular, mu, singular) == pytest.approx(0.0, abs=1e-7)


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    v1, v2 = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_rotation_invariant_and_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.standard_normal(8), rng.standard_normal(8), _random_spd(rng, 8), _random_spd(rng, 8)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    base = frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(base, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("d", [3, 12, 40])
def test_fid_matches_denman_beavers_reference(d):
    rng = np.random.default_rng(d)
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), _random_spd(rng, d), _random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fid_reference(mu1, s1, mu2, s2), rel=1e-8)


def test_feature_stats_and_fid_from_features():
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((500, 6)) * [1, 2, 3, 1, 1, 1] + 5
    mu, sigma = feature_stats(torch.from_numpy(feats).float())
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (6, 6)
    assert np.allclose(mu, feats.mean(0), atol=1e-5) and np.allclose(sigma, np.cov(feats, rowvar=False), atol=1e-4)
    with pytest.raises(InvalidInputError, match="at least 2"):
        feature_stats(feats[:1])
    with pytest.raises(InvalidInputError, match="shape mismatch"):
        frechet_distance(mu, sigma, mu[:5], sigma[:5, :5])


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((300, 8))
    assert precision_recall(real, real.copy(), k=3, batch=64) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)


def test_precision_recall_mode_dropping():
    rng = np.random.default_rng(5)
    mode_a, mode_b = rng.standard_normal((400, 4)), rng.standard_normal((400, 4)) + 50
    real = np.concatenate([mode_a, mode_b])
    fake = rng.standard_normal((400, 4))  # only mode A
    precision, recall = precision_recall(real, fake, k=5, batch=128)
    assert precision > 0.95
    assert 0.45 <= recall <= 0.5
    with pytest.raises(InvalidInputError, match="k must be"):
        precision_recall(real[:3], fake, k=3)


def test_inception_score_extremes():
    n, k = 1000, 10
    uniform = np.full((n, k), 1.0 / k)
    assert inception_score(uniform) == pytest.approx((1.0, 0.0), abs=1e-9)
    one_hot = np.eye(k)[np.arange(n) % k]  # every split holds every class equally often
    mean, std = inception_score(torch.from_numpy(one_hot))
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    rng = np.random.default_rng(6)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((n, k))), 1).numpy()
    assert 1.0 < inception_score(probs, splits=5)[0] < k
    with pytest.raises(InvalidInputError, match="softmax"):
        inception_score(uniform * 2)
    with pytest.raises(InvalidInputError, match="splits"):
        inception_score(uniform[:5], splits=10)


def test_class_accuracy():
    target = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    overall, per = class_accuracy(pred, target, num_classes=4)
    assert overall == pytest.approx(4 / 6)
    assert per[0] == 0.5 and per[1] == pytest.approx(2 / 3) and per[2] == 1.0 and math.isnan(per[3])
    logits = torch.nn.functional.one_hot(pred, 4).float()
    assert class_accuracy(logits, target.numpy(), 4)[0] == overall
    with pytest.raises(InvalidInputError, match=r"target labels must be in 0\.\.1"):
        class_accuracy(pred[:3], target[:3] + 1, num_classes=2)


def test_npz_roundtrip(tmp_path: Path):
    imgs = np.random.default_rng(7).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = save_npz_samples(tmp_path / "sub" / "samples.npz", imgs, labels=[1, 2, 3, 4, 5])
    assert np.array_equal(load_npz_samples(path), imgs)
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"] and f["arr_1"].tolist() == [1, 2, 3, 4, 5]
    assert [p.name for p in path.parent.iterdir()] == ["samples.npz"]  # no temp files left behind
    grey = save_npz_samples(tmp_path / "grey.npz", torch.zeros(2, 4, 4, 1, dtype=torch.uint8))
    assert load_npz_samples(grey).shape == (2, 4, 4, 1)
    assert load_npz_stats(grey) is None


def test_npz_validation(tmp_path: Path):
    with pytest.raises(InvalidInputError, match="uint8"):
        save_npz_samples(tmp_path / "x.npz", np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(InvalidInputError, match="1 or 3 channels"):
        save_npz_samples(tmp_path / "x.npz", np.zeros((1, 4, 4, 2), np.uint8))
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((1, 3, 4, 4), np.uint8)[..., :2])
    with pytest.raises(InvalidInputError, match="NHWC"):
        load_npz_samples(tmp_path / "nchw.npz")
    np.savez(tmp_path / "other.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(InvalidInputError, match=r"no 'arr_0'.*images"):
        load_npz_samples(tmp_path / "other.npz")
    (tmp_path / "garbage.npz").write_bytes(b"\x00" * 100)
    with pytest.raises(InvalidInputError, match=r"not a readable \.npz"):
        load_npz_samples(tmp_path / "garbage.npz")
    with pytest.raises(InvalidInputError, match="no such file"):
        load_npz_samples(tmp_path / "missing.npz")


def test_npz_reference_stats(tmp_path: Path):
    mu, sigma = np.arange(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8), mu=mu, sigma=sigma)
    got = load_npz_stats(tmp_path / "ref.npz")
    assert got is not None and got[0].dtype == np.float64 and np.array_equal(got[1], sigma)
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=np.eye(2))
    with pytest.raises(InvalidInputError, match="mu"):
        load_npz_stats(tmp_path / "bad.npz")
