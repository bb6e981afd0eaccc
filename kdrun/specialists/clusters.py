"""Which classes a specialist should cover: clusters of classes the generalist confuses."""

import torch
from sklearn.cluster import KMeans


def prediction_covariance(probs):
    """Unbiased covariance [C, C] (float64) of the columns of a generalist's predictions probs [N, C]."""
    return torch.cov(probs.to(torch.float64).T)


def prediction_correlation(probs):
    """The covariance scaled to unit diagonal. On few classes the raw covariance's columns differ mostly
    by their own diagonal entry (how unsure the generalist is of that class), and K-means then groups
    the unsure classes, confused with each other or not (on Fashion-MNIST: sandals with shirts)."""
    cov = prediction_covariance(probs)
    scale = cov.diagonal().clamp_min(torch.finfo(cov.dtype).tiny).sqrt()
    return cov / scale[:, None] / scale[None, :]


def cluster_classes(probs, k, min_size=2, seed=0):
    """K-means on the columns of the prediction covariance, scaled to unit diagonal (the correlation
    matrix): each class is a point.

    Returns the clusters with at least min_size classes (a one-class specialist has nothing to
    separate), each a sorted list of class indices, ordered by their smallest class.
    """
    num_classes = probs.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be between 1 and the number of classes ({num_classes}), got {k}")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}")
    points = prediction_correlation(probs).cpu().numpy()
    assignment = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(points)
    clusters = [sorted(int(c) for c in (assignment == label).nonzero()[0]) for label in set(assignment)]
    return sorted((c for c in clusters if len(c) >= min_size), key=lambda c: c[0])
