"""GaussianDiffusion: loss, samplers and the variational bound.

The samplers and the bound are checked against analytic oracles. For data
x0 ~ N(MU, S^2), i.i.d. per coordinate, the posterior of x0 given
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps is Gaussian, and the optimal
(MMSE) noise predictor is affine in x_t:

    eps*(x, t) = sqrt(1 - ab) (x - sqrt(ab) MU) / (ab S^2 + 1 - ab),   ab = abar_t.

Driven by it, every sampler step is an affine map plus independent Gaussian
noise, so the exact mean and variance of the sampler's output follow step by
step (``chain_moments`` below). Finite-step samplers are legitimately biased
away from (MU, S^2): the tests compare with the chain's own exact moments.
Empirical moments are compared with z-scores at |z| < 5 (false alarm about
6e-7 per check; the output is exactly Gaussian, so Var(sample variance) =
2 V^2 / (M - 1)), and each case also checks that the *wrong* setting's exact
moments would be rejected by the same samples.
"""
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.diffusion.gaussian import GaussianDiffusion, discretized_gaussian_log_likelihood

Z_MAX = 5.0


# ------------------------------------------------------------- oracles -----
class GaussianOracle(nn.Module):
    """The exact optimal predictor for x0 ~ N(mu, s^2) per coordinate, for the
    epsilon / sample / v_prediction targets (all affine in x: a_t x + b_t).
    With ``var_value`` it also outputs a constant learned_range channel block."""

    def __init__(self, schedule: NoiseSchedule, mu: float, s: float, target: str = "epsilon",
                 var_value=None):
        super().__init__()
        ab = schedule.alphas_cumprod.double()
        d = ab * s * s + 1 - ab
        ea, eb = (1 - ab).sqrt() / d, -(1 - ab).sqrt() * ab.sqrt() * mu / d  # eps* = ea x + eb
        xa, xb = (1 - (1 - ab).sqrt() * ea) / ab.sqrt(), -(1 - ab).sqrt() * eb / ab.sqrt()  # x0* = E[x0 | x]
        if target == "epsilon":
            a, b = ea, eb
        elif target == "sample":
            a, b = xa, xb
        else:  # v = sqrt(ab) eps - sqrt(1 - ab) x0
            a, b = ab.sqrt() * ea - (1 - ab).sqrt() * xa, ab.sqrt() * eb - (1 - ab).sqrt() * xb
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.var_value = var_value

    def forward(self, x, t):
        shape = (-1,) + (1,) * (x.dim() - 1)
        out = self.a[t].to(x.dtype).reshape(shape) * x + self.b[t].to(x.dtype).reshape(shape)
        if self.var_value is not None:
            out = torch.cat([out, torch.full_like(out, self.var_value)], 1)
        return out


def chain_moments(abar: np.ndarray, ts, mu, s, method, variance_type="fixed_small", eta=0.0):
    """Exact (mean, variance) of a sampler's output driven by the oracle.

    Per step t -> tp (tp = -1 ends the chain; abar_prev = 1 there):
      eps = A x + B,   A = sqrt(1-ab)/D,  B = -sqrt(1-ab) sqrt(ab) mu / D,  D = ab s^2 + 1 - ab
      x0_hat = P x + Q,  P = (1 - sqrt(1-ab) A)/sqrt(ab),  Q = -sqrt(1-ab) B / sqrt(ab)
      DDPM:  beta' = 1 - ab/abp,  x' = c0 x0_hat + c1 x + sigma z,
             c0 = sqrt(abp) beta'/(1-ab), c1 = sqrt(1-beta') (1-abp)/(1-ab),
             sigma^2 = (1-abp)/(1-ab) beta' (fixed_small) or beta' (fixed_large)
      DDIM:  sigma^2 = eta^2 (1-abp)/(1-ab) (1 - ab/abp),
             x' = sqrt(abp) x0_hat + sqrt(1-abp-sigma^2) eps + sigma z
      final step: x' = x0_hat.
    So x' = a x + b + sigma z and (m, V) -> (a m + b, a^2 V + sigma^2), from (0, 1).
    """
    m, v = 0.0, 1.0
    ts = list(ts)
    for i, t in enumerate(ts):
        tp = ts[i + 1] if i + 1 < len(ts) else -1
        ab = abar[t]
        abp = abar[tp] if tp >= 0 else 1.0
        d = ab * s * s + 1 - ab
        A, B = math.sqrt(1 - ab) / d, -math.sqrt(1 - ab) * math.sqrt(ab) * mu / d
        P, Q = (1 - math.sqrt(1 - ab) * A) / math.sqrt(ab), -math.sqrt(1 - ab) * B / math.sqrt(ab)
        if tp < 0:
            m, v = P * m + Q, P * P * v
            continue
        if method == "ddpm":
            bp = 1 - ab / abp
            c0, c1 = math.sqrt(abp) * bp / (1 - ab), math.sqrt(1 - bp) * (1 - abp) / (1 - ab)
            sig2 = (1 - abp) / (1 - ab) * bp if variance_type == "fixed_small" else bp
            a, b = c0 * P + c1, c0 * Q
        else:
            sig2 = eta * eta * (1 - abp) / (1 - ab) * (1 - ab / abp)
            k = math.sqrt(max(1 - abp - sig2, 0.0))
            a, b = math.sqrt(abp) * P + k * A, math.sqrt(abp) * Q + k * B
        m, v = a * m + b, a * a * v + sig2
    return m, v


