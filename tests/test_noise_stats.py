"""The in-kernel Gaussian noise (Philox4x32-10 + Box-Muller, see
fastdiff/reference/noise.py): its distribution, independence, determinism,
agreement with the reference stream and its layout rule.

Statistical thresholds. Every statistic below is compared with its standard
error under the null hypothesis (iid N(0, 1) samples, n of them):

    mean            SE = 1 / sqrt(n)
    variance s^2    SE = sqrt(2 / (n - 1))                    (Var s^2 = 2 sigma^4 / (n-1))
    skewness g1     SE = sqrt(6 n (n-1) / ((n-2)(n+1)(n+3)))   ~ sqrt(6 / n)
    excess kurt g2  SE = sqrt(24 n (n-1)^2 / ((n-3)(n-2)(n+3)(n+5)))  ~ sqrt(24 / n)
    correlation r   SE = 1 / sqrt(n)       (two independent series of length n)
    a count k of an event of probability p:  SE = sqrt(n p (1 - p))

and a test fails at |z| >= 5, a two-sided false-alarm rate of 5.7e-7 per
statistic (p-value tests: p < 1e-6). With the fixed keys used here the
outcome is deterministic anyway; the thresholds say how unlikely a failure
of a correct generator would be for an arbitrary key.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

scipy_stats = pytest.importorskip("scipy.stats")

import fastdiff  # noqa: E402
from fastdiff import NoiseSchedule  # noqa: E402
from fastdiff.reference import noise_like, philox_normal  # noqa: E402

Z = 5.0  # |z| bound, false-alarm rate ~5.7e-7 per statistic
P_MIN = 1e-6  # p-value bound
ROWS, COLS = 64, 65536  # 4,194,304 samples
KEY = torch.tensor([0x1234_5678_9ABC_DEF0 - 2**63, 7], dtype=torch.int64)
T = 1000


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.make("linear", T)


@pytest.fixture(scope="module")
def big(sched):
    """~4M noise values from q_sample (x0 = 0, every row at its own t), as
    returned (float32 (ROWS, COLS)) and flattened to float64 numpy."""
    x0 = torch.zeros(ROWS, COLS)
    t = torch.linspace(0, T - 1, ROWS).long()
    xt, nz = fastdiff.q_sample(x0, t, sched, key=KEY)
    assert nz.shape == x0.shape and nz.dtype == torch.float32
    return nz, nz.double().reshape(-1).numpy()


def _z_ok(stat, se, what):
    z = stat / se
    assert abs(z) < Z, f"{what}: {stat:.3e} is {z:+.2f} standard errors from its expectation"


def _moments_check(z: np.ndarray, what: str):
    n = z.size
    _z_ok(z.mean(), 1 / math.sqrt(n), f"{what} mean")
    _z_ok(z.var(ddof=1) - 1.0, math.sqrt(2 / (n - 1)), f"{what} variance")
    se_skew = math.sqrt(6.0 * n * (n - 1) / ((n - 2) * (n + 1) * (n + 3)))
    se_kurt = math.sqrt(24.0 * n * (n - 1) ** 2 / ((n - 3) * (n - 2) * (n + 3) * (n + 5)))
    _z_ok(scipy_stats.skew(z, bias=False), se_skew, f"{what} skewness")
    _z_ok(scipy_stats.kurtosis(z, fisher=True, bias=False), se_kurt, f"{what} excess kurtosis")


# ------------------------------------------------------- distribution -------
def test_moments(big):
    _moments_check(big[1], "all")


@pytest.mark.parametrize("lane", range(4))
def test_moments_per_philox_lane(big, lane):
    """Element i uses output lane i % 4 of its Philox call (r_a cos, r_a sin,
    r_b cos, r_b sin): each lane alone must be N(0, 1)."""
    _moments_check(big[1][lane::4], f"lane {lane}")


def test_kolmogorov_smirnov(big):
    res = scipy_stats.kstest(big[1], "norm")
    assert res.pvalue > P_MIN, res


def test_chi_square_binned(big):
    """200 equiprobable bins of N(0,1) (edges at its quantiles)."""
    z = big[1]
    k = 200
    edges = scipy_stats.norm.ppf(np.linspace(0, 1, k + 1)[1:-1])
    counts = np.bincount(np.searchsorted(edges, z), minlength=k)
    assert counts.sum() == z.size
    res = scipy_stats.chisquare(counts)  # expected: uniform, n / k each
    assert res.pvalue > P_MIN, res


@pytest.mark.parametrize("c", [2.0, 3.0, 4.0, 4.5])
def test_tail_frequencies(big, c):
    """P(|z| > c) as for N(0,1): Box-Muller's radius must reach the tails
    (u is never 0, so |z| <= sqrt(-2 ln 2^-33) ~ 6.8 by construction)."""
    z = big[1]
    n = z.size
    p = 2 * scipy_stats.norm.sf(c)
    k = int((np.abs(z) > c).sum())
    _z_ok(k - n * p, math.sqrt(n * p * (1 - p)), f"count of |z| > {c}")
    assert np.abs(z).max() < math.sqrt(-2 * math.log(2.0**-33)) + 1e-3
    assert np.isfinite(z).all()


# ------------------------------------------------------- independence -------
def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("lag", range(1, 9))
def test_autocorrelation(big, lag):
    """Serial correlation in memory order, of the values and of their squares
    (lanes 0/1 and 2/3 share a Box-Muller radius: z_a cos and z_a sin are
    independent only if the radius and angle are used correctly)."""
    z = big[1]
    n = z.size - lag
    se = 1 / math.sqrt(n)
    _z_ok(_corr(z[:-lag], z[lag:]), se, f"lag-{lag} autocorrelation")
    z2 = z * z
    _z_ok(_corr(z2[:-lag], z2[lag:]), se, f"lag-{lag} autocorrelation of z^2")


def test_rows_are_independent(big):
    """Rows (batch samples) are uncorrelated: every pairwise correlation of
    the 64 rows (2016 pairs; r sqrt(COLS) ~ N(0,1)) is below 6.5 SE (a
    family-wise false-alarm rate ~2e-7), and sum r^2 COLS ~ chi2(2016). Row
    means are N(0, 1/COLS): their sum of squares ~ chi2(64)."""
    nz = big[0].double()
    c = torch.corrcoef(nz)
    iu = torch.triu_indices(ROWS, ROWS, 1)
    r = c[iu[0], iu[1]].numpy() * math.sqrt(COLS)
    assert np.abs(r).max() < 6.5, np.abs(r).max()
    assert scipy_stats.chi2.sf((r**2).sum(), r.size) > P_MIN
    assert scipy_stats.chi2.cdf((r**2).sum(), r.size) > P_MIN  # not suspiciously small either
    m = nz.mean(1).numpy() * math.sqrt(COLS)
    assert scipy_stats.chi2.sf((m**2).sum(), ROWS) > P_MIN


def test_noise_does_not_depend_on_t_or_x0(sched):
    """The stream depends on the key and the element position only."""
    x0 = torch.zeros(8, 4, 16, 16)
    a = fastdiff.q_sample(x0, 500, sched, key=KEY)[1]
    b = fastdiff.q_sample(x0, torch.tensor([0, 999, 3, 500, 7, 250, 998, 1]), sched, key=KEY)[1]
    c = fastdiff.q_sample(torch.randn_like(x0), torch.arange(8) * 100, sched, key=KEY)[1]
    assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------- agreement with x_t ---------
def test_returned_noise_is_the_noise_in_x_t(sched):
    """x_t is sqrt(abar) x0 + sqrt(1-abar) eps for the eps returned, and the
    eps implied by x_t is the returned one.

    float32 arithmetic (coefficient rounded to float32, two products, a sum)
    errs by at most ~3 units of 2^-24 relative to |a x0| + |b eps| (the sum
    may cancel, so ulps of x_t itself are no measure; measured <= 2.4)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 4096, generator=g)
    t = torch.randint(0, T, (64,), generator=g)
    xt, nz = fastdiff.q_sample(x0, t, sched, key=KEY)
    ab = sched.alphas_cumprod[t][:, None]
    a, b = ab.sqrt(), (1 - ab).sqrt()
    exact = a * x0.double() + b * nz.double()
    bound = 4 * 2.0**-24 * (a * x0.double().abs() + b * nz.double().abs())
    assert bool(((xt.double() - exact).abs() <= bound).all())
    # the eps implied by x_t: off by at most x_t's error divided by sqrt(1 - abar) (>= 0.01)
    implied = (xt.double() - a * x0.double()) / b
    assert bool(((implied - nz.double()).abs() <= bound / b + 1e-12).all())
    torch.testing.assert_close(implied, nz.double(), rtol=0, atol=1e-4)
    # x0 = 0 at the last t: x_t is (almost) the noise itself
    xt0, nz0 = fastdiff.q_sample(torch.zeros(4, 1024), T - 1, sched, key=KEY)
    torch.testing.assert_close(xt0.double(), (1 - sched.alphas_cumprod[-1]).sqrt() * nz0.double(),
                               rtol=1e-6, atol=1e-7)
    # without writing the noise out: same x_t; the noise given back: same x_t, bitwise
    xt2, none = fastdiff.q_sample(x0, t, sched, key=KEY, return_noise=False)
    assert none is None and torch.equal(xt2, xt)
    assert torch.equal(fastdiff.q_sample(x0, t, sched, nz)[0], xt)


