"""Sample-quality metrics computed on features: FID, improved precision/recall, Inception Score, accuracy.

Also the ADM-compatible ``.npz`` sample files (key ``arr_0``: uint8 NHWC) that the VAR/ADM evaluation scripts
exchange, and ``FeatureNet``, the interface of the networks that turn images into features and logits
(``nextscale.eval.inception`` for RGB datasets, ``nextscale.eval.classifier`` for small grey ones). Everything
here is float64 linear algebra in numpy/torch (no scipy).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from nextscale.errors import InvalidInputError
from nextscale.fileio import atomic_file

ArrayLike = np.ndarray | torch.Tensor


@runtime_checkable
class FeatureNet(Protocol):
    """A network that embeds images: uint8 NHWC (C = 1 or 3, any H, W) -> features / logits, in batches."""

    def features(self, images: ArrayLike, batch_size: int = ...) -> torch.Tensor:
        """[N, D] float32 features (CPU)."""
        ...

    def logits(self, images: ArrayLike, batch_size: int = ...) -> torch.Tensor:
        """[N, K] float32 class logits (CPU)."""
        ...


def uint8_nhwc_to_float01(images: ArrayLike) -> torch.Tensor:
    """uint8 [N, H, W, C] (or [N, H, W]) -> float32 [N, C, H, W] in [0, 1]; validates what FeatureNets accept."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8:
        raise InvalidInputError(f"images must be uint8 NHWC, got dtype {t.dtype}")
    t = t.unsqueeze(-1) if t.ndim == 3 else t
    if t.ndim != 4 or t.shape[-1] not in (1, 3):
        raise InvalidInputError(f"images must be uint8 [N, H, W, C] with C = 1 or 3, got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def float_nchw(images: torch.Tensor, value_range: str) -> torch.Tensor:
    """float [N, C, H, W] with C = 1 or 3 -> float32; ``value_range`` (e.g. ``"[0, 1]"``) is what the caller
    expects the values in, for the message (not checked)."""
    x = images.float()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InvalidInputError(
            f"float images must be NCHW with 1 or 3 channels in {value_range}, got shape "
            f"{tuple(x.shape)} (pass uint8 images as NHWC)"
        )
    return x


def _as_float64_2d(x: ArrayLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D [N, D], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values")
    return arr


# ---------------------------------------------------------------------------------------------------- FID


def feature_stats(feats_ND: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features, in float64 (what FID compares)."""
    feats = _as_float64_2d(feats_ND, "feats_ND")
    if len(feats) < 2:
        raise InvalidInputError(f"need at least 2 feature vectors for a covariance, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``tr(sqrtm(S1 S2))`` equals ``tr(sqrtm(A))`` with the symmetric PSD ``A = sqrt(S1) S2 sqrt(S1)``, whose
    square-root trace is the sum of the square roots of its eigenvalues: two symmetric eigendecompositions,
    stable even for singular covariances (tiny negative eigenvalues from round-off are clipped to 0), unlike a
    general ``sqrtm`` of the non-symmetric ``S1 S2``.
    """
    m1, m2 = (
        np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m, dtype=np.float64).reshape(-1)
        for m in (mu1, mu2)
    )
    s1, s2 = _as_float64_2d(sigma1, "sigma1"), _as_float64_2d(sigma2, "sigma2")
    d = len(m1)
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise InvalidInputError(
            f"shape mismatch: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, "
            f"sigma2 {s2.shape} (expected [D] and [D, D] with the same D)"
        )
    root1 = _sqrt_psd(s1)
    a = root1 @ ((s2 + s2.T) / 2) @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((a + a.T) / 2), 0.0, None)).sum()
    diff = m1 - m2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean), 0.0)


# --------------------------------------------------------------------------------------- precision / recall