def moment_z(x: torch.Tensor, m: float, v: float) -> tuple[float, float]:
    """z-scores of the empirical mean and variance of the i.i.d. Gaussian
    values in x against the exact (m, v)."""
    x = x.double().flatten()
    M = x.numel()
    z_mean = (x.mean().item() - m) / math.sqrt(v / M)
    z_var = (x.var().item() - v) / (v * math.sqrt(2.0 / (M - 1)))
    return z_mean, z_var


def _np(t):
    return t.detach().cpu().double().numpy()


# --------------------------------------------------------- sampler oracle --
MU, S = 0.3, 0.1  # a small S makes the final variance sensitive to the variance choice

SAMPLER_CASES = [
    # (T, steps, spacing, method, variance_type, eta, target, n, alternative settings that must be rejected)
    (1000, 1000, "leading", "ddpm", "fixed_small", 0.0, "epsilon", 1024, dict(variance_type="fixed_large")),
    (1000, 1000, "leading", "ddpm", "fixed_large", 0.0, "epsilon", 1024, dict(variance_type="fixed_small")),
    (1000, 50, "leading", "ddim", "fixed_small", 0.0, "epsilon", 1024, dict(eta=1.0)),
    (1000, 50, "leading", "ddim", "fixed_small", 1.0, "epsilon", 1024, dict(eta=0.0)),
    (1000, 10, "leading", "ddim", "fixed_small", 0.0, "epsilon", 1024, dict(eta=1.0)),
    (1000, 10, "leading", "ddim", "fixed_small", 1.0, "epsilon", 1024, dict(eta=0.0)),
    (1000, 10, "trailing", "ddim", "fixed_small", 1.0, "v_prediction", 1024, dict(spacing="leading")),
    (1000, 10, "linspace", "ddim", "fixed_small", 0.5, "sample", 1024, dict(eta=1.0)),
    (1000, 50, "linspace", "ddpm", "fixed_large", 0.0, "v_prediction", 1024, dict(variance_type="fixed_small")),
    (1000, 50, "trailing", "ddpm", "fixed_small", 0.0, "sample", 1024, dict(variance_type="fixed_large")),
]


@pytest.mark.parametrize("T,steps,spacing,method,var,eta,target,n,alt", SAMPLER_CASES,
                         ids=[f"{c[3]}{c[1]}-{c[2]}-{c[4] if c[3] == 'ddpm' else 'eta' + str(c[5])}-{c[6]}"
                              for c in SAMPLER_CASES])
def test_sampler_matches_exact_chain_moments(T, steps, spacing, method, var, eta, target, n, alt):
    sched = NoiseSchedule.make("linear", T)
    model = GaussianOracle(sched, MU, S, target)
    diff = GaussianDiffusion(model, sched, sample_shape=(64,), target=target, variance_type=var, clip_sample=False)
    x = diff.sample(n, steps=steps, method=method, eta=eta, spacing=spacing,
                    generator=torch.Generator().manual_seed(1234))
    assert x.shape == (n, 64) and torch.isfinite(x).all()
    abar = _np(sched.alphas_cumprod)
    ts = sched.timesteps(steps, spacing).tolist()
    m, v = chain_moments(abar, ts, MU, S, method, var, eta)
    zm, zv = moment_z(x, m, v)
    assert abs(zm) < Z_MAX and abs(zv) < Z_MAX, f"mean {x.mean():.6f} vs {m:.6f} (z={zm:.2f}), var " \
                                                f"{x.var():.3e} vs {v:.3e} (z={zv:.2f})"
    # the test has power: the exact moments of the wrong setting are rejected by the same samples
    # (trailing ends at t = T/steps - 1, where eta hardly matters: its alternative is a wrong spacing)
    kw = dict(variance_type=var, eta=eta, spacing=spacing)
    kw.update(alt)
    ts2 = sched.timesteps(steps, kw.pop("spacing")).tolist()
    m2, v2 = chain_moments(abar, ts2, MU, S, method, **kw)
    zm2, zv2 = moment_z(x, m2, v2)
    assert max(abs(zm2), abs(zv2)) > 2 * Z_MAX, f"alternative {alt} not distinguishable (z={zm2:.1f}, {zv2:.1f})"


