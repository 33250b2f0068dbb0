"""lib/stats.py against scipy (installed with scikit-learn): the paired t-test and the incomplete beta."""
import numpy as np
import pytest
from scipy import special, stats

from lib.stats import paired_difference, paired_t_test, per_class_accuracy, regularized_beta


@pytest.mark.parametrize("a,b,x", [(0.5, 0.5, 0.3), (1.0, 0.5, 0.9), (2.5, 0.5, 0.01), (10.0, 0.5, 0.999)])
def test_regularized_beta_matches_scipy(a, b, x):
    assert regularized_beta(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("diffs", [[1.0, 2.0, 1.5], [0.5, -0.2, 0.3, 0.1, 0.4], [-3.0, -1.0], [0.28, 0.28, 0.56]])
def test_paired_t_test_matches_scipy(diffs):
    mean, std, t, p = paired_t_test(diffs)
    ref = stats.ttest_1samp(diffs, 0.0)
    assert mean == pytest.approx(np.mean(diffs)) and std == pytest.approx(np.std(diffs, ddof=1))
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=1e-7)


def test_degenerate_inputs_give_no_test():
    assert paired_t_test([]) == (None, None, None, None)
    assert paired_t_test([0.5]) == (0.5, None, None, None)
    assert paired_t_test([0.5, 0.5]) == (0.5, 0.0, None, None)


def test_paired_difference_and_per_class_accuracy():
    a, b = np.array([1, 1, 0, 1]), np.array([1, 0, 0, 0])
    mean, se = paired_difference(a, b)
    assert mean == 0.5 and se == pytest.approx(np.std(a - b, ddof=1) / 2)
    acc = per_class_accuracy([1, 0, 1, 1], [0, 0, 1, 2], 4)
    assert acc[:3].tolist() == [0.5, 1.0, 1.0] and np.isnan(acc[3])
