"""Statistics for comparing training runs: a paired t-test over seeds, the paired standard error over test samples,
per-class accuracy. Pure Python + numpy (no scipy): the t distribution through the regularized incomplete beta.
"""
import math

import numpy as np


def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def regularized_beta(a, b, x):
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def paired_t_test(differences):
    """Paired t-test of per-seed differences: (mean, std, t, two-sided p); t and p are None below two seeds or
    when every difference is the same."""
    d = [float(v) for v in differences]
    n = len(d)
    if n == 0:
        return None, None, None, None
    mean = sum(d) / n
    if n < 2:
        return mean, None, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    if std == 0:
        return mean, 0.0, None, None
    t = mean / (std / math.sqrt(n))
    p = regularized_beta((n - 1) / 2, 0.5, (n - 1) / ((n - 1) + t * t))
    return mean, std, t, p


def paired_difference(a, b):
    """Mean of a - b over the same test samples and its standard error, sqrt(var(a - b) / n)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2:
        return float(d.mean()) if d.size else None, None
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def per_class_accuracy(correct, labels, num_classes):
    """Accuracy of each class (num_classes,), NaN for a class without test samples."""
    correct = np.asarray(correct, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    hits = np.bincount(labels, weights=correct, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