# ------------------------------------------------------------ nll oracle ---
NLL_MU, NLL_S = 0.2, 0.4  # mostly inside [-1, 1]; ~2.5% of values fall in the edge bins


def _decoder_logp_scipy(x0: float, mean, sd):
    """log P(bin of x0 | N(mean, sd^2)) with the 8-bit bins of [-1, 1] (edge
    bins open-ended), via scipy's normal CDF; ``mean`` may be an array."""
    from scipy.stats import norm
    h = 1.0 / 255
    hi, lo = (x0 + h - np.asarray(mean)) / sd, (x0 - h - np.asarray(mean)) / sd
    if x0 < -(1 - h):
        return norm.logcdf(hi)
    if x0 > 1 - h:
        return norm.logsf(lo)
    with np.errstate(divide="ignore"):  # log(0) = -inf far in the tails; callers compare finite values
        return np.where(lo > 0, np.log(norm.sf(lo) - norm.sf(hi)), np.log(norm.cdf(hi) - norm.cdf(lo)))


@functools.lru_cache(maxsize=None)
def exact_decoder_nats(ab0, logvar, mu, s):
    """E over x0 ~ N(mu, s^2) and x = sqrt(ab0) x0 + sqrt(1-ab0) e of
    -log P(x0 | N(x0_hat(x), exp(logvar))), by quadrature: Gauss-Hermite in e
    (the integrand is smooth in e), adaptive quad in x0 split at the edge-bin
    boundaries."""
    from scipy.integrate import quad
    from scipy.stats import norm
    d = ab0 * s * s + 1 - ab0
    A, B = math.sqrt(1 - ab0) / d, -math.sqrt(1 - ab0) * math.sqrt(ab0) * mu / d
    P, Q = (1 - math.sqrt(1 - ab0) * A) / math.sqrt(ab0), -math.sqrt(1 - ab0) * B / math.sqrt(ab0)
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    sd = math.exp(0.5 * logvar)

    def inner(x0):
        mean = P * (math.sqrt(ab0) * x0 + math.sqrt(1 - ab0) * nodes) + Q
        return -(weights * _decoder_logp_scipy(x0, mean, sd)).sum() * norm.pdf(x0, mu, s)

    edge = 1 - 1.0 / 255
    cuts = [mu - 9 * s, -edge, edge, mu + 9 * s]
    return sum(quad(inner, a, b, limit=200, epsabs=1e-9, epsrel=1e-9)[0] for a, b in zip(cuts[:-1], cuts[1:]))


