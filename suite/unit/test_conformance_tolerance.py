"""The bf16 logprob tolerance (reference_impl.conformance): fixed where logprobs are moderate, growing with
|logprob| where the policy is sharp, and still failing on a systematic error at any scale."""
import pytest

from reference_impl import conformance as C


def _rows(values, shift=0.0, scale=1.0):
    return [[v * scale + shift for v in row] for row in values]


MODERATE = [[-2.0, -3.5, -1.2, -4.0], [-0.5, -2.2, -3.1, -6.0]]
SHARP = [[-27.0, -35.0, -44.0, -20.0], [-30.0, -25.0, -18.0, -40.0]]


def test_small_noise_at_moderate_logprobs_passes():
    d = C.assert_matches(_rows(MODERATE, shift=0.02), MODERATE, "noise")
    assert d.max_abs == pytest.approx(0.02)


def test_a_tenth_of_a_nat_everywhere_at_moderate_logprobs_fails():
    # mean bound there is 0.05 + 2^-6 * 2.8 ~ 0.094: a uniform 0.12 shift is a wrong adapter, not rounding
    with pytest.raises(C.ConformanceError, match="beyond bf16 tolerance"):
        C.assert_matches(_rows(MODERATE, shift=0.12), MODERATE, "shifted")


def test_rounding_sized_error_at_sharp_logprobs_passes():
    # ~1% of |logprob| (what 2xH200 measured at mean |ref| 27): within 4 bf16 ulps of the value
    C.assert_matches(_rows(SHARP, scale=1.01), SHARP, "sharp policy")


def test_systematic_scale_error_at_sharp_logprobs_fails():
    # a LoRA applied with the wrong scaling shows as a few percent of every logprob
    with pytest.raises(C.ConformanceError):
        C.assert_matches(_rows(SHARP, scale=1.05), SHARP, "mis-scaled")


def test_one_outlier_position_fails_on_its_own_bound():
    bad = [row[:] for row in MODERATE]
    bad[1][2] += 0.4   # |ref| 3.1: bound 0.15 + 0.097
    with pytest.raises(C.ConformanceError, match="exceeds its bound"):
        C.assert_matches(bad, MODERATE, "outlier")
