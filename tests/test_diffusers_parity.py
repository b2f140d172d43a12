"""Parity of fastdiff's operators with diffusers' DDPMScheduler / DDIMScheduler.

Everything runs on CPU in float32 with the noise handed to both sides:
diffusers draws its step noise with ``randn_tensor(shape, generator=g)``,
which on CPU is ``torch.randn(shape, generator=g)``, so we draw the same
tensor from a generator with the same seed and pass it to fastdiff as
``noise=``.

Two levels of agreement are checked:

* against stock diffusers, with a tolerance: diffusers keeps
  ``alphas_cumprod`` in float32 (the cumulative product of 1000 float32
  factors, ~4e-7 relative error) and derives every coefficient from it in
  float32, while fastdiff derives them in float64. The difference is
  amplified where a coefficient is built on a small 1 - abar (~1e-4 near
  t = 0), so the tolerance is 5e-5 of the output's magnitude plus
  2e-7 / (1 - abar_prev) (``_stock_tol``); where the gap is largest our
  result is the one that matches the float64 reference
  (``test_stock_gap_is_diffusers_float32_table``);
* against diffusers whose ``alphas_cumprod`` (and ``one`` /
  ``final_alpha_cumprod``) were replaced by our float64 table: diffusers then
  evaluates its scalar coefficients in float64 as we do, and the results must
  agree to float32 rounding (1e-6 of the output's magnitude).

Cases where diffusers itself is wrong are tested against the float64 truth
instead (see ``test_fixed_large_log_*`` and ``test_low_precision_add_noise_*``).
"""
from __future__ import annotations

import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import NoiseSchedule  # noqa: E402
from fastdiff.reference import diffusion as ref  # noqa: E402

SHAPE = (2, 3, 8, 8)
T = 1000
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
DDIM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # DDIMScheduler has no sigmoid
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
SPACINGS = ("leading", "trailing", "linspace")
# None: no clipping; a float: clip_sample with that range; "threshold": dynamic thresholding
CLIPS = (None, 1.0, 2.0, "threshold")
SAMPLE_MAX = 3.0  # > 1 so that dynamic thresholding is not just clipping to [-1, 1]

# stock diffusers (float32 alphas_cumprod): tolerance relative to max(1, max|expected|), plus
# STOCK_ABAR_ERR / (1 - abar_prev) (see _stock_tol)
TOL_STEP = 5e-5  # measured <= 1.5e-5 on the respaced DDPM grid
TOL_FORWARD = 2e-5  # add_noise / get_velocity: measured <= 7e-6 on N(0,1) data
STOCK_ABAR_ERR = 2e-7  # a few float32 ulps of abar ~ 1, the cumprod's rounding near t = 0
# diffusers running on our float64 table: float32 rounding only (measured <= 1.2e-7)
TOL_F64 = 1e-6


# ------------------------------------------------------------- helpers ------
# This module makes ~20,000 calls on tensors of a few hundred elements.
# The CPU kernels hand every sample to at::parallel_for with grain 1, so
# each call wakes the OpenMP pool; on a busy machine that costs ~10 ms a
# call (vs ~0.1 ms on one thread) and dominated the module's run time.
# Parallel chunking is exercised by test_noise_stats.py (large tensors).
pytestmark = pytest.mark.usefixtures("one_thread")  # the conftest fixture


def _clip_kwargs(clip):
    """(diffusers config kwargs, fastdiff kwargs) for one clipping mode."""
    if clip is None:
        return dict(clip_sample=False), dict(clip_sample=False)
    if clip == "threshold":
        return (dict(clip_sample=False, thresholding=True, sample_max_value=SAMPLE_MAX),
                dict(thresholding=True, sample_max_value=SAMPLE_MAX))
    return (dict(clip_sample=True, clip_sample_range=clip), dict(clip_sample=True, clip_sample_range=clip))


def _schedule(sched) -> NoiseSchedule:
    return NoiseSchedule.from_betas(sched.betas.double())


def _use_f64_table(sched, s: NoiseSchedule, final_alpha_cumprod=None):
    """Make diffusers evaluate its coefficients from our float64 table."""
    sched.alphas_cumprod = s.alphas_cumprod.clone()
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if final_alpha_cumprod is not None:
        sched.final_alpha_cumprod = torch.tensor(final_alpha_cumprod, dtype=torch.float64)


def _stock_tol(s: NoiseSchedule, t_prev: int, final_alpha_cumprod: float = 1.0, t: int = -1,
               eta: float = 0.0) -> float:
    """Tolerance against stock diffusers for a step t -> t_prev.

    diffusers' float32 abar carries an absolute error of a few float32 ulps
    (~1e-7); coefficients built on 1 - abar_prev (posterior mean and
    variance, the DDIM direction term) inherit it relative to 1 - abar_prev,
    which is ~1e-4 near t = 0 (e.g. a step 2 -> 1 of the linear schedule
    differs by 8e-5 of the output's magnitude, DDIM "sample" 100 -> 0 of the
    cosine schedule by 5.4e-5). Where abar_prev = 1 exactly, 1 - abar_prev is
    exactly 0 on both sides. DDIM with eta > 0 forms
    d = 1 - abar_prev - sigma^2, a difference of numbers ~1 that nearly
    cancel when abar_t << abar_prev (d = 6.2e-7 for 999 -> 959 of the cosine
    schedule, float32 gives 5.96e-7): sqrt(d) then errs by ~1e-8 / sqrt(d).
    In each of these cases our result is the one that matches the float64
    reference (``test_stock_gap_is_diffusers_float32_table``)."""
    abar = s.alphas_cumprod
    abar_prev = float(abar[t_prev]) if t_prev >= 0 else final_alpha_cumprod
    k = 1.0 - abar_prev
    tol = TOL_STEP + (STOCK_ABAR_ERR / k if k > 0 else 0.0)
    if eta > 0 and t >= 0:
        ab_t = float(abar[t])
        d = 1 - abar_prev - eta**2 * (1 - abar_prev) / (1 - ab_t) * (1 - ab_t / abar_prev)
        if d > 0:
            tol += STOCK_ABAR_ERR / d**0.5
    return tol