# -------------------------------------------------------- determinism ------
def test_same_key_same_output(sched):
    x0 = torch.randn(16, 3, 32, 32)
    t = torch.arange(16) * 60
    a = fastdiff.q_sample(x0, t, sched, key=KEY)
    b = fastdiff.q_sample(x0, t, sched, key=KEY.clone())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_global_seed_reproduces(sched):
    x0 = torch.zeros(8, 3, 32, 32)
    torch.manual_seed(1234)
    a1 = fastdiff.q_sample(x0, 10, sched)[1]
    a2 = fastdiff.q_sample(x0, 10, sched)[1]  # the global state moved on
    torch.manual_seed(1234)
    b1 = fastdiff.q_sample(x0, 10, sched)[1]
    b2 = fastdiff.q_sample(x0, 10, sched)[1]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    n = a1.numel()
    _z_ok(_corr(a1.double().flatten().numpy(), a2.double().flatten().numpy()), 1 / math.sqrt(n),
          "consecutive draws")


def test_generator_argument(sched):
    x0 = torch.zeros(8, 3, 32, 32)
    a = fastdiff.q_sample(x0, 10, sched, generator=torch.Generator().manual_seed(5))[1]
    b = fastdiff.q_sample(x0, 10, sched, generator=torch.Generator().manual_seed(5))[1]
    c = fastdiff.q_sample(x0, 10, sched, generator=torch.Generator().manual_seed(6))[1]
    k = fastdiff.draw_key(torch.Generator().manual_seed(5))
    d = fastdiff.q_sample(x0, 10, sched, key=k)[1]
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("other", [
    [1, 0], [0, 1],  # seed / offset low words differ
    [2**32, 0], [0, 2**32],  # only the high words differ
    [-(2**63), 0], [0, -1],
], ids=["seed_lo", "offset_lo", "seed_hi", "offset_hi", "seed_sign", "offset_all_ones"])
def test_different_keys_are_uncorrelated(sched, other):
    base = torch.tensor([0, 0], dtype=torch.int64)
    key = torch.tensor(other, dtype=torch.int64)
    x0 = torch.zeros(4, 65536)
    a = fastdiff.q_sample(x0, 0, sched, key=base)[1].double().flatten().numpy()
    b = fastdiff.q_sample(x0, 0, sched, key=key)[1].double().flatten().numpy()
    assert not np.array_equal(a, b)
    _z_ok(_corr(a, b), 1 / math.sqrt(a.size), f"keys {base.tolist()} vs {other}")
    _moments_check(b, f"key {other}")


