"""Coefficient tables of the multistep samplers, built once in float64.

Every sampler step of DPM-Solver++ (1/2/3M, midpoint/heun, SDE), UniPC
(bh1/bh2, orders 1-3, corrector fused into the next predictor), Euler, Euler
ancestral and flow-matching Euler is one row of 16 numbers applied by
:func:`fastdiff.ops.multistep.multistep_step`::

    x0   = c_x*sample + c_m*model_output                       (then clip/threshold)
    xc   = u_last*last_sample + u_x0*x0 + sum_j u_hj*H[j]      if u_on, else sample
    prev = a_x*xc + a_m*model_output + a_x0*x0 + sum_j a_hj*H[j] + a_z*z
    push: H <- x0, last_sample <- xc

with H[j] the data prediction of j steps ago. Everything that diffusers
decides with a Python branch at each step (warm-up orders, lower_order_final,
euler_at_final, the final sigma, whether UniPC's corrector runs) is decided
here, once, and becomes a row.

Warm-up depends on where sampling starts (img2img starts mid-chain), so the
builders return ``levels``: an (L, n, 16) array whose row ``[w, i]`` is step
``i`` when ``w`` steps of this run came before it (w capped at L - 1). The
scheduler gathers the (n, 16) table for a start index k as
``levels[clamp(i - k, 0, L - 1), i]``, on the device.

The sigma schedules (Karras, exponential, beta, flow, log-linear) follow
diffusers' ``set_timesteps`` layouts; they are computed in float64 here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

NCOEF = 16
COLUMNS = ("c_x", "c_m", "u_on", "u_last", "u_x0", "u_h1", "u_h2", "u_h3",
           "a_x", "a_m", "a_x0", "a_h1", "a_h2", "a_h3", "a_z", "push")
C = {name: n for n, name in enumerate(COLUMNS)}
U_H = (C["u_h1"], C["u_h2"], C["u_h3"])
A_H = (C["a_h1"], C["a_h2"], C["a_h3"])


# ------------------------------------------------------------ sigmas --------
def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n sigmas from sigma_max down to sigma_min,
    evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Lee et al. (2024), "Beta sampling is all you need": sigma_min +
    (sigma_max - sigma_min) * BetaPPF(1 - u; a, b), u evenly spaced in [0, 1]."""
    try:
        from scipy.stats import beta as beta_dist
    except ImportError as e:  # pragma: no cover - scipy is a test/runtime dependency here
        raise ImportError("use_beta_sigmas needs scipy") from e
    ppf = beta_dist.ppf(1.0 - np.linspace(0.0, 1.0, n), a, b)
    return sigma_min + ppf * (sigma_max - sigma_min)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas``: linear interpolation in
    log sigma over the (ascending) training table ``log_sigmas``, clamped to
    its ends."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    ls = np.log(np.maximum(sigmas, 1e-10))
    T = log_sigmas.shape[0]
    # the last training index whose log sigma is <= ls (at most T - 2)
    lo = np.clip(np.searchsorted(log_sigmas, ls, side="right") - 1, 0, T - 2)
    lo_v, hi_v = log_sigmas[lo], log_sigmas[lo + 1]
    w = np.clip((lo_v - ls) / (lo_v - hi_v), 0.0, 1.0)
    return (1 - w) * lo + w * (lo + 1)


def vp_alpha_sigma(s, flow: bool):
    """(alpha_t, sigma_t) of the sampler's sigma s: VP (s = sigma/alpha) or
    flow matching (alpha = 1 - s, sigma = s)."""
    s = np.asarray(s, dtype=np.float64)
    if flow:
        return 1.0 - s, s
    a = 1.0 / np.sqrt(s * s + 1.0)
    return a, s * a


def log_snr(s, flow: bool):
    """lambda = log(alpha / sigma): +inf at s = 0."""
    a, sg = vp_alpha_sigma(s, flow)
    with np.errstate(divide="ignore"):
        return np.log(a) - np.log(sg)