def _close(got, expected, tol, what=""):
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def _close_to_stock(got, theirs, truth, tol, what=""):
    """Ours against stock diffusers, both measured against the float64 truth.

    Where float32 is exact enough, ours agrees with diffusers within ``tol``
    (``_stock_tol``). Where it is not, diffusers' own float32 error is not a
    property of the maths but of one CPU's rounding: at t = 999 of a
    zero-terminal-SNR chain with eta = 1, d = 1 - abar_prev - sigma^2 is
    exactly 0, and float32 gives -6e-8 on one CPU (diffusers: NaN, handled
    by the caller) and +6e-8 on another (diffusers: sqrt(d) = 2.4e-4 times
    the direction term: an error of ~1e-3). torch's float32 kernels round
    differently per vector ISA (AVX2 / AVX-512 builds; even diffusers'
    float32 cumprod differs in the last bit), so no fixed tolerance on the
    gap holds everywhere. The rule: ours is no further from the truth than
    diffusers is (with float32 rounding, TOL_F64, as the floor), and the
    gap between the two is at most ``tol`` plus diffusers' own error. "No
    further" allows a factor 2 (the flash-attention rule the suite uses for
    low precision): where both sides are at float32 rounding, e.g. a clipped
    epsilon x0_hat at t = 900 (division by sqrt(abar) ~ 0.2), the two
    roundings differ by a few 1e-7 either way."""
    assert got.dtype == theirs.dtype and got.shape == theirs.shape, what
    scale = max(1.0, float(truth.abs().max()))
    err_ours = float((got.double() - truth).abs().max()) / scale
    err_theirs = float((theirs.double() - truth).abs().max()) / scale
    gap = float((got.double() - theirs.double()).abs().max()) / scale
    assert err_ours <= 2 * err_theirs + TOL_F64, (
        f"{what}: ours is {err_ours:.3g} from the float64 truth, diffusers {err_theirs:.3g}")
    assert gap <= tol + err_theirs, (
        f"{what}: ours and diffusers differ by {gap:.3g} > tol {tol:.3g} + diffusers' own error {err_theirs:.3g}")


def _step_inputs(g, variance_type, shape=SHAPE):
    """(sample, model_output as diffusers takes it) for one step; learned
    variance types carry the variance values as a second half of channels."""
    x = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    if variance_type == "learned_range":
        out = torch.cat([out, torch.rand(shape, generator=g) * 2 - 1], 1)  # v in [-1, 1]
    elif variance_type == "learned":
        out = torch.cat([out, torch.rand(shape, generator=g) * 0.05 + 1e-4], 1)  # a variance: positive
    return x, out


def _ddpm_noise(seed, shape=SHAPE):
    """The noise DDPMScheduler.step(generator=Generator().manual_seed(seed)) draws on CPU."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------- schedules -------
@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_schedule_tables(beta_schedule, zero_snr):
    sched = DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    s = _schedule(sched)
    assert s.alphas_cumprod.dtype == torch.float64 and s.num_timesteps == T
    # diffusers' cumprod runs in float32: ~4e-7 relative error accumulated over 1000 factors
    torch.testing.assert_close(s.alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    if zero_snr:
        assert float(s.alphas_cumprod[-1]) == 0.0
    # the named builders agree with diffusers' too (diffusers rounds its betas to float32)
    name = {"squaredcos_cap_v2": "cosine"}.get(beta_schedule, beta_schedule)
    made = NoiseSchedule.make(name, T, zero_terminal_snr=zero_snr)
    torch.testing.assert_close(made.alphas_cumprod, sched.alphas_cumprod.double(), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler], ids=["ddpm", "ddim"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_match_set_timesteps(cls, spacing):
    s = NoiseSchedule.make("linear", T)
    for n, offset in itertools.product((1, 3, 7, 10, 33, 50, 100, 250, 333, 999, 1000), (0, 1)):
        if offset and spacing != "leading":
            continue  # diffusers applies steps_offset to "leading" only
        sched = cls(timestep_spacing=spacing, steps_offset=offset)
        sched.set_timesteps(n)
        ours = s.timesteps(n, spacing, steps_offset=offset)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, sched.timesteps.to(torch.int64)), (n, offset)


# ------------------------------------------------ add_noise / velocity -------
@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_add_noise_and_velocity(beta_schedule, zero_snr):
    sched = DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    s = _schedule(sched)
    g = torch.Generator().manual_seed(1234)
    t = torch.arange(T)  # every timestep once, one per sample
    x0 = torch.randn(T, 2, 4, 4, generator=g)
    noise = torch.randn(T, 2, 4, 4, generator=g)

    xt, nz = fastdiff.q_sample(x0, t, s, noise)
    assert nz is noise
    _close(xt, sched.add_noise(x0, noise, t), TOL_FORWARD, "q_sample vs add_noise")
    v = fastdiff.get_velocity(x0, noise, t, s)
    _close(v, sched.get_velocity(x0, noise, t), TOL_FORWARD, "get_velocity")

    # random order, repeated timesteps, int timesteps
    perm = torch.randint(0, T, (64,), generator=g)
    _close(fastdiff.q_sample(x0[:64], perm, s, noise[:64])[0], sched.add_noise(x0[:64], noise[:64], perm),
           TOL_FORWARD, "q_sample, random t")
    _close(fastdiff.get_velocity(x0[:64], noise[:64], perm, s), sched.get_velocity(x0[:64], noise[:64], perm),
           TOL_FORWARD, "get_velocity, random t")
    t5 = torch.full((8,), 5)
    _close(fastdiff.q_sample(x0[:8], 5, s, noise[:8])[0], sched.add_noise(x0[:8], noise[:8], t5), TOL_FORWARD,
           "q_sample, int t")

    # on our float64 table diffusers agrees to float32 rounding
    _use_f64_table(sched, s)
    _close(xt, sched.add_noise(x0, noise, t), TOL_F64, "q_sample vs add_noise (f64 table)")
    _close(v, sched.get_velocity(x0, noise, t), TOL_F64, "get_velocity (f64 table)")


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (float64)."""
    xa = x.abs().to(dtype)
    return torch.nextafter(xa, torch.full_like(xa, float("inf"))).double() - xa.double()


