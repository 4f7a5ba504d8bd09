"""Exponential integrators in log-SNR, as diffusers' DPM-Solver family has them:
DPM-Solver++(2M), UniPC (Zhao et al. 2023), DEIS (Zhang & Chen 2023) and singlestep DPM-Solver++.

These classes place their steps nearly alike (`log_snr_schedule`). All step-number bookkeeping
(noise levels, which order each step runs at, the weights over past model outputs, UniPC's
corrector weights) is done on the host in float64 when a sampler is built; the jitted `step`
converts the model output, appends it to a fixed-size history of past outputs kept in its state,
and combines them with one row of the weight tables.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sdjax.sampling.solver import (COMMON, OTHER_SAMPLERS, THRESHOLDING, SamplerSpec, Scheduler,
                                   dynamic_threshold, either, sigma_ramp, table, thresholding_of)
from sdjax.sampling.timesteps import (alphas_cumprod, interpolate_sigmas, lu_sigmas,
                                      sigma_to_timestep, sigmas_of)


def log_snr_schedule(settings, steps, cosine_fractional=False, ramp_final=False):
    """The timesteps (int64) and noise levels (float64 values of float32 sigmas, one more than
    steps: the level the last step ends at) of the diffusers DPM-Solver family for `steps` steps.

    Timesteps are spaced as timestep_spacing says below the lambda_min_clipped cut (where the
    class has one), then replaced by those of Lu, Karras, exponential or beta noise levels when the
    config asks. The classes differ in two places: DPMSolverMultistepScheduler leaves Karras and
    Lu timesteps fractional (truncated) for a cosine schedule (`cosine_fractional`); UniPC and DEIS
    end a ramp of levels at its own last level rather than the smallest training sigma
    (`ramp_final`). A final_sigmas_type of zero ends at 0 (DEIS has no such key: never)."""
    alpha_bar = alphas_cumprod(settings, lift_terminal=True)
    train_sigmas = sigmas_of(alpha_bar)
    n = settings["num_train_timesteps"]
    lambdas = 0.5 * (np.log(alpha_bar) - np.log(1 - alpha_bar))
    clip = settings.get("lambda_min_clipped", -math.inf)
    last = n - int(np.searchsorted(lambdas[::-1], clip))
    spacing = settings["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        timesteps = ((np.arange(steps + 1) * (last // (steps + 1))).round()[::-1][:-1]
                     + settings["steps_offset"])
    else:
        timesteps = np.arange(last, 0, -n / steps).round() - 1
    ramp = sigma_ramp(settings)
    lu = settings.get("use_lu_lambdas") and not settings["use_karras_sigmas"]
    if lu:
        # Evenly spaced in log-SNR (Lu et al.) between the extreme training sigmas; this comes
        # before exponential and beta levels in diffusers.
        ramp = lu_sigmas
        sigmas = lu_sigmas(train_sigmas, steps)
    elif ramp is not None:  # between the config's sigma_max / sigma_min, or the training ones
        sigmas = ramp(either(settings["sigma_max"], train_sigmas[-1]),
                      either(settings["sigma_min"], train_sigmas[0]), steps)
    if ramp is not None:
        timesteps = sigma_to_timestep(sigmas, train_sigmas)
        # Karras (and Lu) levels go to the nearest timestep; all are then truncated to whole ones.
        cosine = settings["beta_schedule"] == "squaredcos_cap_v2"
        if (settings["use_karras_sigmas"] or lu) and not (cosine_fractional and cosine):
            timesteps = timesteps.round()
    else:
        sigmas = interpolate_sigmas(timesteps, train_sigmas)
    final = settings.get("final_sigmas_type", "sigma_min")
    if final == "zero":
        end = 0.0
    elif ramp is not None and ramp_final:
        end = sigmas[-1]
    else:
        end = train_sigmas[0]
    sigmas = np.append(sigmas, end).astype(np.float32)
    return timesteps.astype(np.int64), sigmas.astype(np.float64)


def log_snr_terms(sigmas):
    """alpha_t = 1/sqrt(sigma^2+1), sigma_t = sigma alpha_t and lambda = log(alpha_t/sigma_t) of
    each noise level (lambda is +inf at a zero final level)."""
    alpha = 1.0 / np.sqrt(sigmas ** 2 + 1)
    sigma_t = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_t)
    return alpha, sigma_t, lam


class DPMSolverPP2M(Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver on data predictions,
    first order at the first step and (with a zero final sigma) the last. `dpmpp_2m_karras` puts
    the steps at Karras noise levels; `dpmpp_2m` at the config's (spaced timesteps, or Lu,
    exponential or beta noise levels). Data predictions are dynamically thresholded when the
    config asks (thresholding).

    In sigma terms, with a = 1/sqrt(sigma^2+1) and lambda = log(1/sigma), each step is
    x_next = A x + B0 D_i + B1 D_{i-1}, where D are the data predictions; A, B0, B1 per step are
    host tables."""

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        self.timesteps, sigmas = log_snr_schedule(settings, steps, cosine_fractional=True)
        self._build_tables(sigmas, settings, settings["final_sigmas_type"] == "zero")

    def _build_tables(self, sigmas, settings, final_zero):
        count = len(self.timesteps)
        alpha, sigma_t, lam = log_snr_terms(sigmas)
        if self.prediction_type == "epsilon":
            self._x0_sample, self._x0_output = 1.0 / alpha[:-1], -sigma_t[:-1] / alpha[:-1]
        else:
            self._x0_sample, self._x0_output = alpha[:-1], -sigma_t[:-1]
        first_order_last = settings["euler_at_final"] or final_zero or (
            settings["lower_order_final"] and count < 15)
        a_coef, b0, b1 = np.zeros(count), np.zeros(count), np.zeros(count)
        for i in range(count):
            h = lam[i + 1] - lam[i]
            a_coef[i] = sigma_t[i + 1] / sigma_t[i]
            phi = alpha[i + 1] * (np.exp(-h) - 1.0)  # exp(-inf) = 0 at the end
            if i == 0 or (i == count - 1 and first_order_last):
                b0[i] = -phi
                continue
            r = (lam[i] - lam[i - 1]) / h
            if settings["solver_type"] == "midpoint":
                b0[i], b1[i] = -phi - 0.5 * phi / r, 0.5 * phi / r
            else:  # heun
                c = alpha[i + 1] * ((np.exp(-h) - 1.0) / h + 1.0) / r
                b0[i], b1[i] = -phi + c, -c
        self._a, self._b0, self._b1 = a_coef, b0, b1
        self._threshold = thresholding_of(settings)

    def init_state(self, sample):
        return {"previous_x0": jnp.zeros(sample.shape, jnp.float32)}

    def step(self, state, i, model_output, sample, noise=None):
        x0 = table(self._x0_sample)[i] * sample + table(self._x0_output)[i] * model_output
        if self._threshold is not None:
            x0 = dynamic_threshold(x0, *self._threshold)
        prev = (table(self._a)[i] * sample + table(self._b0)[i] * x0
                + table(self._b1)[i] * state["previous_x0"])
        return prev, {"previous_x0": x0}


