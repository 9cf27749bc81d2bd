"""The C++ contrast kernels against a float64 numpy reference of transformers' formulas."""

import numpy as np
import pytest

from dola_cpp import _core


def log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z)
    return z - m - np.log(np.sum(np.exp(z - m)))


def jsd_ref(lp, lq):
    p, q = np.exp(lp), np.exp(lq)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        logm = np.log(m)
        kl1 = np.where(m > 0, m * (logm - lp), 0.0)
        kl2 = np.where(m > 0, m * (logm - lq), 0.0)
    return 0.5 * (kl1.mean() + kl2.mean())


def dola_ref(z_mature, z_cand, relative_top=0.1):
    lp = log_softmax(z_mature)
    lqs = [log_softmax(z) for z in z_cand]
    if len(lqs) == 1:
        idx, js = 0, np.zeros(0)
    else:
        js = np.array([jsd_ref(lp, lq) for lq in lqs])
        idx = int(np.argmax(js))
    lq = lqs[idx].copy()
    scores = lp - lq
    if relative_top > 0:
        thr = lp.max() + np.log(relative_top)
        scores[lp < thr] = -np.inf
    return idx, js, scores


def test_log_softmax_matches_numpy():
    rng = np.random.default_rng(1)
    z = (rng.normal(size=49152) * 8).astype(np.float32)
    np.testing.assert_allclose(_core.kernels.log_softmax(z), log_softmax(z), atol=2e-5)


def test_log_softmax_hand_computed():
    # [0, ln 2, ln 3, ln 4] -> probabilities 0.1, 0.2, 0.3, 0.4
    z = np.log(np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32))
    np.testing.assert_allclose(np.exp(_core.kernels.log_softmax(z)), [0.1, 0.2, 0.3, 0.4], atol=1e-6)


def test_jsd_hand_computed():
    # p = [0.5, 0.5], q = [0.9, 0.1] -> M = [0.7, 0.3]; torch's kl_div(log p, M) = M (ln M - ln p)
    # mean over V=2: (0.7 ln 1.4 + 0.3 ln 0.6) / 2 = 0.0411417; (0.7 ln(7/9) + 0.3 ln 3) / 2 = 0.0768320
    p = np.log(np.array([0.5, 0.5], dtype=np.float32))
    q = np.log(np.array([0.9, 0.1], dtype=np.float32))
    assert _core.kernels.jsd(p, q) == pytest.approx(0.5 * (0.0411417 + 0.0768320), abs=1e-6)
    assert _core.kernels.jsd(p, p) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("V", [4099, 3 * 4096 + 5], ids=["V4099", "V12293"])  # not multiples of a vector or block
@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0], ids=["unit", "peaked", "huge"])
def test_dola_step_random(K, scale, V):
    rng = np.random.default_rng(K * 7 + int(scale))
    zm = (rng.normal(size=V) * scale).astype(np.float32)
    zc = (rng.normal(size=(K, V)) * scale).astype(np.float32)
    idx, js, scores = _core.kernels.dola_step(zm, zc, 0.1)
    ridx, rjs, rscores = dola_ref(zm, zc)
    assert idx == ridx
    np.testing.assert_allclose(js, rjs, rtol=2e-4, atol=1e-9)
    finite = np.isfinite(rscores)
    assert np.array_equal(np.isfinite(scores), finite)
    np.testing.assert_allclose(scores[finite], rscores[finite], rtol=1e-5, atol=1e-3)
    assert np.all(scores[~finite] == -np.inf)


def test_single_candidate_is_static():
    zm = np.array([2.0, 1.0, 0.5, -3.0], dtype=np.float32)
    zc = np.array([[0.0, 1.5, 0.5, 0.0]], dtype=np.float32)
    idx, js, scores = _core.kernels.dola_step(zm, zc, 0.1)
    assert idx == 0 and js.size == 0
    lp, lq = log_softmax(zm), log_softmax(zc[0])
    thr = lp.max() + np.log(0.1)
    expected = np.where(lp < thr, -np.inf, lp - lq)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert scores[3] == -np.inf  # p = e^-3 relative to e^2: below 10% of the top token