def exact_vb_terms_bits(sched: NoiseSchedule, mu, s, variance_type):
    """Exact E[L_t] (t >= 1), E[L_prior] in bits per dimension for the oracle.

    q(x_{t-1} | x_t, x0) = N(c1 x0 + c2 x_t, bt~), p = N(c1 x0_hat + c2 x_t, vp), x0_hat = E[x0 | x_t]:
      KL = 0.5 (log vp - log bt~ + bt~/vp - 1) + 0.5 c1^2 (x0 - x0_hat)^2 / vp, and
      E[(x0 - E[x0|x_t])^2] = Var(x0 | x_t) = s^2 (1 - ab) / (ab s^2 + 1 - ab).
    Prior: KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)) with E[x0^2] = mu^2 + s^2.
    """
    beta = _np(sched.betas)
    ab = np.cumprod(1 - beta)
    abp = np.concatenate([[1.0], ab[:-1]])
    post = beta * (1 - abp) / (1 - ab)
    c1 = np.sqrt(abp) * beta / (1 - ab)
    vp = post if variance_type == "fixed_small" else beta
    cond = s * s * (1 - ab) / (ab * s * s + 1 - ab)
    with np.errstate(divide="ignore", invalid="ignore"):  # post[0] = 0: t = 0 is the decoder term
        kl = 0.5 * (np.log(vp) - np.log(post) + post / vp - 1) + 0.5 * c1 ** 2 * cond / vp
    kl[0] = np.nan  # t = 0 is the decoder term
    abT = ab[-1]
    prior = 0.5 * (-np.log1p(-abT) + (1 - abT) + abT * (mu * mu + s * s) - 1)
    return kl / math.log(2), prior / math.log(2), post


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_nll_terms_match_closed_form(variance_type):
    T, n, D = 50, 256, 64
    sched = NoiseSchedule.make("linear", T, beta_start=2e-3, beta_end=0.4)  # DDPM's schedule, compressed to 50
    diff = GaussianDiffusion(GaussianOracle(sched, NLL_MU, NLL_S), sched, sample_shape=(D,), clip_sample=False,
                             variance_type=variance_type)
    g = torch.Generator().manual_seed(7)
    x0 = NLL_MU + NLL_S * torch.randn(n, D, generator=g, dtype=torch.float64)
    res = diff.nll(x0.float(), generator=g, batch_timesteps=7)
    vb = res["vb_bpd"]
    assert vb.shape == (n, T) and vb.dtype == torch.float64
    assert torch.allclose(res["bpd"], res["prior_bpd"] + vb.sum(1))
    assert torch.equal(res["decoder_bpd"], vb[:, 0])

    kl_bits, prior_bits, post = exact_vb_terms_bits(sched, NLL_MU, NLL_S, variance_type)
    ab0 = float(sched.alphas_cumprod[0])
    dec_bits = exact_decoder_nats(ab0, math.log(post[1]), NLL_MU, NLL_S) / math.log(2)
    exact = torch.tensor(np.concatenate([[dec_bits], kl_bits[1:]]))

    def z(values, want):
        return (values.mean(0) - want) / (values.std(0) / math.sqrt(values.shape[0]))

    zt = z(vb, exact)
    assert zt.abs().max() < Z_MAX, f"worst term t={int(zt.abs().argmax())}: z={zt[zt.abs().argmax()]:.2f}"
    assert abs(z(res["prior_bpd"].float().double(), prior_bits)) < Z_MAX
    total = prior_bits + exact.sum().item()
    z_total = z(res["bpd"], total)
    assert abs(z_total) < Z_MAX, (res["bpd"].mean().item(), total)
    # power: the other variance type's exact terms are far outside the tolerance
    other = "fixed_large" if variance_type == "fixed_small" else "fixed_small"
    kl_other = torch.tensor(exact_vb_terms_bits(sched, NLL_MU, NLL_S, other)[0][1:])
    assert z(vb[:, 1:], kl_other).abs().max() > 4 * Z_MAX


def test_prior_term_T1000_exact():
    sched = NoiseSchedule.make("linear", 1000)
    diff = GaussianDiffusion(GaussianOracle(sched, 0.0, 0.5), sched, sample_shape=(3, 4, 4))
    x0 = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    got = diff.prior_bpd(x0)
    abT = np.prod(1 - np.linspace(1e-4, 0.02, 1000))
    x = x0.numpy().reshape(6, -1)
    want = 0.5 * (-np.log1p(-abT) + (1 - abT) + abT * x ** 2 - 1).mean(1) / math.log(2)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-15)
    assert 0 < got.max() < 1e-4  # the linear T=1000 chain ends near N(0, I)
    assert torch.equal(diff.nll(x0.float(), batch_timesteps=250)["prior_bpd"], diff.prior_bpd(x0.float()))