@pytest.mark.parametrize("dtype,ts", [(torch.bfloat16, (0, 1, 2, 3, 4, 5)), (torch.float16, (0, 1))],
                         ids=["bfloat16", "float16"])
def test_low_precision_add_noise_diffusers_loses_the_noise(dtype, ts):
    """diffusers is wrong here; fastdiff is right.

    ``DDPMScheduler.add_noise`` casts ``alphas_cumprod`` to the sample dtype
    *before* forming sqrt(1 - abar_t). On the linear schedule abar_t =
    0.9999, 0.99978, ... at t = 0, 1, ...: in bfloat16 (spacing 2^-8 below
    1) abar_t rounds to exactly 1.0 for t = 0..5 (and beyond), in float16
    (spacing 2^-11) for t = 0, 1. sqrt(1 - abar_t) then becomes 0, so
    diffusers returns x0 unchanged although the true noise coefficient is
    0.010 .. 0.030. Measured: diffusers is off by more than 1 ulp on ~80%
    (bf16) / ~96% (fp16) of the elements (median 3.4 / 17 ulp), RMS error
    13x / 60x ours.

    fastdiff computes the coefficients in float64 and applies them in float32,
    rounding once to the output dtype: every element is within 1 ulp of the
    float64 truth (measured <= 0.5 ulp: correctly rounded).
    """
    sched = DDPMScheduler(beta_schedule="linear")
    s = _schedule(sched)
    g = torch.Generator().manual_seed(7)
    t = torch.tensor(ts).repeat_interleave(4)
    shape = (t.shape[0], 4, 16, 16)
    x0 = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    truth = ref.q_sample(x0.double(), t, s.alphas_cumprod, noise.double())  # float64, from the rounded inputs

    ours, _ = fastdiff.q_sample(x0, t, s, noise)
    assert ours.dtype == dtype
    ulp = _ulp(truth, dtype)
    err_ours = (ours.double() - truth).abs()
    assert bool((err_ours <= ulp).all()), f"max error {float((err_ours / ulp).max()):.3f} ulp"

    theirs = sched.add_noise(x0, noise, t)
    # the mechanism: abar_t rounds to 1 in the low-precision dtype, the noise term vanishes
    assert bool((sched.alphas_cumprod.to(dtype)[t] == 1).all())
    assert torch.equal(theirs, x0)
    assert float((1 - s.alphas_cumprod[list(ts)]).sqrt().min()) >= 0.0099  # the truth has a noise term
    err_theirs = (theirs.double() - truth).abs()
    assert float((err_theirs > ulp).double().mean()) > 0.5
    assert float(err_theirs.pow(2).mean().sqrt()) > 5 * float(err_ours.pow(2).mean().sqrt())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_q_sample_within_one_ulp_everywhere(dtype):
    s = NoiseSchedule.make("linear", T)
    g = torch.Generator().manual_seed(8)
    t = torch.arange(0, T, 3)
    x0 = torch.randn(t.shape[0], 3, 8, 8, generator=g).to(dtype)
    noise = torch.randn(t.shape[0], 3, 8, 8, generator=g).to(dtype)
    truth = ref.q_sample(x0.double(), t, s.alphas_cumprod, noise.double())
    ours = fastdiff.q_sample(x0, t, s, noise)[0]
    assert ours.dtype == dtype
    assert bool(((ours.double() - truth).abs() <= _ulp(truth, dtype)).all())
    v_truth = ref.get_velocity(x0.double(), t, s.alphas_cumprod, noise.double())
    v = fastdiff.get_velocity(x0, noise, t, s)
    assert v.dtype == dtype
    assert bool(((v.double() - v_truth).abs() <= _ulp(v_truth, dtype)).all())


# ------------------------------------------------------------ DDPM step -----
def _ddpm_scheduler(beta_schedule, prediction_type, variance_type, clip, spacing="leading", zero_snr=False):
    dkw, okw = _clip_kwargs(clip)
    sched = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type,
                          variance_type=variance_type, timestep_spacing=spacing,
                          rescale_betas_zero_snr=zero_snr, **dkw)
    okw = dict(okw, prediction_type=prediction_type, variance_type=variance_type)
    return sched, okw


def _check_ddpm_steps(sched, s, okw, steps, seed, tol, what):
    """steps: [(t, t_prev)], each stepped from fresh random inputs; tol None:
    the stock-diffusers tolerance."""
    g = torch.Generator().manual_seed(seed)
    for i, (t, t_prev) in enumerate(steps):
        x, out = _step_inputs(g, okw["variance_type"])
        nseed = seed * 1000 + i
        exp = sched.step(out, t, x, generator=torch.Generator().manual_seed(nseed))
        nz = _ddpm_noise(nseed)
        prev, x0 = fastdiff.ddpm_step(out, t, x, s, t_prev=t_prev, noise=nz, **okw)
        if tol is None and not okw.get("thresholding"):  # stock: bounded by diffusers' own error
            truth = _ddpm_truth(out, t, x, s, t_prev, nz, okw)
            tol_t = _stock_tol(s, t_prev)
            _close_to_stock(x0, exp.pred_original_sample, truth[1], tol_t, f"{what} t={t}: pred_original_sample")
            _close_to_stock(prev, exp.prev_sample, truth[0], tol_t, f"{what} t={t}->{t_prev}: prev_sample")
            continue
        tol_t = _stock_tol(s, t_prev) if tol is None else tol
        _close(x0, exp.pred_original_sample, tol_t, f"{what} t={t}: pred_original_sample")
        _close(prev, exp.prev_sample, tol_t, f"{what} t={t}->{t_prev}: prev_sample")