def test_ties_pick_the_first_candidate():
    zm = np.array([3.0, 1.0, 0.0, -1.0], dtype=np.float32)
    same = np.array([0.0, 2.0, 1.0, 0.0], dtype=np.float32)
    zc = np.stack([same, same, same])
    idx, js, _ = _core.kernels.dola_step(zm, zc, 0.1)
    assert idx == 0
    assert js[0] == js[1] == js[2]


def test_minus_infinity_and_extreme_logits():
    V = 64
    zm = np.full(V, -1e4, dtype=np.float32)
    zm[5] = 1e4  # one-hot mature distribution
    zc = np.zeros((2, V), dtype=np.float32)
    zc[1, 5] = 80.0  # second candidate agrees with the mature layer
    idx, js, scores = _core.kernels.dola_step(zm, zc, 0.1)
    assert np.all(np.isfinite(js))
    assert idx == 0  # the uniform candidate is the more different one
    assert np.isfinite(scores[5]) and np.sum(np.isfinite(scores)) == 1
    assert np.all(scores[np.arange(V) != 5] == -np.inf)
    # -inf inputs to the JSD give finite results (terms with M = 0 contribute 0)
    lp = np.full(V, -np.inf, dtype=np.float32)
    lp[0] = 0.0
    assert np.isfinite(_core.kernels.jsd(lp, lp)) and _core.kernels.jsd(lp, lp) == pytest.approx(0.0, abs=1e-9)


def test_relative_top_zero_disables_filter():
    rng = np.random.default_rng(3)
    zm = rng.normal(size=100).astype(np.float32) * 10
    zc = rng.normal(size=(1, 100)).astype(np.float32)
    _, _, scores = _core.kernels.dola_step(zm, zc, 0.0)
    assert np.all(np.isfinite(scores))


def test_repetition_penalty_like_transformers():
    s = np.array([2.0, -2.0, 1.0, 0.0, -0.5], dtype=np.float32)
    out = _core.kernels.repetition_penalty(s, np.array([0, 1, 1, 4, 99, -3], dtype=np.int32), 1.25)
    # each id once, out-of-range ids ignored: positive / θ, negative * θ
    np.testing.assert_allclose(out, [1.6, -2.5, 1.0, 0.0, -0.625], rtol=1e-6)


def test_lm_score_diff_post_softmax_and_mask():
    lp = log_softmax(np.array([3.0, 2.9, 0.0, -5.0])).astype(np.float32)
    lq = log_softmax(np.array([0.0, 1.0, 0.0, 0.0])).astype(np.float32)
    diff = _core.kernels.lm_score_diff(lp, lq, True, 0.1, -1000.0)
    raw = lp.astype(np.float64) - lq
    ref = log_softmax(raw)
    mask = lp < lp.max() + np.log(0.1)
    ref[mask] = -1000.0
    np.testing.assert_allclose(diff, ref, atol=1e-5)
    assert mask.tolist() == [False, False, True, True]


@pytest.mark.parametrize("V", [4099, 9 * 4096 + 1])
@pytest.mark.parametrize("K", [2, 5, 8])
def test_dola_step_threads_do_not_change_the_result(K, V):
    """The passes run over fixed 4096-entry blocks of every row, split over the threads."""
    rng = np.random.default_rng(K)
    zm = rng.normal(size=V).astype(np.float32) * 3
    zc = rng.normal(size=(K, V)).astype(np.float32) * 3
    one = _core.kernels.dola_step(zm, zc, 0.1, 1)
    for n_threads in (2, 3, 16):
        many = _core.kernels.dola_step(zm, zc, 0.1, n_threads)
        assert many[0] == one[0]
        np.testing.assert_array_equal(many[1], one[1])
        np.testing.assert_array_equal(many[2], one[2])


def test_a_row_without_finite_logits_takes_the_plain_passes():
    rng = np.random.default_rng(5)
    zm = rng.normal(size=5000).astype(np.float32)
    zc = rng.normal(size=(2, 5000)).astype(np.float32)
    zc[1] = -np.inf
    idx, js, scores = _core.kernels.dola_step(zm, zc, 0.1, 2)
    expected = _core.kernels.jsd(log_softmax(zm).astype(np.float32), log_softmax(zc[0]).astype(np.float32))
    assert js[0] == pytest.approx(expected, rel=1e-5)
    assert np.isnan(js[1]) and idx == 0 and np.isfinite(scores).any()