def test_discretized_gaussian_log_likelihood():
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, sd in [(0.0, 0.01), (0.37, 0.2), (-0.99, 0.003), (1.3, 0.5), (0.5, 1e-4)]:
        lp = discretized_gaussian_log_likelihood(grid, torch.tensor(mean, dtype=torch.float64),
                                                 torch.tensor(2 * math.log(sd), dtype=torch.float64))
        assert torch.isfinite(lp).all()
        assert abs(lp.exp().sum().item() - 1) < 1e-9  # the 256 bins partition the real line
        want = np.array([float(_decoder_logp_scipy(x, mean, sd)) for x in grid.tolist()])
        ok = np.isfinite(want)
        np.testing.assert_allclose(lp.numpy()[ok], want[ok], rtol=1e-7, atol=1e-9)
    # far tails stay finite (no log(0)): a bin 40 standard deviations away
    f64 = dict(dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(torch.tensor([0.6], **f64), torch.zeros(1, **f64),
                                             torch.tensor([2 * math.log(0.015)], **f64))
    assert torch.isfinite(lp).all() and lp.item() < -700


# ----------------------------------------------------------- loss parity ---
class TinyConv(nn.Module):
    """A small image denoiser whose output depends on x and t."""

    def __init__(self, c=3, T=100, out_c=None):
        super().__init__()
        self.conv = nn.Conv2d(c, out_c or c, 3, padding=1)
        self.emb = nn.Embedding(T, out_c or c)

    def forward(self, x, t):
        return self.conv(x) + self.emb(t)[:, :, None, None]


def _reference_loss(model, sched, x0, t, noise, target, weighting, gamma):
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).float()
    out = model(x_t, t).double()
    tgt = {"epsilon": noise.double(), "sample": x0.double(),
           "v_prediction": ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()}[target]
    mse = ((out - tgt) ** 2).flatten(1).mean(1)
    snr = (ab / (1 - ab)).flatten()
    if weighting == "uniform":
        w = torch.ones_like(snr)
    else:
        w = {"epsilon": snr.clamp(max=gamma) / snr, "sample": snr.clamp(max=gamma),
             "v_prediction": snr.clamp(max=gamma) / (snr + 1)}[target]
    return w * mse