def _ddpm_truth(out, t, x, s, t_prev, noise, okw):
    """The float64 reference of one DDPM step (no thresholding) on diffusers' inputs."""
    n, c = x.shape[0], x.shape[1]
    var = None
    if okw["variance_type"] in ("learned", "learned_range"):
        out, var = out[:, :c], out[:, c:].double()
    clip = okw.get("clip_sample_range", 1.0) if okw.get("clip_sample") else 0.0
    return ref.ddpm_step(out.double(), x.double(), torch.full((n,), t), torch.full((n,), t_prev),
                         s.alphas_cumprod, noise.double(), model_var=var, prediction_type=okw["prediction_type"],
                         variance_type=okw["variance_type"], clip_range=clip)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip1", "clip2", "threshold"])
@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_step_respaced(beta_schedule, prediction_type, variance_type, clip, spacing):
    """Every step of a 10-step respaced chain (t_prev = the next entry of
    ``sched.timesteps``, -1 after the last), from fresh inputs each step."""
    sched, okw = _ddpm_scheduler(beta_schedule, prediction_type, variance_type, clip, spacing)
    s = _schedule(sched)
    sched.set_timesteps(10)
    ts = sched.timesteps.tolist()
    steps = list(zip(ts, ts[1:] + [-1]))
    assert s.timesteps(10, spacing).tolist() == ts
    _check_ddpm_steps(sched, s, okw, steps, 11, None, "stock")
    if clip is None:  # (the coefficients do not depend on clipping: a quarter of the grid is enough)
        _use_f64_table(sched, s)
        _check_ddpm_steps(sched, s, okw, steps, 12, TOL_F64, "f64 table")