class HistorySolver(Scheduler):
    """A multistep solver whose step i converts the model output to a data (or noise) prediction
    m_i, then combines the window [m_{i-W+1}, ..., m_i] of the last W predictions with one row of
    a (steps, W) weight table. The state keeps the W - 1 older predictions (zeros before the first
    steps, where the weights are 0). Subclasses set the noise levels (`_set_levels`) and tables."""

    window = 1

    def _set_levels(self, settings, steps, ramp_final=False):
        self.timesteps, sigmas = log_snr_schedule(settings, steps, ramp_final=ramp_final)
        self._alpha, self._sigma_t, self._lambda = log_snr_terms(sigmas)
        self._threshold = thresholding_of(settings)

    def _convert_to_data(self):
        """Step i's data prediction x0 = [x0_sample] x + [x0_output] model_output."""
        alpha, sigma_t = self._alpha[:-1], self._sigma_t[:-1]
        if self.prediction_type == "epsilon":
            self._x0_sample, self._x0_output = 1.0 / alpha, -sigma_t / alpha
        else:
            self._x0_sample, self._x0_output = alpha, -sigma_t

    def data_prediction(self, i, model_output, sample):
        x0 = table(self._x0_sample)[i] * sample + table(self._x0_output)[i] * model_output
        if self._threshold is not None:
            x0 = dynamic_threshold(x0, *self._threshold)
        return x0

    def init_state(self, sample):
        return {"history": jnp.zeros((self.window - 1,) + sample.shape, jnp.float32)}

    def _window(self, state, prediction):
        history = state["history"]
        return [history[k] for k in range(self.window - 1)] + [prediction]

    @staticmethod
    def _mix(weights, window):
        """sum_k weights[k] window[k], elementwise (no matrix unit rounds it)."""
        total = weights[0] * window[0]
        for k in range(1, len(window)):
            total = total + weights[k] * window[k]
        return total

    def _next_state(self, window, **extra):
        history = jnp.stack(window[1:]) if self.window > 1 else jnp.zeros((0,) + window[0].shape)
        return dict(history=history, **extra)