@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
@pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
def test_loss_matches_unfused_reference(target, weighting):
    torch.manual_seed(0)
    T = 100
    sched = NoiseSchedule.make("cosine", T)
    model = TinyConv(T=T)
    diff = GaussianDiffusion(model, sched, target=target, weighting=weighting, snr_gamma=3.0)
    x0 = torch.randn(8, 3, 5, 7)
    t = torch.tensor([0, 1, 5, 17, 42, 63, 98, 99])
    seed = 99
    loss = diff(x0, t=t, generator=torch.Generator().manual_seed(seed), reduction="none")
    assert diff.sample_shape == (3, 5, 7)
    # the same key forward() draws (t is given, so the key is the generator's first draw)
    key = fastdiff.draw_key(torch.Generator().manual_seed(seed))
    _, noise = fastdiff.q_sample(x0, t, sched, key=key)
    want = _reference_loss(model, sched, x0, t, noise, target, weighting, 3.0)
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-6)
    mean_loss = diff(x0, t=t, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(mean_loss.double(), want.mean(), rtol=2e-5, atol=1e-6)
    mean_loss.backward()
    assert model.conv.weight.grad is not None and torch.isfinite(model.conv.weight.grad).all()


def test_loss_random_timesteps_deterministic():
    torch.manual_seed(0)
    model = fastdiff.nn.MLPDenoiser(dim=2, hidden=16, layers=1)
    diff = GaussianDiffusion(model, "linear", num_timesteps=200)
    x0 = torch.randn(32, 2)
    a = diff(x0, generator=torch.Generator().manual_seed(3))
    b = diff(x0, generator=torch.Generator().manual_seed(3))
    c = diff(x0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert diff.sample_shape == (2,)
    # t given as an int works for point data too
    assert diff(x0, t=7, reduction="none").shape == (32,)


def test_learned_range_loss_is_hybrid():
    """learned_range: L_simple on the first C channels + (T/1000) * L_vlb with
    the mean detached (so the VB term trains only the variance channels)."""
    torch.manual_seed(1)
    T = 100
    sched = NoiseSchedule.make("linear", T, beta_start=1e-3, beta_end=0.2)
    model = TinyConv(T=T, out_c=6)
    diff = GaussianDiffusion(model, sched, variance_type="learned_range", clip_sample=False)
    x0 = torch.randn(6, 3, 4, 4)
    t = torch.tensor([1, 3, 10, 50, 70, 99])
    loss = diff(x0, t=t, generator=torch.Generator().manual_seed(5), reduction="none")
    key = fastdiff.draw_key(torch.Generator().manual_seed(5))
    x_t, noise = fastdiff.q_sample(x0, t, sched, key=key)
    out = model(x_t, t).double()
    eps, v = out[:, :3], out[:, 3:]
    mse = ((eps - noise.double()) ** 2).flatten(1).mean(1)
    b = sched.betas[t].reshape(-1, 1, 1, 1)
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    abp = sched.alphas_cumprod[t - 1].reshape(-1, 1, 1, 1)
    post = b * (1 - abp) / (1 - ab)
    c1, c2 = abp.sqrt() * b / (1 - ab), (1 - b).sqrt() * (1 - abp) / (1 - ab)
    x0_hat = (x_t.double() - (1 - ab).sqrt() * eps) / ab.sqrt()
    logvar = (v + 1) / 2 * b.log() + (1 - v) / 2 * post.log()
    diffm = c1 * (x0.double() - x0_hat)
    kl = 0.5 * (logvar - post.log() + post / logvar.exp() + diffm ** 2 / logvar.exp() - 1)
    want = mse + T / 1000 * kl.flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    # gradient w.r.t. the prediction channels comes from the MSE only
    x_t_leaf = x_t.detach()
    out_leaf = model(x_t_leaf, t).detach().requires_grad_(True)
    diff.model = _Const(out_leaf)
    l2 = diff(x0, t=t, generator=torch.Generator().manual_seed(5)).sum()
    l2.backward()
    g_pred = 2 * (out_leaf[:, :3].detach() - noise) / (3 * 16) / 6
    torch.testing.assert_close(out_leaf.grad[:, :3], g_pred, rtol=1e-4, atol=1e-7)
    assert out_leaf.grad[:, 3:].abs().sum() > 0 and torch.isfinite(out_leaf.grad).all()


class _Const(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out


# -------------------------------------------------------- learned range ----
def test_learned_range_endpoints_match_fixed_variances():
    """v = -1 is fixed_small's variance, v = +1 fixed_large's: the sampler and
    the bound agree with the fixed types for the same generator."""
    T = 40
    sched = NoiseSchedule.make("linear", T, beta_start=2e-3, beta_end=0.4)
    x0 = (0.1 + 0.3 * torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    for v, fixed in [(-1.0, "fixed_small"), (1.0, "fixed_large")]:
        learned = GaussianDiffusion(GaussianOracle(sched, 0.1, 0.3, var_value=v), sched, sample_shape=(2, 3),
                                    variance_type="learned_range", clip_sample=False)
        ref = GaussianDiffusion(GaussianOracle(sched, 0.1, 0.3), sched, sample_shape=(2, 3),
                                variance_type=fixed, clip_sample=False)
        a = learned.sample(16, steps=20, spacing="trailing", generator=torch.Generator().manual_seed(1))
        b = ref.sample(16, steps=20, spacing="trailing", generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        na = learned.nll(x0, generator=torch.Generator().manual_seed(2))
        nb = ref.nll(x0, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(na["vb_bpd"][:, 1:], nb["vb_bpd"][:, 1:], rtol=1e-6, atol=1e-9)
        if v < 0:  # at t = 0 both use log beta~_1
            torch.testing.assert_close(na["bpd"], nb["bpd"], rtol=1e-6, atol=1e-9)
        else:  # learned_range's upper end at t = 0 is log beta_1 (improved DDPM); fixed_large uses log beta~_1
            assert not torch.allclose(na["decoder_bpd"], nb["decoder_bpd"])
    # ddim with a 2C-output model uses the first C channels
    d = GaussianDiffusion(GaussianOracle(sched, 0.1, 0.3, var_value=0.0), sched, sample_shape=(2, 3),
                          variance_type="learned_range", clip_sample=False)
    assert d.sample(4, steps=5, method="ddim").shape == (4, 2, 3)


# ------------------------------------------------------------- sampling ----
def _small_diffusion(**kw):
    torch.manual_seed(0)
    model = TinyConv(c=1, T=50)
    return GaussianDiffusion(model, "linear", num_timesteps=50, sample_shape=(1, 6, 6), **kw)


def test_sample_shape_dtype_and_determinism():
    diff = _small_diffusion()
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    for method, eta in [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)]:
        a = diff.sample(5, steps=10, method=method, eta=eta, generator=g(0))
        b = diff.sample(5, steps=10, method=method, eta=eta, generator=g(0))
        c = diff.sample(5, steps=10, method=method, eta=eta, generator=g(1))
        assert a.shape == (5, 1, 6, 6) and a.dtype == torch.float32
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.abs().max() <= 1.0  # clip_sample: the final x0 prediction is clipped
    x64 = diff.sample(3, steps=4, dtype=torch.float64, generator=g(0))
    assert x64.dtype == torch.float64
    # x_T given: the DDIM eta=0 sampler is then deterministic without a generator
    xT = torch.randn(2, 1, 6, 6, generator=g(3))
    a = diff.sample(2, steps=7, method="ddim", x_T=xT)
    b = diff.sample(2, steps=7, method="ddim", x_T=xT)
    assert torch.equal(a, b)
    x, traj = diff.sample(2, steps=7, method="ddim", x_T=xT, return_trajectory=True, progress=True)
    assert traj.shape == (8, 2, 1, 6, 6) and torch.equal(traj[0], xT) and torch.equal(traj[-1], x)
    # respacings give different chains
    outs = [diff.sample(2, steps=7, method="ddim", x_T=xT, spacing=sp) for sp in ("leading", "trailing", "linspace")]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_sample_unknown_shape_and_model_output_checks():
    model = TinyConv(c=1, T=50)
    diff = GaussianDiffusion(model, "linear", num_timesteps=50)
    with pytest.raises(ValueError, match="sample_shape"):
        diff.sample(2)
    diff(torch.randn(2, 1, 4, 4))  # the first batch fixes the shape
    assert diff.sample(2, steps=3).shape == (2, 1, 4, 4)
    bad = GaussianDiffusion(TinyConv(c=1, T=50), "linear", num_timesteps=50, sample_shape=(1, 4, 4),
                            variance_type="learned_range")
    with pytest.raises(ValueError, match="twice the channels"):
        bad.sample(2, steps=3)


def test_bad_inputs_name_the_argument():
    diff = _small_diffusion()
    x0 = torch.randn(4, 1, 6, 6)
    cases = [
        (lambda: diff(torch.randn(4, 1, 5, 6)), ValueError, "x0"),
        (lambda: diff(torch.randn(4, 6, 6, 1)), ValueError, "x0"),
        (lambda: diff(x0.clone().index_put_((torch.tensor([1]),), torch.tensor(float("nan")))), ValueError, "NaN"),
        (lambda: diff.nll(torch.full((2, 1, 6, 6), float("nan"))), ValueError, "x0"),
        (lambda: diff(x0.long()), TypeError, "x0"),
        (lambda: diff(x0, t=50), ValueError, "t"),
        (lambda: diff(x0, t=torch.tensor([0, 1, 2, 60])), ValueError, "t"),
        (lambda: diff(x0, t=torch.zeros(3, dtype=torch.long)), ValueError, "t"),
        (lambda: diff(x0, reduction="sum"), ValueError, "reduction"),
        (lambda: diff.sample(0), ValueError, "n"),
        (lambda: diff.sample(2, steps=0), ValueError, "steps"),
        (lambda: diff.sample(2, steps=51), ValueError, "steps"),
        (lambda: diff.sample(2, steps=2.5), ValueError, "steps"),
        (lambda: diff.sample(2, method="heun"), ValueError, "method"),
        (lambda: diff.sample(2, spacing="middle"), ValueError, "spacing"),
        (lambda: diff.sample(2, method="ddim", eta=-0.1), ValueError, "eta"),
        (lambda: diff.sample(2, method="ddpm", eta=0.5), ValueError, "eta"),
        (lambda: diff.sample(2, x_T=torch.randn(3, 1, 6, 6)), ValueError, "x_T"),
        (lambda: diff.sample(2, cuda_graph=True, device="cpu"), ValueError, "cuda_graph"),
        (lambda: diff.nll(x0, batch_timesteps=0), ValueError, "batch_timesteps"),
        (lambda: GaussianDiffusion(diff.model, "linear", target="noise"), ValueError, "target"),
        (lambda: GaussianDiffusion(diff.model, "linear", weighting="snr"), ValueError, "weighting"),
        (lambda: GaussianDiffusion(diff.model, "linear", variance_type="learned"), ValueError, "variance_type"),
        (lambda: GaussianDiffusion(diff.model, "quadratic"), ValueError, "schedule"),
        (lambda: GaussianDiffusion(diff.model, 3), TypeError, "schedule"),
        (lambda: GaussianDiffusion(diff.model, NoiseSchedule.make("linear", 10), num_timesteps=20), ValueError,
         "num_timesteps"),
        (lambda: GaussianDiffusion(diff.model, "linear", sample_shape=(0, 3)), ValueError, "sample_shape"),
    ]
    for fn, exc, word in cases:
        with pytest.raises(exc, match=word):
            fn()


def test_config_round_trip():
    model = TinyConv(c=1, T=50)
    diff = GaussianDiffusion(model, NoiseSchedule.make("cosine", 50, zero_terminal_snr=False), target="v_prediction",
                             weighting="min_snr", snr_gamma=4.0, variance_type="fixed_large", clip_sample=False,
                             sample_shape=(1, 6, 6))
    import json
    cfg = json.loads(json.dumps(diff.config))
    again = GaussianDiffusion.from_config(model, cfg)
    assert again.config == diff.config
    assert torch.equal(again.alphas_cumprod, diff.alphas_cumprod)
    custom = GaussianDiffusion(model, NoiseSchedule.from_betas(torch.linspace(1e-3, 0.1, 50)), sample_shape=(1, 6, 6))
    again = GaussianDiffusion.from_config(model, json.loads(json.dumps(custom.config)))
    assert torch.equal(again.betas, custom.betas) and again.config == custom.config
    # the same generator gives the same samples from the rebuilt diffusion
    a = custom.sample(2, steps=5, generator=torch.Generator().manual_seed(0))
    b = again.sample(2, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_to_dtype_keeps_float64_tables():
    diff = _small_diffusion()
    ref = diff.alphas_cumprod.clone()
    diff.to(torch.float16)
    assert diff.model.conv.weight.dtype == torch.float16
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
        assert getattr(diff, name).dtype == torch.float64
    assert torch.equal(diff.alphas_cumprod, ref)
    assert diff.schedule.alphas_cumprod.dtype == torch.float64
    diff.double().float()
    assert torch.equal(diff.alphas_cumprod, ref)
    assert "alphas_cumprod" not in diff.state_dict()  # rebuilt from the config, never stored


def test_half_model_samples_in_float32():
    diff = _small_diffusion(clip_sample=False)
    diff.model.to(torch.bfloat16)
    x = diff.sample(2, steps=3, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_failed_graph_capture_warns_once_and_returns_none():
    """The fallback path of the CUDA-graph sampler: a capture that raises
    (here: CPU tensors) warns once per module and hands back to eager."""
    diff = _small_diffusion()
    n, steps = 2, 3
    x = torch.randn(n, 1, 6, 6)
    rows = torch.arange(steps - 1, -1, -1)[:, None].expand(steps, n).contiguous()
    keys = torch.zeros(steps, 2, dtype=torch.int64)

    def step(x, t, tp, key):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="CUDA graph capture"):
        assert diff._sample_graphed(step, x, rows, rows - 1, keys, False, None) is None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert diff._sample_graphed(step, x, rows, rows - 1, keys, False, None) is None


# ---------------------------------------------------------------- GPU -----
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_cuda_graph_sampling_matches_eager(method, eta):
    torch.manual_seed(0)
    model = TinyConv(c=3, T=100).cuda()
    diff = GaussianDiffusion(model, "linear", num_timesteps=100, sample_shape=(3, 8, 8)).cuda()
    kw = dict(steps=25, method=method, eta=eta)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture (it warns) fails the test
        a = diff.sample(16, cuda_graph=True, generator=torch.Generator("cuda").manual_seed(0), **kw)
        a2, traj = diff.sample(16, cuda_graph=True, generator=torch.Generator("cuda").manual_seed(0),
                               return_trajectory=True, **kw)
    b = diff.sample(16, cuda_graph=False, generator=torch.Generator("cuda").manual_seed(0), **kw)
    c = diff.sample(16, generator=torch.Generator("cuda").manual_seed(0), **kw)  # default: graph on CUDA
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a, a2) and torch.equal(a, c) and torch.equal(traj[-1], a)
    # a CPU generator drives a CUDA sampling run too
    d = diff.sample(4, generator=torch.Generator().manual_seed(0), **kw)
    assert d.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_oracle_and_nll():
    sched = NoiseSchedule.make("linear", 1000)
    diff = GaussianDiffusion(GaussianOracle(sched, MU, S), sched, sample_shape=(64,), clip_sample=False).cuda()
    x = diff.sample(2048, steps=50, method="ddim", eta=1.0, generator=torch.Generator("cuda").manual_seed(0))
    m, v = chain_moments(_np(sched.alphas_cumprod), sched.timesteps(50).tolist(), MU, S, "ddim", eta=1.0)
    zm, zv = moment_z(x, m, v)
    assert abs(zm) < Z_MAX and abs(zv) < Z_MAX
    res = diff.nll(torch.zeros(4, 64, device="cuda"))
    assert res["bpd"].device.type == "cuda" and torch.isfinite(res["bpd"]).all()
    loss = diff(torch.randn(8, 64, device="cuda"))
    assert torch.isfinite(loss)