@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES + ("linear+zero_snr",))
def test_ddpm_step_full_chain(beta_schedule, prediction_type, variance_type):
    """The 1000-step chain (no set_timesteps: t_prev = t - 1) at a few t,
    including both ends. With zero-terminal-SNR, abar_999 = 0 and the
    epsilon parameterisation is undefined there (x0 = (x - eps)/0), so that
    one t is left out for epsilon."""
    zero_snr = beta_schedule.endswith("+zero_snr")
    sched, okw = _ddpm_scheduler(beta_schedule.split("+")[0], prediction_type, variance_type, None,
                                 zero_snr=zero_snr)
    s = _schedule(sched)
    ts = [999, 998, 500, 2, 1, 0]
    if zero_snr and prediction_type == "epsilon":
        ts.remove(999)
    steps = [(t, t - 1) for t in ts]
    _check_ddpm_steps(sched, s, okw, steps, 21, None, "stock")
    # t_prev defaults to t - 1
    g = torch.Generator().manual_seed(3)
    x, out = _step_inputs(g, variance_type)
    nz = _ddpm_noise(5)
    a = fastdiff.ddpm_step(out, 500, x, s, noise=nz, **okw)
    b = fastdiff.ddpm_step(out, 500, x, s, t_prev=499, noise=nz, **okw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _use_f64_table(sched, s)
    _check_ddpm_steps(sched, s, okw, steps, 22, TOL_F64, "f64 table")


def test_ddpm_step_learned_model_var_argument():
    """variance values passed as model_var equal the 2C-channel form."""
    for vt in ("learned", "learned_range"):
        sched, okw = _ddpm_scheduler("linear", "epsilon", vt, None)
        s = _schedule(sched)
        g = torch.Generator().manual_seed(4)
        x, out = _step_inputs(g, vt)
        nz = _ddpm_noise(9)
        eps, var = out.split(SHAPE[1], 1)
        a = fastdiff.ddpm_step(out, 400, x, s, noise=nz, **okw)
        b = fastdiff.ddpm_step(eps.contiguous(), 400, x, s, noise=nz, model_var=var.contiguous(), **okw)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        exp = sched.step(out, 400, x, generator=torch.Generator().manual_seed(9))
        _close(b[0], exp.prev_sample, _stock_tol(s, 399), vt)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_fixed_large_log_diffusers_gives_nan(prediction_type):
    """diffusers is wrong here; fastdiff is right.

    With ``variance_type="fixed_large_log"`` diffusers' ``_get_variance``
    returns log(beta_t) (a log-variance) but ``step`` then takes
    ``variance ** 0.5`` of it as if it were a variance: the square root of a
    negative number, so every step with t > 0 returns NaN. fastdiff treats
    fixed_large_log as the log-space form of fixed_large (same values: std =
    sqrt(beta'_t)), so it must equal fixed_large, and diffusers' fixed_large.
    """
    sched_log, okw_log = _ddpm_scheduler("linear", prediction_type, "fixed_large_log", None)
    sched_lin, okw_lin = _ddpm_scheduler("linear", prediction_type, "fixed_large", None)
    s = _schedule(sched_lin)
    g = torch.Generator().manual_seed(5)
    for t, t_prev in ((999, 998), (500, 499), (1, 0), (0, -1), (700, 600)):
        x, out = _step_inputs(g, "fixed_large")
        nz = _ddpm_noise(t)
        ours_log = fastdiff.ddpm_step(out, t, x, s, t_prev=t_prev, noise=nz, **okw_log)
        ours_lin = fastdiff.ddpm_step(out, t, x, s, t_prev=t_prev, noise=nz, **okw_lin)
        assert bool(torch.isfinite(ours_log[0]).all())
        torch.testing.assert_close(ours_log[0], ours_lin[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours_log[1], ours_lin[1], rtol=0, atol=0)
        if t_prev == t - 1:
            exp_lin = sched_lin.step(out, t, x, generator=torch.Generator().manual_seed(t))
            _close(ours_log[0], exp_lin.prev_sample, _stock_tol(s, t_prev), f"fixed_large_log t={t}")
            exp_log = sched_log.step(out, t, x, generator=torch.Generator().manual_seed(t))
            if t > 0:
                assert bool(torch.isnan(exp_log.prev_sample).all())  # diffusers' bug
        # and the float64 reference
        tt = torch.full((SHAPE[0],), t)
        tp = torch.full((SHAPE[0],), t_prev)
        want, _ = ref.ddpm_step(out.double(), x.double(), tt, tp, s.alphas_cumprod, nz.double(),
                                prediction_type=prediction_type, variance_type="fixed_large")
        _close(ours_log[0], want.float(), 1e-6, f"fixed_large_log vs reference t={t}")


# ------------------------------------------------------------ DDIM step -----
def _ddim_scheduler(beta_schedule, prediction_type, clip, set_alpha_to_one, spacing="leading", zero_snr=False):
    dkw, okw = _clip_kwargs(clip)
    sched = DDIMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type,
                          set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing,
                          rescale_betas_zero_snr=zero_snr, **dkw)
    s = _schedule(sched)
    final = 1.0 if set_alpha_to_one else float(s.alphas_cumprod[0])
    okw = dict(okw, prediction_type=prediction_type, final_alpha_cumprod=final)
    return sched, s, okw


def _check_ddim_against_reference(out, t, x, s, t_prev, eta, z, okw, use_clipped, got):
    n = x.shape[0]
    clip = okw.get("clip_sample_range", 0.0) if okw.get("clip_sample") else 0.0
    assert not okw.get("thresholding")
    want, _ = ref.ddim_step(out.double(), x.double(), torch.full((n,), t), torch.full((n,), t_prev),
                            s.alphas_cumprod, z.double(), eta, okw["prediction_type"], clip, None,
                            okw["final_alpha_cumprod"], use_clipped)
    assert bool(torch.isfinite(got).all())
    _close(got, want.float(), 1e-6, f"t={t}->{t_prev} vs reference")


def _check_ddim_steps(sched, s, okw, n_steps, eta, use_clipped, seed, tol, what):
    sched.set_timesteps(n_steps)
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps.tolist():
        t_prev = t - T // n_steps  # as diffusers computes it; < 0 means final_alpha_cumprod
        x = torch.randn(SHAPE, generator=g)
        out = torch.randn(SHAPE, generator=g)
        z = torch.randn(SHAPE, generator=g)
        exp = sched.step(out, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=z)
        prev, x0 = fastdiff.ddim_step(out, t, x, s, t_prev=max(t_prev, -1), eta=eta,
                                      use_clipped_model_output=use_clipped, noise=z, **okw)
        tol_t = _stock_tol(s, t_prev, okw["final_alpha_cumprod"], t, eta) if tol is None else tol
        if bool(torch.isnan(exp.prev_sample).any()):
            # diffusers' known NaN at zero terminal SNR with eta = 1 (test_ddim_eta1_zero_snr_diffusers_nan)
            assert eta == 1.0 and float(s.alphas_cumprod[t]) == 0.0, f"{what} t={t}: diffusers NaN"
            _check_ddim_against_reference(out, t, x, s, max(t_prev, -1), eta, z, okw, use_clipped, prev)
            continue
        if tol is None and not okw.get("thresholding"):  # stock: bounded by diffusers' own error
            n = x.shape[0]
            clip = okw.get("clip_sample_range", 0.0) if okw.get("clip_sample") else 0.0
            truth = ref.ddim_step(out.double(), x.double(), torch.full((n,), t), torch.full((n,), max(t_prev, -1)),
                                  s.alphas_cumprod, z.double(), eta, okw["prediction_type"], clip, None,
                                  okw["final_alpha_cumprod"], use_clipped)
            _close_to_stock(x0, exp.pred_original_sample, truth[1], tol_t, f"{what} t={t}: pred_original_sample")
            _close_to_stock(prev, exp.prev_sample, truth[0], tol_t, f"{what} t={t}->{t_prev}: prev_sample")
            continue
        _close(x0, exp.pred_original_sample, tol_t, f"{what} t={t}: pred_original_sample")
        _close(prev, exp.prev_sample, tol_t, f"{what} t={t}->{t_prev}: prev_sample")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("use_clipped", [False, True], ids=["eps", "clipped_eps"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False], ids=["final1", "final_abar0"])
@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip1", "clip2", "threshold"])
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_step(prediction_type, eta, clip, set_alpha_to_one, use_clipped, spacing):
    sched, s, okw = _ddim_scheduler("scaled_linear", prediction_type, clip, set_alpha_to_one, spacing)
    _check_ddim_steps(sched, s, okw, 10, eta, use_clipped, 31, None, "stock")
    _use_f64_table(sched, s, okw["final_alpha_cumprod"])
    _check_ddim_steps(sched, s, okw, 10, eta, use_clipped, 32, TOL_F64, "f64 table")


@pytest.mark.parametrize("n_steps", [7, 25])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta_schedule,prediction_type", [
    (b, p) for b in DDIM_BETA_SCHEDULES + ("scaled_linear+zero_snr",) for p in PREDICTIONS
    if not (b.endswith("+zero_snr") and p == "epsilon")  # epsilon prediction is undefined at abar = 0
])
def test_ddim_step_schedules(beta_schedule, prediction_type, eta, n_steps):
    """Other schedules (trailing spacing, which starts at t = 999: abar = 0
    with zero terminal SNR), other step counts (7: T // 7 = 142 does not
    divide T), eta = 0.5."""
    zero_snr = beta_schedule.endswith("+zero_snr")
    sched, s, okw = _ddim_scheduler(beta_schedule.split("+")[0], prediction_type, None, False, "trailing",
                                    zero_snr=zero_snr)
    _check_ddim_steps(sched, s, okw, n_steps, eta, False, 41, None, "stock")
    _use_f64_table(sched, s, okw["final_alpha_cumprod"])
    _check_ddim_steps(sched, s, okw, n_steps, eta, False, 42, TOL_F64, "f64 table")


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_ddim_eta1_zero_snr_diffusers_nan(prediction_type):
    """diffusers is wrong here; fastdiff is right.

    With a zero-terminal-SNR schedule (abar_999 = 0) and eta = 1, the DDIM
    step from t = 999 has sigma^2 = (1 - abar_prev)/(1 - 0) * (1 - 0/abar_prev)
    = 1 - abar_prev, so the direction coefficient sqrt(1 - abar_prev - sigma^2)
    is sqrt(0); diffusers evaluates 1 - abar_prev - sigma^2 in float32, gets
    a tiny negative number and returns NaN (measured for t_prev = 857, the
    7-step trailing chain). fastdiff clamps it at 0 and matches the float64
    reference: prev = sqrt(abar_prev) x0_hat + sigma z.
    """
    sched, s, okw = _ddim_scheduler("scaled_linear", prediction_type, None, False, "trailing", zero_snr=True)
    sched.set_timesteps(7)
    g = torch.Generator().manual_seed(61)
    x = torch.randn(SHAPE, generator=g)
    out = torch.randn(SHAPE, generator=g)
    z = torch.randn(SHAPE, generator=g)
    t, t_prev = 999, 999 - T // 7
    exp = sched.step(out, t, x, eta=1.0, variance_noise=z)
    got, x0 = fastdiff.ddim_step(out, t, x, s, t_prev=t_prev, eta=1.0, noise=z, **okw)
    _check_ddim_against_reference(out, t, x, s, t_prev, 1.0, z, okw, False, got)
    if not bool(torch.isnan(exp.prev_sample).all()):
        # float32 rounded d to >= 0 on this CPU (see _close_to_stock): diffusers is then finite, and
        # ours must still be the one nearer the truth
        n = x.shape[0]
        truth, _ = ref.ddim_step(out.double(), x.double(), torch.full((n,), t), torch.full((n,), t_prev),
                                 s.alphas_cumprod, z.double(), 1.0, prediction_type)
        _close_to_stock(got, exp.prev_sample, truth, TOL_STEP, "diffusers finite at abar_t = 0")
    # the closed form at abar_t = 0
    ab_p = s.alphas_cumprod[t_prev]
    _close(got, (ab_p.sqrt() * x0.double() + (1 - ab_p).sqrt() * z.double()).float(), 1e-6, "closed form")
    _close(x0, exp.pred_original_sample, TOL_STEP, "pred_original_sample is fine in diffusers")