def test_draw_key():
    g = torch.Generator().manual_seed(11)
    k1, k2 = fastdiff.draw_key(g), fastdiff.draw_key(g)
    assert k1.dtype == torch.int64 and k1.shape == (2,) and k1.device.type == "cpu"
    assert not torch.equal(k1, k2)  # it consumes generator state
    g.manual_seed(11)
    assert torch.equal(fastdiff.draw_key(g), k1) and torch.equal(fastdiff.draw_key(g), k2)
    # ... as any other draw from the generator would
    g.manual_seed(11)
    fastdiff.draw_key(g)
    after = torch.rand(4, generator=g)
    assert not torch.equal(after, torch.rand(4, generator=torch.Generator().manual_seed(11)))
    # the global generator
    torch.manual_seed(99)
    a1, a2 = fastdiff.draw_key(), fastdiff.draw_key()
    torch.manual_seed(99)
    assert torch.equal(fastdiff.draw_key(), a1) and torch.equal(fastdiff.draw_key(), a2)
    assert not torch.equal(a1, a2)
    # keys drawn from different seeds differ
    keys = {tuple(fastdiff.draw_key(torch.Generator().manual_seed(s)).tolist()) for s in range(64)}
    assert len(keys) == 64


# ------------------------------------------------ the reference stream ------
def _box_muller_tol(stream: torch.Tensor) -> torch.Tensor:
    """How far the kernels' float32 Box-Muller may be from the float64
    reference, per element of a reference ``stream`` (in stream order).

    ``stream`` has an even length. Elements 2k, 2k+1 share a radius r = sqrt(-2 ln u). In float32 the angle
    2 pi v carries ~3 roundings (<= ~1.2e-6 absolute, times r), and u near 1
    is known to ~6e-8, so r^2 = -2 ln u to ~1.2e-7 + rounding, i.e. r to
    ~1.2e-7 / r: |dz| <= 2e-6 r + 2.5e-7 / r (measured <= 0.15 of this over
    4M samples). For most elements that is a few 1e-6; tiny |z| (u ~ 1)
    have large relative errors (the worst of 4M: 2.1e-5 at z = 8e-4)."""
    r = stream.double().reshape(-1, 2).pow(2).sum(1).sqrt().repeat_interleave(2)
    return 2e-6 * r + 2.5e-7 / r