# ------------------------------------------------------ model output --------
def convert_coefs(prediction_type: str, s: float, flow: bool) -> tuple:
    """(c_x, c_m) with x0 = c_x*sample + c_m*model_output for a VP/flow sample
    at sigma s (DPM-Solver++, UniPC)."""
    a, sg = vp_alpha_sigma(s, flow)
    a, sg = float(a), float(sg)
    if prediction_type == "epsilon":
        return 1.0 / a, -sg / a
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return a, -sg
    if prediction_type == "flow_prediction":
        return 1.0, -float(s)
    raise ValueError(f"prediction_type must be one of epsilon, sample, v_prediction, flow_prediction, got "
                     f"{prediction_type!r}")


def eps_coefs(prediction_type: str, s: float, flow: bool) -> tuple:
    """(c_x, c_m) with eps = c_x*sample + c_m*model_output (noise-prediction
    DPM-Solver keeps eps where DPM-Solver++ keeps x0)."""
    a, sg = (float(v) for v in vp_alpha_sigma(s, flow))
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "sample":
        return 1.0 / sg, -a / sg
    if prediction_type == "v_prediction":
        return sg, a
    raise ValueError(f"prediction_type must be one of epsilon, sample, v_prediction for the noise-prediction "
                     f"DPM-Solver, got {prediction_type!r}")


def _row() -> np.ndarray:
    return np.zeros(NCOEF, dtype=np.float64)


# ------------------------------------------------------ DPM-Solver++ --------
def _quiet(fn):
    """Evaluate in numpy float semantics: a division by zero gives inf/NaN (as
    in diffusers' tensors), which the scheduler then reports, not an exception."""
    def wrapped(*args, **kwargs):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)
    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


def usable_order(lam: np.ndarray, src: int, dst: int, order: int) -> int:
    """The order a multistep update from sigma index ``src`` to ``dst`` can
    have: 0 for a step of zero length (the identity), 1 for a step into or out
    of an infinite log-SNR (sigma = 0, or alpha = 0), else the largest q <=
    order whose points lam[src], lam[src - 1], ..., lam[src - q + 1] are finite
    and pairwise distinct (a repeated timestep makes the finite differences
    0/0). diffusers evaluates such steps as written and gets NaN or divides
    by zero; in exact arithmetic their limits are these lower-order steps."""
    h = lam[dst] - lam[src]
    if h == 0:
        return 0
    if not np.isfinite(h):
        return 1
    pts = [lam[src]]
    q = 1
    while q < order and src - q >= 0:
        v = lam[src - q]
        if not np.isfinite(v) or any(v == u for u in pts):
            break
        pts.append(v)
        q += 1
    return q


def _identity_row(r: np.ndarray) -> None:
    r[C["a_x"]] = 1.0
    for name in ("a_m", "a_x0", "a_h1", "a_h2", "a_h3", "a_z"):
        r[C[name]] = 0.0