@pytest.mark.parametrize("ulps", [-2, -1, 1])
@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_ddim_zero_snr_stock_check_holds_for_other_roundings(prediction_type, ulps):
    """The Intel failure, reproduced on any CPU. On an Intel Xeon the stock
    check of the 25-step trailing zero-SNR chain with eta = 1 failed at
    999 -> 959 while an AMD EPYC passed. There abar_999 = 0, so diffusers'
    variance is 1 - abar_959 and d = 1 - abar_prev - (variance ** 0.5) ** 2
    is exactly 0; torch's float32 ``pow`` / ``sqrt`` round differently per
    vector ISA (AVX2 / AVX-512 builds), so d came out at -6e-8 on one CPU
    (diffusers: NaN, see test_ddim_eta1_zero_snr_diffusers_nan) and above 0
    on the other (diffusers: finite, off by sqrt(d) times the direction term,
    ~1e-3). Moving diffusers' float32 variance by an ulp or two reproduces
    the other CPU's rounding (here d <= 0 for every nearby abar); the check
    (``_close_to_stock``) must hold for each, and ours stays within float32
    rounding of the float64 truth."""
    sched, s, okw = _ddim_scheduler("scaled_linear", prediction_type, None, False, "trailing", zero_snr=True)
    get_variance = sched._get_variance

    def other_cpu_variance(t, t_prev):
        v = get_variance(t, t_prev)
        for _ in range(abs(ulps)):
            v = torch.nextafter(v, torch.full_like(v, 2.0 if ulps > 0 else 0.0))
        return v

    sched._get_variance = other_cpu_variance
    sched.set_timesteps(25)
    g = torch.Generator().manual_seed(41)
    x, out, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    exp = sched.step(out, 999, x, eta=1.0, variance_noise=z)
    assert bool(torch.isnan(exp.prev_sample).all()) == (ulps > 0)  # variance rounded up: d < 0, NaN
    _check_ddim_steps(sched, s, okw, 25, 1.0, False, 41, None, "stock, variance moved by %+d ulp" % ulps)


@pytest.mark.parametrize("case", ["ddpm_linear_2_to_1", "ddim_cosine_sample_100_to_0",
                                  "ddim_cosine_eta1_999_to_959"])