def _assert_stream(got: torch.Tensor, key: torch.Tensor, extra=None):
    """got (flattened in stream order) is the key's stream; ``extra(want)``:
    an additional per-element tolerance (the rounding to a low-precision dtype)."""
    got = got.reshape(-1).double()
    n = got.numel()
    pairs = philox_normal(key, n + n % 2)  # (an odd last element's partner lies beyond the tensor)
    want = pairs[:n]
    diff = (got - want).abs()
    tol = _box_muller_tol(pairs)[:n] + (0 if extra is None else extra(want))
    bad = diff > tol
    assert not bool(bad.any()), (f"{int(bad.sum())} elements off, first at {int(bad.nonzero()[0])}: "
                                 f"{got[bad][:4].tolist()} vs {want[bad][:4].tolist()}")
    if extra is None:
        assert float((diff <= 1e-5).double().mean()) > 0.999  # "to ~1e-5"


@pytest.mark.parametrize("key", [
    [0, 0], [1, 0], [-1, -1], [2**62 + 12345, 2**40 + 3], [-(2**63), 2**63 - 1], KEY.tolist(),
], ids=["zero", "one", "minus_one", "large", "extremes", "KEY"])
def test_matches_reference_stream(sched, key):
    """fastdiff.reference.philox_normal (float64) is the definition; the
    kernel's Box-Muller is float32, hence ~1e-6 differences (up to |z| ~ 5)."""
    k = torch.tensor(key, dtype=torch.int64)
    x0 = torch.zeros(4, 3, 64, 64)  # 49152 elements, 12288 Philox calls
    nz = fastdiff.q_sample(x0, 123, sched, key=k)[1]
    _assert_stream(nz, k)
    assert torch.equal(noise_like(x0, k).reshape(-1), philox_normal(k, x0.numel()))