@_quiet
def dpmsolver_levels(sigmas: np.ndarray, *, solver_order: int, solver_type: str, algorithm_type: str,
                     prediction_type: str, lower_order_final: bool, euler_at_final: bool,
                     final_sigmas_type: str, flow: bool) -> np.ndarray:
    """DPM-Solver multistep rows (Lu et al. 2022).

    Args:
        sigmas: (n + 1,) float64, the n step sigmas then the final one.
        solver_order: 1, 2 or 3. solver_type: "midpoint" or "heun" (order 2).
        algorithm_type: "dpmsolver++" (data prediction, ODE), "sde-dpmsolver++"
            (a_z noise), or the noise-prediction "dpmsolver" / "sde-dpmsolver"
            (then c_x, c_m convert the model output to eps, and the history
            holds eps: these rows must be run without thresholding/clipping).
        the others: diffusers' options of the same names.

    Returns: (solver_order, n, 16) levels (see the module docstring).
    """
    n = sigmas.shape[0] - 1
    sde = algorithm_type.startswith("sde-")
    plus = algorithm_type.endswith("++")
    lam = log_snr(sigmas, flow)
    L = solver_order
    out = np.zeros((L, n, NCOEF))
    for w in range(L):
        for i in range(n):
            lower = min(w, i, solver_order)  # diffusers' lower_order_nums before this step (w <= i always)
            last = i == n - 1
            lof = last and (euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == "zero")
            los = i == n - 2 and lower_order_final and n < 15
            if solver_order == 1 or lower < 1 or lof:
                p = 1
            elif solver_order == 2 or lower < 2 or los:
                p = 2
            else:
                p = 3
            r = _row()
            if plus:
                r[C["c_x"]], r[C["c_m"]] = convert_coefs(prediction_type, sigmas[i], flow)
            else:
                r[C["c_x"]], r[C["c_m"]] = eps_coefs(prediction_type, sigmas[i], flow)
            r[C["push"]] = 1.0
            p = min(p, usable_order(lam, i, i + 1, p))
            a_t, s_t = (float(v) for v in vp_alpha_sigma(sigmas[i + 1], flow))
            a_0, s_0 = (float(v) for v in vp_alpha_sigma(sigmas[i], flow))
            if p == 0:
                _identity_row(r)
                out[w, i] = r
                continue
            h = np.float64(lam[i + 1] - lam[i])
            # D-vectors over (m0, H1, H2): finite differences of the history
            D0 = np.array([1.0, 0.0, 0.0])
            D1 = D2 = np.zeros(3)
            if p >= 2:
                r0 = np.float64(lam[i] - lam[i - 1]) / h
                d10 = (np.array([1.0, -1.0, 0.0])) / r0
                D1 = d10
                if p == 3:
                    r1 = np.float64(lam[i - 1] - lam[i - 2]) / h
                    d11 = np.array([0.0, 1.0, -1.0]) / r1
                    D1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
                    D2 = (d10 - d11) / (r0 + r1)
            if plus:
                em = np.expm1(-h)                                # e^{-h} - 1
                if not sde:
                    r[C["a_x"]] = s_t / s_0
                    c0 = -a_t * em
                    c1 = -0.5 * a_t * em if (p == 2 and solver_type == "midpoint") else a_t * (em / h + 1.0)
                    c2 = -a_t * ((em + h) / h ** 2 - 0.5) if p == 3 else 0.0
                else:
                    em2 = -np.expm1(-2 * h)                      # 1 - e^{-2h}
                    r[C["a_x"]] = s_t / s_0 * np.exp(-h)
                    c0 = a_t * em2
                    c1 = 0.5 * a_t * em2 if (p == 2 and solver_type == "midpoint") else \
                        a_t * (em2 / (-2.0 * h) + 1.0)
                    c2 = a_t * ((em2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if p == 3 else 0.0
                    r[C["a_z"]] = s_t * np.sqrt(em2)
            else:
                ep = np.expm1(h)                                 # e^{h} - 1
                r[C["a_x"]] = a_t / a_0
                if not sde:
                    c0 = -s_t * ep
                    c1 = -0.5 * s_t * ep if (p == 2 and solver_type == "midpoint") else -s_t * (ep / h - 1.0)
                    c2 = -s_t * ((ep - h) / h ** 2 - 0.5) if p == 3 else 0.0
                else:
                    if p == 3:
                        raise ValueError("algorithm_type='sde-dpmsolver' has no third-order update")
                    c0 = -2.0 * s_t * ep
                    c1 = -s_t * ep if solver_type == "midpoint" else -2.0 * s_t * (ep / h - 1.0)
                    c2 = 0.0
                    r[C["a_z"]] = s_t * np.sqrt(np.expm1(2 * h))
            coef = c0 * D0 + (c1 * D1 if p >= 2 else 0.0) + (c2 * D2 if p == 3 else 0.0)
            r[C["a_x0"]] = coef[0]
            r[C["a_h1"]], r[C["a_h2"]] = coef[1], coef[2]
            out[w, i] = r
    return out


# ------------------------------------------------------------- UniPC --------
def _unipc_b(hh: float, order: int, solver_type: str):
    """UniPC's b vector (length order) and B(h)."""
    h_phi_1 = np.expm1(hh)
    B_h = hh if solver_type == "bh1" else np.expm1(hh)
    b = []
    h_phi_k = h_phi_1 / hh - 1.0
    fact = 1
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return np.array(b), B_h, h_phi_1


def _solve(R, b):
    """R^-1 b, NaN where R is singular or not finite (reported by the scheduler)."""
    try:
        return np.linalg.solve(R, b)
    except np.linalg.LinAlgError:
        return np.full(b.shape, np.nan)


def _unipc_update(lam: np.ndarray, sigmas: np.ndarray, src: int, dst: int, order: int, solver_type: str,
                  flow: bool, corrector: bool):
    """Coefficients of one UniP (predictor) or UniC (corrector) update from
    sigma index ``src`` to ``dst``, over the basis (x_src, m0, m_1, m_2, m_t):
    m0 the data prediction at src, m_k the one k steps before src, m_t the one
    at dst (corrector only)."""
    a_t, s_t = (float(v) for v in vp_alpha_sigma(sigmas[dst], flow))
    a_0, s_0 = (float(v) for v in vp_alpha_sigma(sigmas[src], flow))
    h = np.float64(lam[dst] - lam[src])
    out = np.zeros(5)
    out[0] = s_t / s_0
    if not math.isfinite(h):  # to sigma = 0: x_t = x0 exactly (only the first-order step gets here)
        out[1] = a_t
        if order > 1 or corrector:
            out[:] = np.nan
        return out
    hh = -h
    h_phi_1 = np.expm1(hh)
    B_h = hh if solver_type == "bh1" else np.expm1(hh)
    out[1] = -a_t * h_phi_1
    rks = [np.float64(lam[src - k] - lam[src]) / h for k in range(1, order)]  # the past points, in units of h
    if corrector:
        if order == 1:
            rhos = np.array([0.5])
        else:
            b, _, _ = _unipc_b(hh, order, solver_type)
            R = np.stack([np.array(rks + [1.0]) ** (k - 1) for k in range(1, order + 1)])
            rhos = _solve(R, b)
        # D1s_k = (m_k - m0) / rk ; D1_t = m_t - m0
        for k, rk in enumerate(rks, start=1):
            out[1 + k] += -a_t * B_h * rhos[k - 1] / rk
            out[1] -= -a_t * B_h * rhos[k - 1] / rk
        out[4] += -a_t * B_h * rhos[-1]
        out[1] -= -a_t * B_h * rhos[-1]
    elif order >= 2:
        if order == 2:
            rhos = np.array([0.5])
        else:
            b, _, _ = _unipc_b(hh, order, solver_type)
            R = np.stack([np.array(rks + [1.0]) ** (k - 1) for k in range(1, order + 1)])
            rhos = _solve(R[:-1, :-1], b[:-1])
        for k, rk in enumerate(rks, start=1):
            out[1 + k] += -a_t * B_h * rhos[k - 1] / rk
            out[1] -= -a_t * B_h * rhos[k - 1] / rk
    return out


@_quiet
def unipc_levels(sigmas: np.ndarray, *, solver_order: int, solver_type: str, prediction_type: str,
                 lower_order_final: bool, disable_corrector: Sequence[int], flow: bool) -> np.ndarray:
    """UniPC (Zhao et al. 2023, data prediction, B(h) = h or e^h - 1) rows:
    row i applies the corrector UniC of step i - 1 (xc, from last_sample, the
    history and this step's x0) and then the predictor UniP from xc.

    Returns: (solver_order + 1, n, 16) levels."""
    n = sigmas.shape[0] - 1
    lam = log_snr(sigmas, flow)
    L = solver_order + 1
    disabled = set(int(d) for d in disable_corrector)

    def this_order(w, i):
        o = min(solver_order, n - i) if lower_order_final else solver_order
        return min(o, min(w, solver_order) + 1)

    out = np.zeros((L, n, NCOEF))
    for w0 in range(L):
        for i in range(n):
            w = min(w0, i)  # a run that starts at k has w = i - k <= i steps behind it
            r = _row()
            r[C["c_x"]], r[C["c_m"]] = convert_coefs(prediction_type, sigmas[i], flow)
            r[C["push"]] = 1.0
            pc = this_order(w - 1, i - 1) if w >= 1 and i > 0 else 0
            # the corrector fits a polynomial through lam[i - 1], ..., lam[i - pc] and lam[i]
            pc = min(pc, usable_order(lam, i - 1, i, pc)) if pc else 0
            if pc and (i - 1) not in disabled and np.isfinite(lam[i]):
                cu = _unipc_update(lam, sigmas, i - 1, i, pc, solver_type, flow, corrector=True)
                r[C["u_on"]] = 1.0
                r[C["u_last"]] = cu[0]
                r[C["u_h1"]] = cu[1]          # m0 of the corrector = x0 of step i - 1
                r[C["u_h2"]], r[C["u_h3"]] = cu[2], cu[3]
                r[C["u_x0"]] = cu[4]
            p = min(this_order(w, i), usable_order(lam, i, i + 1, this_order(w, i)))
            if p == 0:
                _identity_row(r)
                out[w0, i] = r
                continue
            pu = _unipc_update(lam, sigmas, i, i + 1, p, solver_type, flow, corrector=False)
            r[C["a_x"]] = pu[0]
            r[C["a_x0"]] = pu[1]
            r[C["a_h1"]], r[C["a_h2"]] = pu[2], pu[3]
            out[w0, i] = r
    return out


# ----------------------------------------------------- Euler family ---------
def euler_rows(sigmas: np.ndarray, prediction_type: str, sigma_hat: Optional[np.ndarray] = None) -> np.ndarray:
    """Euler (Karras et al. 2022, algorithm 2 without the 2nd-order correction)
    on the VE sample x = x_vp * sqrt(sigma^2 + 1): prev = x + (x - x0)/sigma_hat
    * (sigma_next - sigma_hat). ``sigma_hat`` (n,) is sigma*(1 + gamma) with
    churn (the churn noise itself is added to the sample before the step).
    Returns (1, n, 16)."""
    n = sigmas.shape[0] - 1
    out = np.zeros((1, n, NCOEF))
    for i in range(n):
        s = float(sigmas[i])
        sh = s if sigma_hat is None else float(sigma_hat[i])
        if prediction_type == "epsilon":
            cx, cm = 1.0, -sh
        elif prediction_type == "v_prediction":
            cx, cm = 1.0 / (s * s + 1.0), -s / math.sqrt(s * s + 1.0)
        elif prediction_type in ("sample", "original_sample"):
            cx, cm = 0.0, 1.0
        else:
            raise ValueError(f"prediction_type must be one of epsilon, v_prediction, sample, got {prediction_type!r}")
        dt = float(sigmas[i + 1]) - sh
        r = out[0, i]
        r[C["c_x"]], r[C["c_m"]] = cx, cm
        # prev = x (1 + dt/sh) - (dt/sh) (cx x + cm m)
        r[C["a_x"]] = 1.0 + dt / sh * (1.0 - cx)
        r[C["a_m"]] = -dt / sh * cm
    return out


def euler_ancestral_rows(sigmas: np.ndarray, prediction_type: str) -> np.ndarray:
    """Euler ancestral: the Euler step to sigma_down, then sigma_up noise, with
    sigma_up = sqrt(s_to^2 (s_from^2 - s_to^2) / s_from^2), sigma_down =
    sqrt(s_to^2 - sigma_up^2). Returns (1, n, 16)."""
    n = sigmas.shape[0] - 1
    out = np.zeros((1, n, NCOEF))
    for i in range(n):
        s, s_to = float(sigmas[i]), float(sigmas[i + 1])
        # (clamped at 0: a step to a larger sigma, which a rescaled zero-terminal-SNR chain can have at its
        # first step, adds no noise; diffusers takes the square root of a negative number there)
        up = math.sqrt(max(s_to ** 2 * (s ** 2 - s_to ** 2) / s ** 2, 0.0))
        down = math.sqrt(max(s_to ** 2 - up ** 2, 0.0))
        if prediction_type == "epsilon":
            cx, cm = 1.0, -s
        elif prediction_type == "v_prediction":
            cx, cm = 1.0 / (s * s + 1.0), -s / math.sqrt(s * s + 1.0)
        elif prediction_type == "sample":
            cx, cm = 0.0, 1.0
        else:
            raise ValueError(f"prediction_type must be one of epsilon, v_prediction, sample, got {prediction_type!r}")
        dt = down - s
        r = out[0, i]
        r[C["c_x"]], r[C["c_m"]] = cx, cm
        r[C["a_x"]] = 1.0 + dt / s * (1.0 - cx)
        r[C["a_m"]] = -dt / s * cm
        r[C["a_z"]] = up
    return out


def flow_euler_rows(sigmas: np.ndarray, stochastic: bool) -> np.ndarray:
    """Flow-matching Euler on x_s = (1 - s) x0 + s eps with a velocity model v:
    prev = x + (s_next - s) v; stochastic: prev = (1 - s_next) x0 + s_next z
    with x0 = x - s v. Returns (1, n, 16)."""
    n = sigmas.shape[0] - 1
    out = np.zeros((1, n, NCOEF))
    for i in range(n):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        r = out[0, i]
        r[C["c_x"]], r[C["c_m"]] = 1.0, -s
        if stochastic:
            r[C["a_x0"]] = 1.0 - sn
            r[C["a_z"]] = sn
        else:
            r[C["a_x"]] = 1.0
            r[C["a_m"]] = sn - s
    return out


def history_depth(levels: np.ndarray) -> int:
    """The history slots K the rows need: the largest age j with a nonzero
    u_hj / a_hj (0 if none)."""
    K = 0
    for j in range(3):
        if np.any(levels[..., U_H[j]] != 0) or np.any(levels[..., A_H[j]] != 0):
            K = j + 1
    return K


def evaluate_rows(coeffs: np.ndarray, model_outputs: Sequence, x_T, noises: Optional[Sequence] = None,
                  clip=None):
    """Run a whole trajectory through the linear form in float64 numpy (a plain
    evaluation of the table for tests and debugging). ``model_outputs`` is a
    callable (i, x) -> model output. Returns the list of x after each step."""
    x = np.asarray(x_T, dtype=np.float64)
    H = {}
    last = np.zeros_like(x)
    xs = []
    for i, r in enumerate(coeffs):
        m = np.asarray(model_outputs(i, x), dtype=np.float64)
        x0 = r[C["c_x"]] * x + r[C["c_m"]] * m
        if clip is not None:
            x0 = clip(x0)
        get = lambda j: H.get(i - j, np.zeros_like(x))  # noqa: E731
        if r[C["u_on"]] != 0:
            xc = r[C["u_last"]] * last + r[C["u_x0"]] * x0 + sum(r[U_H[j - 1]] * get(j) for j in (1, 2, 3))
        else:
            xc = x
        prev = r[C["a_x"]] * xc + r[C["a_m"]] * m + r[C["a_x0"]] * x0 + \
            sum(r[A_H[j - 1]] * get(j) for j in (1, 2, 3))
        if r[C["a_z"]] != 0:
            prev = prev + r[C["a_z"]] * np.asarray(noises[i], dtype=np.float64)
        if r[C["push"]] != 0:
            H[i] = x0
            last = xc
        x = prev
        xs.append(x)
    return xs