def test_stock_gap_is_diffusers_float32_table(case):
    """Where stock diffusers and fastdiff differ most (steps onto a t_prev
    with 1 - abar_prev ~ 1e-4; DDIM eta = 1 where 1 - abar_prev - sigma^2
    cancels), fastdiff is the one that matches the float64 reference:
    diffusers' float32 arithmetic is the cause."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g)
    out = torch.randn(SHAPE, generator=g)
    if case.startswith("ddpm"):
        t, t_prev = 2, 1
        sched, okw = _ddpm_scheduler("linear", "epsilon", "fixed_small", None)
        s = _schedule(sched)
        exp = sched.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        nz = _ddpm_noise(0)
        ours = fastdiff.ddpm_step(out, t, x, s, t_prev=t_prev, noise=nz, **okw)[0]
        tt, tp = torch.full((SHAPE[0],), t), torch.full((SHAPE[0],), t_prev)
        truth, _ = ref.ddpm_step(out.double(), x.double(), tt, tp, s.alphas_cumprod, nz.double())
    elif case == "ddim_cosine_eta1_999_to_959":
        t, t_prev = 999, 959
        sched, s, okw = _ddim_scheduler("squaredcos_cap_v2", "sample", None, False, "trailing")
        sched.set_timesteps(25)
        z = torch.randn(SHAPE, generator=g)
        exp = sched.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        ours = fastdiff.ddim_step(out, t, x, s, t_prev=t_prev, eta=1.0, noise=z, **okw)[0]
        tt, tp = torch.full((SHAPE[0],), t), torch.full((SHAPE[0],), t_prev)
        truth, _ = ref.ddim_step(out.double(), x.double(), tt, tp, s.alphas_cumprod, z.double(), 1.0, "sample")
    else:
        t, t_prev = 100, 0
        sched, s, okw = _ddim_scheduler("squaredcos_cap_v2", "sample", 1.0, True, "leading")
        sched.set_timesteps(10)
        exp = sched.step(out, t, x, eta=0.0).prev_sample
        ours = fastdiff.ddim_step(out, t, x, s, t_prev=t_prev, **okw)[0]
        tt, tp = torch.full((SHAPE[0],), t), torch.full((SHAPE[0],), t_prev)
        truth, _ = ref.ddim_step(out.double(), x.double(), tt, tp, s.alphas_cumprod, prediction_type="sample",
                                 clip_range=1.0)
    err_ours = float((ours.double() - truth).abs().max())
    err_theirs = float((exp.double() - truth).abs().max())
    scale = float(truth.abs().max())
    assert err_ours < 1e-6 * scale  # float32 rounding
    assert err_theirs > 10 * err_ours  # the gap is diffusers'


# ------------------------------------------------------ per-sample t --------
def test_ddpm_per_sample_timesteps_full_chain():
    """A batch whose samples sit at different t equals stepping each sample
    alone through diffusers (t = 0 gets no noise)."""
    for vt, pred in (("fixed_small", "epsilon"), ("learned_range", "v_prediction"), ("fixed_large", "sample")):
        sched, okw = _ddpm_scheduler("linear", pred, vt, 1.0)
        s = _schedule(sched)
        ts = [999, 640, 1, 0, 250]
        g = torch.Generator().manual_seed(51)
        shape = (len(ts),) + SHAPE[1:]
        x, out = _step_inputs(g, vt, shape)
        noise = torch.cat([_ddpm_noise(100 + i, (1,) + SHAPE[1:]) for i in range(len(ts))])
        prev, x0 = fastdiff.ddpm_step(out, torch.tensor(ts), x, s, t_prev=torch.tensor(ts) - 1, noise=noise,
                                      **okw)
        for i, t in enumerate(ts):
            exp = sched.step(out[i:i + 1], t, x[i:i + 1], generator=torch.Generator().manual_seed(100 + i))
            _close(prev[i:i + 1], exp.prev_sample, _stock_tol(s, t - 1), f"{vt} sample {i} t={t}")
            _close(x0[i:i + 1], exp.pred_original_sample, _stock_tol(s, t - 1), f"{vt} sample {i} t={t}")


def test_ddpm_per_sample_timesteps_respaced():
    sched, okw = _ddpm_scheduler("scaled_linear", "epsilon", "fixed_small", None, "trailing")
    s = _schedule(sched)
    sched.set_timesteps(10)
    ts = sched.timesteps.tolist()
    pick = [0, 3, 9, 5]  # positions in the chain; 9 is the last step (t_prev = -1)
    t = torch.tensor([ts[k] for k in pick])
    tp = torch.tensor([ts[k + 1] if k + 1 < len(ts) else -1 for k in pick])
    g = torch.Generator().manual_seed(52)
    shape = (len(pick),) + SHAPE[1:]
    x, out = _step_inputs(g, "fixed_small", shape)
    noise = torch.cat([_ddpm_noise(200 + i, (1,) + SHAPE[1:]) for i in range(len(pick))])
    prev, x0 = fastdiff.ddpm_step(out, t, x, s, t_prev=tp, noise=noise, **okw)
    for i in range(len(pick)):
        exp = sched.step(out[i:i + 1], int(t[i]), x[i:i + 1], generator=torch.Generator().manual_seed(200 + i))
        tol = _stock_tol(s, int(tp[i]))
        _close(prev[i:i + 1], exp.prev_sample, tol, f"sample {i} t={int(t[i])}")
        _close(x0[i:i + 1], exp.pred_original_sample, tol, f"sample {i} t={int(t[i])}")


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1"])
def test_ddim_per_sample_timesteps(eta):
    sched, s, okw = _ddim_scheduler("scaled_linear", "v_prediction", "threshold", False, "leading")
    sched.set_timesteps(50)
    ts = [980, 500, 20, 0]  # t_prev = t - 20: 960, 480, 0, -20 (-> final_alpha_cumprod)
    g = torch.Generator().manual_seed(53)
    shape = (len(ts),) + SHAPE[1:]
    x = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    z = torch.randn(shape, generator=g)
    tp = torch.tensor([max(t - 20, -1) for t in ts])
    prev, x0 = fastdiff.ddim_step(out, torch.tensor(ts), x, s, t_prev=tp, eta=eta, noise=z, **okw)
    for i, t in enumerate(ts):
        exp = sched.step(out[i:i + 1], t, x[i:i + 1], eta=eta, variance_noise=z[i:i + 1])
        tol = _stock_tol(s, int(tp[i]), okw["final_alpha_cumprod"], t, eta)
        _close(prev[i:i + 1], exp.prev_sample, tol, f"sample {i} t={t}")
        _close(x0[i:i + 1], exp.pred_original_sample, tol, f"sample {i} t={t}")


# ------------------------------------------------ configurations & layouts --
def test_thresholding_takes_precedence_over_clip_sample():
    """diffusers' schedulers default to clip_sample=True; with thresholding=True
    as well, thresholding is applied and clipping is not: so is ours."""
    g = torch.Generator().manual_seed(71)
    x = torch.randn(SHAPE, generator=g)
    out = torch.randn(SHAPE, generator=g)
    kw = dict(clip_sample=True, clip_sample_range=1.0, thresholding=True, sample_max_value=SAMPLE_MAX)
    sched = DDPMScheduler(prediction_type="sample", **kw)
    s = _schedule(sched)
    exp = sched.step(out * 3, 500, x, generator=torch.Generator().manual_seed(1))
    got = fastdiff.ddpm_step(out * 3, 500, x, s, prediction_type="sample", noise=_ddpm_noise(1), **kw)
    assert float(exp.pred_original_sample.abs().max()) <= 1.0  # thresholded: clamp(-s, s) / s
    _close(got[1], exp.pred_original_sample, TOL_STEP, "ddpm pred_original_sample")
    _close(got[0], exp.prev_sample, _stock_tol(s, 499), "ddpm prev_sample")
    sched = DDIMScheduler(prediction_type="sample", **kw)
    sched.set_timesteps(10)
    exp = sched.step(out * 3, 501, x, eta=0.0)
    got = fastdiff.ddim_step(out * 3, 501, x, s, t_prev=401, prediction_type="sample", **kw)
    _close(got[1], exp.pred_original_sample, TOL_STEP, "ddim pred_original_sample")
    _close(got[0], exp.prev_sample, _stock_tol(s, 401), "ddim prev_sample")


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1"])
def test_ddim_stable_diffusion_config(eta):
    """Stable Diffusion's scheduler config: scaled_linear 0.00085..0.012,
    leading spacing with steps_offset=1, set_alpha_to_one=False, 50 steps."""
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    s = NoiseSchedule.make("scaled_linear", T, 0.00085, 0.012)
    torch.testing.assert_close(s.alphas_cumprod, sched.alphas_cumprod.double(), rtol=2e-5, atol=1e-7)
    okw = dict(prediction_type="epsilon", final_alpha_cumprod=float(s.alphas_cumprod[0]))
    assert s.timesteps(50, "leading", steps_offset=1).tolist()[-3:] == [41, 21, 1]
    _check_ddim_steps(sched, s, okw, 50, eta, False, 72, None, "stock")


@pytest.mark.parametrize("which", ["ddpm", "ddim"])
def test_chained_trajectory(which):
    """A whole 10-step sampling loop with a deterministic 'model' (errors may
    accumulate along the chain): the final samples agree."""
    g = torch.Generator().manual_seed(73)
    x_ours = x_theirs = torch.randn(SHAPE, generator=g)
    if which == "ddpm":
        sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="trailing")
    else:
        sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="trailing")
    s = _schedule(sched)
    sched.set_timesteps(10)
    ts = sched.timesteps.tolist()
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        model = lambda x: 0.3 * x + 0.1 * torch.sin(3 * x)  # noqa: E731
        if which == "ddpm":
            x_theirs = sched.step(model(x_theirs), t, x_theirs, generator=torch.Generator().manual_seed(i)).prev_sample
            x_ours = fastdiff.ddpm_step(model(x_ours), t, x_ours, s, t_prev=t_prev, noise=_ddpm_noise(i))[0]
        else:
            z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
            x_theirs = sched.step(model(x_theirs), t, x_theirs, eta=1.0, variance_noise=z).prev_sample
            x_ours = fastdiff.ddim_step(model(x_ours), t, x_ours, s, t_prev=t_prev, eta=1.0, noise=z)[0]
    _close(x_ours, x_theirs, 2e-4, f"{which} after {len(ts)} steps")


_CL = torch.channels_last


def _layout(x, kind):
    if kind == "nchw":
        return x.contiguous()
    if kind == "nhwc":
        return x.contiguous(memory_format=_CL)
    if kind == "hw_transposed":  # dense and batch-major, W before H in memory
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x.transpose(0, 1).contiguous().transpose(0, 1)  # "batch_inner": dense, not batch-major


LAYOUTS = ("nchw", "nhwc", "hw_transposed", "batch_inner")


@pytest.mark.parametrize("lay_x,lay_other", [(a, b) for a in LAYOUTS for b in LAYOUTS if (a, b) != ("nchw", "nchw")]
                         + [("nchw", "nchw")])
def test_layouts_match_diffusers(lay_x, lay_other):
    """Mixed memory layouts of the primary tensor (x0 / sample) and the other
    inputs give diffusers' values (diffusers is layout-agnostic)."""
    sched = DDPMScheduler(clip_sample=False, variance_type="learned_range", prediction_type="v_prediction")
    s = _schedule(sched)
    g = torch.Generator().manual_seed(74)
    x, out = _step_inputs(g, "learned_range", (4, 3, 8, 8))
    t = torch.tensor([1, 500, 999, 30])
    noise = torch.randn(4, 3, 8, 8, generator=g)
    # forward
    xo, no = _layout(x, lay_x), _layout(noise, lay_other)
    _close(fastdiff.q_sample(xo, t, s, no)[0], sched.add_noise(x, noise, t), TOL_FORWARD, "q_sample")
    _close(fastdiff.get_velocity(xo, no, t, s), sched.get_velocity(x, noise, t), TOL_FORWARD, "get_velocity")
    # a step (learned_range: the 2C model output split without copying)
    exp = sched.step(out, 500, x, generator=torch.Generator().manual_seed(3))
    prev, x0 = fastdiff.ddpm_step(_layout(out, lay_other), 500, xo, s, prediction_type="v_prediction",
                                  variance_type="learned_range", noise=_layout(_ddpm_noise(3, (4, 3, 8, 8)), lay_other))
    _close(prev, exp.prev_sample, _stock_tol(s, 499), "ddpm_step prev_sample")
    _close(x0, exp.pred_original_sample, TOL_STEP, "ddpm_step pred_original_sample")