def _knn_radii(feats: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance of each sample to its k-th nearest neighbour in its own set, itself excluded."""
    radii = []
    for lo in range(0, len(feats), batch):
        d = torch.cdist(feats[lo : lo + batch], feats)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # value 0 (itself) comes first
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Fraction of ``queries`` inside at least one ball (centre, radius)."""
    inside = 0
    for lo in range(0, len(queries), batch):
        d = torch.cdist(queries[lo : lo + batch], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real_ND: ArrayLike, fake_ND: ArrayLike, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN balls around each sample.

    Precision: share of fake samples inside the k-NN ball of at least one real sample (are samples
    realistic?); recall: share of real samples inside some fake sample's ball (is the data covered?).
    Distances are float32, computed ``batch`` rows at a time.
    """
    real, fake = (
        torch.as_tensor(_as_float64_2d(x, name), dtype=torch.float32)
        for x, name in ((real_ND, "real_ND"), (fake_ND, "fake_ND"))
    )
    if real.shape[1] != fake.shape[1]:
        raise InvalidInputError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < min(len(real), len(fake)):
        raise InvalidInputError(
            f"k must be an int in 1..{min(len(real), len(fake)) - 1} (fewer than the samples of each set), got {k!r}"
        )
    if batch < 1:
        raise InvalidInputError(f"batch must be >= 1, got {batch}")
    with torch.inference_mode():
        precision = _coverage(fake, real, _knn_radii(real, k, batch), batch)
        recall = _coverage(real, fake, _knn_radii(fake, k, batch), batch)
    return precision, recall


# ------------------------------------------------------------------------------------- IS and accuracy


def inception_score(probs_NK: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score: mean and std over ``splits`` equal parts of exp(E_x KL(p(y|x) || p(y))).

    As the reference implementation: part ``i`` is rows ``[i * N // splits, (i + 1) * N // splits)`` and the
    leftover rows are unused; ``probs_NK`` are softmax outputs (rows summing to 1).
    """
    p = _as_float64_2d(probs_NK, "probs_NK")
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= len(p):
        raise InvalidInputError(f"splits must be an int in 1..N ({len(p)}), got {splits!r}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise InvalidInputError("probs_NK must be probabilities: non-negative rows summing to 1 (apply softmax)")
    n, scores = len(p) // splits, []
    for i in range(splits):
        part = p[i * n : (i + 1) * n]
        py = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def class_accuracy(pred: ArrayLike, target: ArrayLike, num_classes: int) -> tuple[float, dict[int, float]]:
    """Overall accuracy and accuracy per class index (NaN for a class with no samples).

    ``pred`` is predicted labels [N] or logits/probabilities [N, num_classes] (argmax taken).
    """
    p, t = (torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x) for x in (pred, target))
    if p.ndim == 2:
        if p.shape[1] != num_classes:
            raise InvalidInputError(f"pred has {p.shape[1]} columns, expected num_classes={num_classes}")
        p = p.argmax(dim=1)
    p, t = p.reshape(-1).long(), t.reshape(-1).long()
    if len(p) != len(t) or len(t) == 0:
        raise InvalidInputError(f"pred and target must be non-empty and of equal length, got {len(p)} and {len(t)}")
    for name, x in (("pred", p), ("target", t)):
        if int(x.min()) < 0 or int(x.max()) >= num_classes:
            raise InvalidInputError(
                f"{name} labels must be in 0..{num_classes - 1}, got {int(x.min())}..{int(x.max())}"
            )
    correct = (p == t).double()
    per_class = {}
    for c in range(num_classes):
        mask = t == c
        per_class[c] = float(correct[mask].mean()) if mask.any() else float("nan")
    return float(correct.mean()), per_class


# --------------------------------------------------------------------------------------------- npz files


def _check_samples(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise InvalidInputError(f"{source}: samples must be uint8, got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise InvalidInputError(f"{source}: samples must be NHWC with 1 or 3 channels, got shape {arr.shape}")
    return arr


def save_npz_samples(
    path: str | Path, images_NHWC_uint8: ArrayLike, labels: ArrayLike | Sequence[int] | None = None
) -> Path:
    """Write samples as ADM's evaluator expects (``arr_0``: uint8 NHWC; ``arr_1``: labels if given).

    Written to a temporary sibling and renamed, so a reader never sees a half-written file.
    """
    path = Path(path)
    arr = (
        images_NHWC_uint8.detach().cpu().numpy()
        if isinstance(images_NHWC_uint8, torch.Tensor)
        else np.asarray(images_NHWC_uint8)
    )
    arrays = [_check_samples(arr, "save_npz_samples")]  # positional arrays are saved as arr_0, arr_1
    if labels is not None:
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
        if len(lab) != len(arr):
            raise InvalidInputError(f"{len(arr)} images but {len(lab)} labels")
        arrays.append(lab)
    # A file object, so numpy does not append ".npz" to the temporary name.
    return atomic_file(path, lambda f: np.savez(f, *arrays))


def _open_npz(path: str | Path) -> tuple[Path, np.lib.npyio.NpzFile]:
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    try:
        return path, np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InvalidInputError(f"{path}: not a readable .npz file (truncated or corrupt?): {e}") from e


def load_npz_samples(path: str | Path) -> np.ndarray:
    """Read ``arr_0`` of an ADM-style sample or reference file: uint8 [N, H, W, C] with C = 1 or 3."""
    path, npz = _open_npz(path)
    with npz:
        if "arr_0" not in npz.files:
            raise InvalidInputError(f"{path}: no 'arr_0' array of samples (has: {', '.join(npz.files) or 'nothing'})")
        try:
            arr = npz["arr_0"]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise InvalidInputError(f"{path}: arr_0 is unreadable (truncated or corrupt?): {e}") from e
    return _check_samples(arr, str(path))


def load_npz_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Reference statistics ``mu`` [D] / ``sigma`` [D, D] stored in an ``.npz`` (as ADM's reference batches
    do), in float64; None when the file has none (then compute them from ``arr_0``)."""
    path, npz = _open_npz(path)
    with npz:
        if "mu" not in npz.files or "sigma" not in npz.files:
            return None
        mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise InvalidInputError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return mu, sigma