def _unipc_terms(lam, t, s0, older, x0, bh1):
    """UniPC's quantities for a step from level s0 to t that uses the predictions at levels
    `older` (newest first) too: h*phi_1(h), B(h), the ratios r_k and the (order x order) system
    R, b of its coefficients (order = len(older) + 1)."""
    h = lam[t] - lam[s0]
    hh = -h if x0 else h
    h_phi_1 = np.expm1(hh)
    b_h = hh if bh1 else np.expm1(hh)
    with np.errstate(divide="ignore", invalid="ignore"):  # h = 0 where a ramp repeats its end
        rks = np.array([(lam[s] - lam[s0]) / h for s in older] + [1.0])
        order = len(rks)
        h_phi_k, factorial = h_phi_1 / hh - 1.0, 1.0
        rows, b = [], []
        for k in range(1, order + 1):
            rows.append(rks ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, rks, np.array(rows), np.array(b)


class UniPC(HistorySolver):
    """UniPC (Zhao et al. 2023), diffusers' UniPCMultistepScheduler: a predictor of order up to
    solver_order (UniP) on data predictions (predict_x0) or noise predictions, each step's result
    then corrected with the next step's model output (UniC) unless disable_corrector lists the
    step; B(h) = h (bh1) or e^h - 1 (bh2). Orders rise from 1 over the first steps and, with
    lower_order_final, fall to 1 at the end.

    Per step i, with the window [m_{i-W+1}, ..., m_i] of predictions (W = solver_order + 1):
    corrected = K_i x + L_i x_last + C_i . window (x itself where no correction applies),
    x_next = A_i corrected + P_i . window; x_last (the previous step's corrected input) is kept
    in the state."""

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        self._set_levels(settings, steps, ramp_final=True)
        order, count = settings["solver_order"], len(self.timesteps)
        self.window = order + 1
        x0, bh1 = settings["predict_x0"], settings["solver_type"] == "bh1"
        alpha, sigma_t, lam = self._alpha, self._sigma_t, self._lambda
        if x0:
            self._convert_to_data()
        else:  # the noise prediction: the output itself, or from v
            v = self.prediction_type == "v_prediction"
            self._eps_sample = sigma_t[:-1] if v else np.zeros(count)
            self._eps_output = alpha[:-1] if v else np.ones(count)
            self._threshold = None  # diffusers thresholds data predictions only
        coef = alpha if x0 else sigma_t  # the factor on the step's terms

        def ratio(t, s):
            return sigma_t[t] / sigma_t[s] if x0 else alpha[t] / alpha[s]

        orders = [min(order, i + 1, count - i if settings["lower_order_final"] else order)
                  for i in range(count)]
        skip = set(settings["disable_corrector"] or ())
        w = self.window
        self._keep, self._last = np.ones(count), np.zeros(count)
        self._corrector, self._predictor = np.zeros((count, w)), np.zeros((count, w))
        self._scale = np.zeros(count)
        for i in range(count):
            if i > 0 and i - 1 not in skip:  # UniC on the previous step, with its order
                p, s0 = orders[i - 1], i - 1
                h_phi_1, b_h, rks, rows, b = _unipc_terms(
                    lam, i, s0, [s0 - k for k in range(1, p)], x0, bh1)
                rhos = np.array([0.5]) if p == 1 else np.linalg.solve(rows, b)
                c = self._corrector[i]
                c[w - 2] = -coef[i] * h_phi_1
                for k in range(1, p):  # (m_{s0-k} - m_{s0}) / r_k terms
                    c[w - 2 - k] -= coef[i] * b_h * rhos[k - 1] / rks[k - 1]
                    c[w - 2] += coef[i] * b_h * rhos[k - 1] / rks[k - 1]
                c[w - 1] -= coef[i] * b_h * rhos[-1]  # (m_i - m_{s0}) term
                c[w - 2] += coef[i] * b_h * rhos[-1]
                self._keep[i], self._last[i] = 0.0, ratio(i, s0)
            p = orders[i]
            h_phi_1, b_h, rks, rows, b = _unipc_terms(
                lam, i + 1, i, [i - k for k in range(1, p)], x0, bh1)
            c = self._predictor[i]
            c[w - 1] = -coef[i + 1] * h_phi_1
            if p > 1:
                rhos = np.array([0.5]) if p == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
                for k in range(1, p):
                    c[w - 1 - k] -= coef[i + 1] * b_h * rhos[k - 1] / rks[k - 1]
                    c[w - 1] += coef[i + 1] * b_h * rhos[k - 1] / rks[k - 1]
            self._scale[i] = ratio(i + 1, i)
        self._predicts_x0 = x0

    def init_state(self, sample):
        return dict(super().init_state(sample), last_sample=jnp.zeros(sample.shape, jnp.float32))

    def step(self, state, i, model_output, sample, noise=None):
        if self._predicts_x0:
            m = self.data_prediction(i, model_output, sample)
        else:
            m = table(self._eps_sample)[i] * sample + table(self._eps_output)[i] * model_output
        window = self._window(state, m)
        corrected = (table(self._keep)[i] * sample + table(self._last)[i] * state["last_sample"]
                     + self._mix(table(self._corrector)[i], window))
        prev = table(self._scale)[i] * corrected + self._mix(table(self._predictor)[i], window)
        return prev, self._next_state(window, last_sample=corrected)


class DEIS(HistorySolver):
    """DEIS (Zhang & Chen 2023), diffusers' DEISMultistepScheduler: the log-rho multistep
    integrator on noise predictions (taken from the thresholded data prediction), of order up to
    solver_order (above 3 as 3, as diffusers runs it), first order at the first step and, with
    lower_order_final under 15 steps, lower orders at the last two. Its steps end at the smallest
    training sigma (or a ramp's last level), never at zero.

    Per step, x_next = A_i x + P_i . [eps_{i-W+1}, ..., eps_i], with rho = sigma/alpha and the
    Lagrange-interpolation integrals in log rho as host tables."""

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        self._set_levels(settings, steps, ramp_final=True)
        self._convert_to_data()
        order, count = min(settings["solver_order"], 3), len(self.timesteps)
        self.window = order
        alpha, sigma_t, lam = self._alpha, self._sigma_t, self._lambda
        self._eps_sample, self._eps_data = 1.0 / sigma_t[:-1], -alpha[:-1] / sigma_t[:-1]
        log_rho = np.log(sigma_t / alpha)
        short = settings["lower_order_final"] and count < 15
        self._scale, self._weights = np.zeros(count), np.zeros((count, order))
        for i in range(count):
            p = order
            if order == 1 or i < 1 or (short and i == count - 1):
                p = 1
            elif order == 2 or i < 2 or (short and i == count - 2):
                p = 2
            t, w = i + 1, self._weights[i]
            self._scale[i] = alpha[t] / alpha[i]
            if p == 1:
                w[order - 1] = -sigma_t[t] * np.expm1(lam[t] - lam[i])
                continue
            nodes = [log_rho[i - k] for k in range(p)]  # newest first
            for k in range(p):
                others = nodes[:k] + nodes[k + 1:]
                w[order - 1 - k] = alpha[t] * (_lagrange_integral(log_rho[t], nodes[k], others)
                                               - _lagrange_integral(log_rho[i], nodes[k], others))

    def step(self, state, i, model_output, sample, noise=None):
        x0 = self.data_prediction(i, model_output, sample)
        eps = table(self._eps_sample)[i] * sample + table(self._eps_data)[i] * x0
        window = self._window(state, eps)
        prev = table(self._scale)[i] * sample + self._mix(table(self._weights)[i], window)
        return prev, self._next_state(window)


def _lagrange_integral(log_t, node, others):
    """An antiderivative in rho of the Lagrange basis polynomial in log rho that is 1 at `node`
    and 0 at `others` (one or two), at rho = exp(log_t): DEIS's `ind_fn`."""
    rho = np.exp(log_t)
    if len(others) == 1:
        (c,) = others
        return rho * (log_t - c - 1.0) / (node - c)
    c, d = others
    numerator = rho * (c * (d - log_t + 1.0) - d * log_t + d + log_t ** 2 - 2.0 * log_t + 2.0)
    return numerator / ((node - c) * (node - d))


class DPMSolverPPSinglestep(HistorySolver):
    """Singlestep DPM-Solver++ (Lu et al. 2022), diffusers' DPMSolverSinglestepScheduler: the
    steps run in groups of orders 1, 2, (3), ...; every step of a group starts again from the
    sample at the group's first step and uses the data predictions made within the group. The
    plan per step count follows diffusers: lower_order_final (forced when the steps are not a
    multiple of solver_order, or with a zero final sigma) ends on lower orders, and a zero final
    sigma makes the last step first order.

    Per step, x_next = A_i x_start + P_i . [m_{i-W+1}, ..., m_i]; the state keeps x_start."""

    def __init__(self, name, settings, steps):
        super().__init__(name, settings, steps)
        self._set_levels(settings, steps)
        self._convert_to_data()
        order, count = settings["solver_order"], len(self.timesteps)
        self.window = order
        orders = singlestep_orders(order, count, settings["lower_order_final"],
                                   settings["final_sigmas_type"] == "zero")
        alpha, sigma_t, lam = self._alpha, self._sigma_t, self._lambda
        heun = settings["solver_type"] == "heun"
        self._restart = np.array([p == 1 for p in orders])
        self._scale, self._weights = np.zeros(count), np.zeros((count, order))
        for i, p in enumerate(orders):
            t, s = i + 1, i - (p - 1)  # the group started at step s
            h = lam[t] - lam[s]
            self._scale[i] = sigma_t[t] / sigma_t[s]
            phi = alpha[t] * np.expm1(-h)
            e = np.eye(order)[::-1]  # e[k]: the weights picking m_{i-k} from the window
            if p == 1:
                self._weights[i] = -phi * e[0]
                continue
            if p == 2:
                r0 = (lam[i] - lam[s]) / h
                d0, d1 = e[1], (e[0] - e[1]) / r0
                second = -0.5 * phi * d1 if not heun else alpha[t] * (np.expm1(-h) / h + 1.0) * d1
                self._weights[i] = -phi * d0 + second
                continue
            r0, r1 = (lam[i] - lam[s]) / h, (lam[i - 1] - lam[s]) / h
            d0 = e[2]
            d1_0, d1_1 = (e[1] - e[2]) / r1, (e[0] - e[2]) / r0
            first = alpha[t] * (np.expm1(-h) / h + 1.0)
            if not heun:
                self._weights[i] = -phi * d0 + first * d1_1
            else:
                d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
                self._weights[i] = (-phi * d0 + first * d1
                                    - alpha[t] * ((np.expm1(-h) + h) / h ** 2 - 0.5) * d2)

    def init_state(self, sample):
        return dict(super().init_state(sample), start=jnp.zeros(sample.shape, jnp.float32))

    def step(self, state, i, model_output, sample, noise=None):
        window = self._window(state, self.data_prediction(i, model_output, sample))
        start = jnp.where(jnp.asarray(self._restart)[i], sample, state["start"])
        prev = table(self._scale)[i] * start + self._mix(table(self._weights)[i], window)
        return prev, self._next_state(window, start=start)


def singlestep_orders(order, steps, lower_order_final, final_zero):
    """The order of each step of singlestep DPM-Solver++ (diffusers' get_order_list, with the
    lower_order_final its set_timesteps forces where the steps do not divide into groups, or the
    last sigma is zero)."""
    if lower_order_final or steps % order or final_zero:
        groups, rest = divmod(steps, order)
        if order == 3 and rest == 0:
            orders = [1, 2, 3] * (groups - 1) + [1, 2, 1]
        elif order == 2 and rest == 0:
            orders = [1, 2] * (groups - 1) + [1, 1]
        else:
            orders = list(range(1, order + 1)) * groups + list(range(1, rest + 1))
    else:
        orders = list(range(1, order + 1)) * (steps // order)
    if final_zero:
        orders[-1] = 1
    return [min(p, i + 1) for i, p in enumerate(orders)]


WHERE = "in the scheduler config"
# Solver types DPMSolverMultistepScheduler takes from other solvers' configs and runs as midpoint.
_MIDPOINT_ALIASES = ("logrho", "bh1", "bh2")


def _flow_refusal(s):
    if s["use_flow_sigmas"]:
        return (f"use_flow_sigmas=True {WHERE} is for flow-matching models, which the sdjax "
                "samplers do not run: use a config with use_flow_sigmas false")
    return None


def _unknown(s, key, cls, known):
    """Why a value of `key` the diffusers class `cls` does not know is refused, or None."""
    if s[key] in known:
        return None
    return (f"{key}={s[key]!r} {WHERE} is not one {cls} knows: set it to "
            f"{' or '.join(known)}")


def _learned_variance_refusal(s, cls):
    if s["variance_type"] in ("learned", "learned_range") and s["prediction_type"] == "epsilon":
        return (f"variance_type={s['variance_type']!r} {WHERE} makes {cls} use only the first 3 "
                "channels of the model's output (a model that also predicts its variance), "
                f"which sdjax's DPM-Solver++ does not: {OTHER_SAMPLERS}, or set variance_type to "
                "null if the model predicts no variance")
    return None


def _order_refusal(s, cls, highest):
    order = s["solver_order"]
    if isinstance(order, int) and 1 <= order <= highest:
        return None
    return (f"solver_order={order!r} {WHERE} is not an order sdjax's {cls} sampler runs: set it "
            f"to a whole number from 1 to {highest}")


def _first(*reasons):
    return next((r for r in reasons if r is not None), None)


def _dpm_prepare(s):
    if s["use_karras_sigmas"]:  # the Karras levels come first in diffusers
        s.update(use_lu_lambdas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
    if s["solver_type"] in _MIDPOINT_ALIASES:
        s["solver_type"] = "midpoint"
    return s


def _dpm_refusal(s):
    cls = "DPMSolverMultistepScheduler"
    return _first(_flow_refusal(s), _unknown(s, "solver_type", cls, ("midpoint", "heun")),
                  _learned_variance_refusal(s, cls))


# The algorithm_type and solver_order are not read: the name fixes them (DPM-Solver++, second
# order). Karras, exponential and beta noise levels read a config's sigma_min / sigma_max, as an
# EulerDiscreteScheduler config holds them.
_DPM_DEFAULTS = dict(
    COMMON, **THRESHOLDING, timestep_spacing="linspace", solver_type="midpoint",
    lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
    use_flow_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
    variance_type=None, rescale_betas_zero_snr=False)
_DPM_BORROWED = dict(sigma_min=None, sigma_max=None)


def _unipc_prepare(s):
    if s["solver_type"] in ("midpoint", "heun", "logrho"):  # UniPCMultistepScheduler runs bh2
        s["solver_type"] = "bh2"
    return s


def _unipc_refusal(s):
    cls = "UniPCMultistepScheduler"
    problem = _first(_flow_refusal(s), _unknown(s, "solver_type", cls, ("bh1", "bh2")),
                     _order_refusal(s, "unipc", UNIPC_ORDERS))
    if problem is not None:
        return problem
    if s["shift_terminal"] is not None:
        return (f"shift_terminal={s['shift_terminal']!r} {WHERE} is for flow-matching models "
                f"(use_flow_sigmas), which the sdjax samplers do not run; {cls} rejects it "
                "without them: set shift_terminal to null")
    if s["solver_p"] is not None:
        return (f"solver_p {WHERE} makes {cls} take its predictor steps with another scheduler, "
                "which sdjax's unipc does not: set solver_p to null")
    if s["final_sigmas_type"] == "zero":  # the last step goes to lambda = +inf
        if s["solver_type"] == "bh1":
            return (f"solver_type='bh1' with final_sigmas_type='zero' {WHERE} makes {cls}'s last "
                    "step NaN (B(h) = h is infinite there): set solver_type to bh2 or "
                    "final_sigmas_type to sigma_min")
        if not s["predict_x0"]:
            return (f"predict_x0=False with final_sigmas_type='zero' {WHERE} makes {cls}'s last "
                    "step NaN (e^h is infinite there): set predict_x0 true or final_sigmas_type "
                    "to sigma_min")
        if not s["lower_order_final"] and s["solver_order"] > 1:
            return (f"lower_order_final=False with final_sigmas_type='zero' {WHERE} makes "
                    f"{cls}'s last step (of order solver_order={s['solver_order']}) infinite: set "
                    "lower_order_final true or final_sigmas_type to sigma_min")
    return None


# The highest UniPC solver_order sdjax runs.
UNIPC_ORDERS = 3
# flow_shift, use_dynamic_shifting and time_shift_type are not read: they act only with flow
# sigmas (refused) or set_timesteps' mu (never passed).
_UNIPC_DEFAULTS = dict(
    COMMON, **THRESHOLDING, solver_order=2, predict_x0=True, solver_type="bh2",
    lower_order_final=True, disable_corrector=(), solver_p=None, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
    timestep_spacing="linspace", final_sigmas_type="zero", rescale_betas_zero_snr=False,
    sigma_min=None, sigma_max=None, shift_terminal=None)


def _deis_prepare(s):
    if s["algorithm_type"] in ("dpmsolver", "dpmsolver++"):  # DEISMultistepScheduler runs deis
        s["algorithm_type"] = "deis"
    if s["solver_type"] in ("midpoint", "heun", "bh1", "bh2"):
        s["solver_type"] = "logrho"
    if isinstance(s["solver_order"], int) and s["solver_order"] > 3:
        s["solver_order"] = 3  # diffusers runs higher orders as 3
    return s


def _deis_refusal(s):
    cls = "DEISMultistepScheduler"
    return _first(_flow_refusal(s), _unknown(s, "algorithm_type", cls, ("deis",)),
                  _unknown(s, "solver_type", cls, ("logrho",)), _order_refusal(s, "deis", 3))


_DEIS_DEFAULTS = dict(
    COMMON, **THRESHOLDING, solver_order=2, algorithm_type="deis", solver_type="logrho",
    lower_order_final=True, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, use_flow_sigmas=False, timestep_spacing="linspace")


def _single_prepare(s):
    # DPMSolverSinglestepScheduler runs deis as dpmsolver++, but rejects it with a zero end.
    if s["algorithm_type"] == "deis" and s["final_sigmas_type"] != "zero":
        s["algorithm_type"] = "dpmsolver++"
    if s["solver_type"] in _MIDPOINT_ALIASES:
        s["solver_type"] = "midpoint"
    # The class takes no timestep_spacing: its timesteps are always linspace-spaced (below the
    # lambda_min_clipped cut); the shared checks and set-up read the key.
    s["timestep_spacing"] = "linspace"
    return s


def _single_refusal(s):
    cls = "DPMSolverSinglestepScheduler"
    if s["algorithm_type"] in ("deis", "dpmsolver") and s["final_sigmas_type"] == "zero":
        return (f"algorithm_type={s['algorithm_type']!r} with final_sigmas_type='zero' {WHERE} "
                f"is rejected by {cls}: set final_sigmas_type to sigma_min, or algorithm_type "
                "to dpmsolver++")
    problem = _first(_flow_refusal(s), _unknown(s, "solver_type", cls, ("midpoint", "heun")),
                     _unknown(s, "algorithm_type", cls,
                              ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")),
                     _order_refusal(s, "dpmpp_single", 3), _learned_variance_refusal(s, cls))
    if problem is None and s["algorithm_type"] != "dpmsolver++":
        problem = (f"algorithm_type={s['algorithm_type']!r} {WHERE} is not the DPM-Solver++ "
                   "that sdjax's dpmpp_single runs: set it to dpmsolver++, or "
                   f"{OTHER_SAMPLERS}")
    return problem


_SINGLE_DEFAULTS = dict(
    {k: v for k, v in COMMON.items() if k != "steps_offset"}, **THRESHOLDING, solver_order=2,
    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_flow_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
    variance_type=None)

SAMPLERS = {
    # The config's use_karras_sigmas decides, as DPMSolverMultistepScheduler.from_config does.
    "dpmpp_2m": SamplerSpec(DPMSolverPP2M, "DPMSolverMultistepScheduler", _DPM_DEFAULTS,
                            borrowed=_DPM_BORROWED, prepare=_dpm_prepare, refusal=_dpm_refusal),
    "dpmpp_2m_karras": SamplerSpec(
        DPMSolverPP2M, "DPMSolverMultistepScheduler", _DPM_DEFAULTS, borrowed=_DPM_BORROWED,
        fixed=dict(use_karras_sigmas=True), diffusers_options=dict(use_karras_sigmas=True),
        prepare=_dpm_prepare, refusal=_dpm_refusal),
    "unipc": SamplerSpec(UniPC, "UniPCMultistepScheduler", _UNIPC_DEFAULTS,
                         prepare=_unipc_prepare, refusal=_unipc_refusal),
    # DEIS and the singlestep solver read sigma_min / sigma_max left on their config by another
    # class's, as DPMSolverMultistepScheduler does.
    "deis": SamplerSpec(DEIS, "DEISMultistepScheduler", _DEIS_DEFAULTS, borrowed=_DPM_BORROWED,
                        prepare=_deis_prepare, refusal=_deis_refusal),
    "dpmpp_single": SamplerSpec(DPMSolverPPSinglestep, "DPMSolverSinglestepScheduler",
                                _SINGLE_DEFAULTS, borrowed=_DPM_BORROWED,
                                prepare=_single_prepare, refusal=_single_refusal),
}