@pytest.mark.parametrize("shape", [(1,), (3,), (2, 1), (5, 7), (2, 3, 5, 7), (7, 1001), (3, 100003)])
def test_odd_sizes_follow_the_stream(sched, shape):
    """Sizes that are not multiples of 4 (a partial last Philox group) and
    rows that do not start on a group boundary: still the one stream over the
    whole tensor, in memory order."""
    k = torch.tensor([987654321, 12345], dtype=torch.int64)
    nz = fastdiff.q_sample(torch.zeros(shape), 10, sched, key=k)[1]
    _assert_stream(nz, k)
    if len(shape) == 4:
        xc = torch.zeros(shape).to(memory_format=torch.channels_last)
        _assert_stream(fastdiff.q_sample(xc, 10, sched, key=k)[1].permute(0, 2, 3, 1), k)


def test_reference_philox_known_answer():
    """Philox4x32-10 known-answer vectors (Random123's kat_vectors), so the
    reference itself is the published generator."""
    from fastdiff.reference import philox4x32

    def run(ctr, key):
        out = philox4x32(*[torch.tensor(c) for c in ctr], *key)
        return [int(v) for v in out]

    assert run([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(sched, dtype):
    """The noise is the same stream in every dtype, within the float32
    Box-Muller's error plus one rounding to the dtype (float64 data gets the
    float32 Box-Muller values, widened)."""
    x0 = torch.zeros(4, 3, 32, 32, dtype=dtype)
    nz = fastdiff.q_sample(x0, 5, sched, key=KEY)[1]
    assert nz.dtype == dtype

    def ulp(want):
        wa = want.abs().to(dtype)
        return torch.nextafter(wa, torch.full_like(wa, float("inf"))).double() - wa.double()

    _assert_stream(nz, KEY, extra=None if dtype == torch.float64 else ulp)
    if dtype != torch.float64:  # the float32 noise rounded once
        nz32 = fastdiff.q_sample(x0.float(), 5, sched, key=KEY)[1]
        assert bool(((nz.double() - nz32.double()).abs() <= ulp(nz32.double())).all())


# ----------------------------------------------------------- layout --------
def test_channels_last_memory_order(sched):
    """A channels_last x0 is used as it is (dense, batch-major): the stream is
    laid out in its memory order (N, H, W, C), and the outputs keep the layout."""
    x0 = torch.zeros(4, 3, 16, 16).to(memory_format=torch.channels_last)
    xt, nz = fastdiff.q_sample(x0, 500, sched, key=KEY)
    assert nz.stride() == x0.stride() and xt.stride() == x0.stride()
    _assert_stream(nz.permute(0, 2, 3, 1), KEY)  # memory order of channels_last: N, H, W, C
    ref = noise_like(x0, KEY)
    assert ref.stride() == x0.stride()
    assert torch.equal(ref.permute(0, 2, 3, 1).reshape(-1), philox_normal(KEY, x0.numel()))
    # an NCHW x0 gets the same stream in NCHW order: the same values, elsewhere
    nz_nchw = fastdiff.q_sample(x0.contiguous(), 500, sched, key=KEY)[1]
    _assert_stream(nz_nchw, KEY)
    assert torch.equal(nz.permute(0, 2, 3, 1).reshape(-1), nz_nchw.reshape(-1))
    assert not torch.equal(nz.contiguous(), nz_nchw)


@pytest.mark.parametrize("kind", ["transposed", "strided_slice", "expanded"])
def test_non_canonical_layouts_use_contiguous_order(sched, kind):
    """A primary that is not dense and batch-major is made contiguous first:
    the stream follows the contiguous (row-major) order."""
    base = torch.zeros(3, 4, 8, 8)
    if kind == "transposed":  # dense, not batch-major
        x0 = base.transpose(0, 1)
    elif kind == "strided_slice":  # not dense
        x0 = torch.zeros(4, 6, 8, 8)[:, ::2]
    else:  # overlapping
        x0 = torch.zeros(1, 3, 8, 8).expand(4, 3, 8, 8)
    xt, nz = fastdiff.q_sample(x0, 500, sched, key=KEY)
    assert nz.is_contiguous() and xt.is_contiguous()
    _assert_stream(nz, KEY)
    assert torch.equal(nz, fastdiff.q_sample(x0.contiguous(), 500, sched, key=KEY)[1])


# ------------------------------------------ noise of the reverse steps ------
def test_ddpm_step_key_noise(sched):
    """ddpm_step(key=k) adds std * noise_like(sample, k); samples at t = 0 get none."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(6, 3, 16, 16, generator=g)
    out = torch.randn(6, 3, 16, 16, generator=g)
    t = torch.tensor([999, 500, 0, 1, 250, 0])
    a = fastdiff.ddpm_step(out, t, x, sched, key=KEY)
    nz = fastdiff.q_sample(torch.zeros_like(x), 0, sched, key=KEY)[1]  # the kernels' stream for x's layout
    _assert_stream(nz, KEY)
    b = fastdiff.ddpm_step(out, t, x, sched, noise=nz)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(a[1], b[1])
    ref = fastdiff.ddpm_step(out, t, x, sched, noise=noise_like(x, KEY).float())[0]
    torch.testing.assert_close(a[0], ref, rtol=1e-4, atol=1e-4)
    mean = fastdiff.ddpm_step(out, t, x, sched, noise=torch.zeros_like(x))[0]
    assert torch.equal(a[0][t == 0], mean[t == 0])
    assert not torch.equal(a[0][t > 0], mean[t > 0])
    # channels_last sample: memory order
    xc, oc = x.to(memory_format=torch.channels_last), out.to(memory_format=torch.channels_last)
    c = fastdiff.ddpm_step(oc, t, xc, sched, key=KEY)
    nzc = fastdiff.q_sample(torch.zeros_like(xc), 0, sched, key=KEY)[1]
    assert nzc.stride() == xc.stride()
    d = fastdiff.ddpm_step(oc, t, xc, sched, noise=nzc)
    torch.testing.assert_close(c[0], d[0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(c[0], a[0])  # a different layout draws the stream in a different order


def test_ddim_step_key_noise(sched):
    g = torch.Generator().manual_seed(22)
    x = torch.randn(4, 3, 16, 16, generator=g)
    out = torch.randn(4, 3, 16, 16, generator=g)
    t = torch.tensor([999, 500, 20, 1])
    tp = t - 20
    nz = fastdiff.q_sample(torch.zeros_like(x), 0, sched, key=KEY)[1]
    a = fastdiff.ddim_step(out, t, x, sched, t_prev=tp.clamp(min=-1), eta=1.0, key=KEY)[0]
    b = fastdiff.ddim_step(out, t, x, sched, t_prev=tp.clamp(min=-1), eta=1.0, noise=nz)[0]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # eta = 0 draws nothing: the key does not matter
    c = fastdiff.ddim_step(out, t, x, sched, t_prev=tp.clamp(min=-1), eta=0.0, key=KEY)[0]
    d = fastdiff.ddim_step(out, t, x, sched, t_prev=tp.clamp(min=-1), eta=0.0)[0]
    assert torch.equal(c, d)


def test_diffusion_loss_regenerates_the_noise(sched):
    """diffusion_loss(key=k) uses the eps q_sample(key=k) drew."""
    g = torch.Generator().manual_seed(23)
    x0 = torch.randn(8, 3, 16, 16, generator=g)
    t = torch.randint(0, T, (8,), generator=g)
    xt, nz = fastdiff.q_sample(x0, t, sched, key=KEY)
    pred = torch.randn(8, 3, 16, 16, generator=g)
    for target in ("epsilon", "sample", "v_prediction"):
        a = fastdiff.diffusion_loss(pred, x0, t, sched, key=KEY, target=target, reduction="none")
        b = fastdiff.diffusion_loss(pred, x0, t, sched, nz, target=target, reduction="none")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a prediction equal to the noise has (almost) zero epsilon loss
    z = fastdiff.diffusion_loss(nz, x0, t, sched, key=KEY, reduction="none")
    assert float(z.max()) < 1e-10
