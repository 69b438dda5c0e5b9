"""The noise schedule and two stateless samplers: DPM-Solver++ 2M (what LVD uses) and DDIM (eta 0).

What to read: `modelscope-architecture.md` §9 (schedule §9.2, DDIM §9.3, DPM-Solver++ configuration
§9.4, timesteps §9.5, the 2M algorithm §9.6); `lvd-method.md` §4.1 (guidance runs before the CFG
prediction of a step, hence `before_step`), §4.6 (step size √(1 − ᾱ_t), hence `alpha_bar(t)`), §5
(40 steps); style guide §4.9. Paper: Lu et al. 2022, "DPM-Solver++" (arXiv 2211.01095), Algorithm 2
(DPM-Solver++(2M)), whose first update is the first-order DPM-Solver++ (= DDIM) step; Song et al.
2020, "DDIM" (arXiv 2010.02502), eq. (12).

Official implementation: huggingface/diffusers v0.42.1 src/diffusers/schedulers/
scheduling_dpmsolver_multistep.py (`DPMSolverMultistepScheduler.from_config(<the checkpoint's DDIM
config>)`: dpmsolver++, solver_order 2, midpoint, lower_order_final, timestep_spacing "linspace",
final_sigmas_type "zero") and scheduling_ddim.py (`DDIMScheduler`, "leading" spacing, eta 0).

Differences:
- Functions, not objects: no `set_timesteps`, no step counter, no model-output history to reset.
  The schedule is a frozen dataclass whose tables are tuples of floats (immutable).
- The schedule is built as diffusers builds it (betas by float32 `torch.linspace`, ᾱ by float32
  `torch.cumprod` on the CPU), so ᾱ holds the same float32 numbers; everything derived from ᾱ
  (α, σ, λ, the coefficients of every step) is then computed in float64. diffusers computes those
  in float32, so in float32 runs the two differ by float32 rounding (~1e-6 relative).
- Working precision follows the input: fp16/bf16/fp32 latents are updated in float32 (diffusers'
  "upcast"), float64 latents in float64. diffusers' `step` casts even float64 samples to float32.
- e^{−h} − 1 is computed as `expm1(−h)` (no cancellation for small h; dpm-solver#61), and the last
  DPM step returns x̂0 explicitly instead of evaluating λ = log 0 (same result: the final DPM sigma
  is 0, i.e. α_N = 1, σ_N = 0, e^{−h} = 0, and the first-order update reduces to x̂0).
- diffusers keeps x̂0 in the model-output dtype (fp16 in LVD) and multiplies it there by its
  coefficients; here x̂0 is also formed in that dtype, but the update terms are formed in the
  working precision (at most one fp16 rounding of each term apart).
- Only what the ModelScope / Zeroscope configs use: epsilon prediction, "linear" or
  "scaled_linear" betas (or trained_betas), no thresholding, no zero-SNR rescaling, no explicit
  `timestep_spacing` key. Anything else is rejected (CheckpointError from `from_config`), never
  silently ignored.

Glossary: t (integer timestep, 0…T−1), T (num_train_timesteps), i (step index), alpha_bar (ᾱ_t),
alpha (α_t = √ᾱ_t), sigma (σ_t = √(1 − ᾱ_t), the VP noise level; diffusers' `sigma_t`), lambda_
(λ_t = log α_t − log σ_t = −log of the DPM sigma √((1 − ᾱ_t)/ᾱ_t)), h (λ step), r0 (ratio of the
previous to the current λ step), D0, D1 (the 2M estimates), x0_pred (x̂0, the data prediction).
Suffix _n: the next (less noisy) timestep t_{i+1}; suffix _p: the previous step's value.
"""
import dataclasses
import math
import operator

import numpy as np
import torch

from weights.checkpoint import CheckpointError, config_from_json

# -----------------------------------------------------------------------------
# the noise schedule


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Fields are the keys of scheduler/scheduler_config.json (§9.1); defaults are DDIMScheduler's."""
    num_train_timesteps: int = 1000      # T
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"        # "linear" or "scaled_linear" (ModelScope: scaled_linear)
    trained_betas: tuple = None          # explicit betas; overrides beta_schedule when given
    prediction_type: str = "epsilon"     # the only supported value
    clip_sample: bool = True             # DDIM only: clamp x̂0 to ±clip_sample_range (ModelScope: false)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True        # DDIM only: ᾱ after the last step is 1, else ᾱ_0 (ModelScope: false)
    steps_offset: int = 0                # DDIM "leading" spacing adds it (ModelScope: 1); DPM linspace ignores it
    thresholding: bool = False           # dynamic thresholding: not supported
    dynamic_thresholding_ratio: float = 0.995   # unused (thresholding is off)
    sample_max_value: float = 1.0               # unused (thresholding is off)
    skip_prk_steps: bool = True                 # PNDM-only key present in the file; unused
    rescale_betas_zero_snr: bool = False        # not supported
    timestep_spacing: str = ""           # absent in the checkpoint: each sampler uses its diffusers default

    def validate(self):
        """Return a one-line problem description, or None. Called by `config_from_json` too."""
        T = self.num_train_timesteps
        if not isinstance(T, int) or isinstance(T, bool) or T < 2:
            return f"num_train_timesteps must be an integer >= 2, found {T!r}"
        if self.trained_betas is not None:
            if not isinstance(self.trained_betas, (list, tuple)) or len(self.trained_betas) != T:
                return f"trained_betas must be a list of {T} numbers"
            if not all(0.0 < float(b) < 1.0 for b in self.trained_betas):
                return "trained_betas must all lie in (0, 1)"
        elif self.beta_schedule not in ("linear", "scaled_linear"):
            return f"beta_schedule {self.beta_schedule!r} is not supported (use 'linear' or 'scaled_linear')"
        elif not 0.0 < self.beta_start <= self.beta_end < 1.0:
            return f"need 0 < beta_start <= beta_end < 1, found {self.beta_start}, {self.beta_end}"
        if self.prediction_type != "epsilon":
            return f"prediction_type {self.prediction_type!r} is not supported (only 'epsilon')"
        if self.thresholding:
            return "thresholding is not supported"
        if self.rescale_betas_zero_snr:
            return "rescale_betas_zero_snr is not supported"
        if self.timestep_spacing:
            return (f"timestep_spacing {self.timestep_spacing!r} is not supported: only the key's absence "
                    "(DPM-Solver 'linspace', DDIM 'leading') is")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            return f"steps_offset must be a non-negative integer, found {self.steps_offset!r}"
        return None

    def __post_init__(self):
        problem = self.validate()
        if problem:
            raise ValueError(f"NoiseSchedule: {problem}")
        T = self.num_train_timesteps
        # Built exactly as diffusers builds it (float32, on the CPU), so ᾱ holds the same numbers.
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            betas = torch.tensor(self.trained_betas, dtype=torch.float32, device="cpu")
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32, device="cpu")
        else:  # scaled_linear: β_i = linspace(√β_start, √β_end, T)_i²  (§9.2)
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float32,
                                   device="cpu") ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)   # ᾱ_t = Π_{i<=t} (1 − β_i), float32 like diffusers
        object.__setattr__(self, "_betas", tuple(betas.tolist()))
        object.__setattr__(self, "_alphas_cumprod", tuple(alphas_cumprod.tolist()))

    @classmethod
    def from_config(cls, source):
        """Build from scheduler/scheduler_config.json (a path or a dict); unknown keys are warned and ignored."""
        try:
            return config_from_json(cls, source)
        except ValueError as e:
            where = "config" if isinstance(source, dict) else str(source)
            raise CheckpointError(f"{where}: {e}") from None

    # ---- tables over t = 0…T−1 (fresh float64 tensors, so the schedule itself cannot be mutated)

    @property
    def betas(self):
        return torch.tensor(self._betas, dtype=torch.float64)

    @property
    def alphas_cumprod(self):
        """ᾱ_t (float32 values, as in diffusers, held in float64)."""
        return torch.tensor(self._alphas_cumprod, dtype=torch.float64)

    @property
    def alpha_t(self):
        return self.alphas_cumprod.sqrt()                     # α_t = √ᾱ_t

    @property
    def sigma_t(self):
        return (1.0 - self.alphas_cumprod).sqrt()             # σ_t = √(1 − ᾱ_t) (VP)

    @property
    def lambda_t(self):
        return self.alpha_t.log() - self.sigma_t.log()        # λ_t = log α_t − log σ_t

    @property
    def sigmas(self):
        a = self.alphas_cumprod
        return ((1.0 - a) / a).sqrt()                         # DPM σ(t) = √((1 − ᾱ_t)/ᾱ_t) = e^{−λ_t}

    # ---- scalar look-ups by integer timestep

    def alpha_bar(self, t):
        """ᾱ_t as a Python float; t an integer timestep (LVD's guidance step size is √(1 − ᾱ_t))."""
        try:
            t = operator.index(t)
        except TypeError:
            raise TypeError(f"NoiseSchedule.alpha_bar: timestep must be an integer, got {t!r}") from None
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"NoiseSchedule.alpha_bar: timestep {t} outside 0..{self.num_train_timesteps - 1}")
        return self._alphas_cumprod[t]


def timesteps(schedule, num_steps, spacing="linspace"):
    """The integer timesteps of a run, noisiest first, as diffusers' `set_timesteps` makes them.

    "linspace" is DPMSolverMultistepScheduler's: round(linspace(0, T−1, N+1)), reversed, last one
    dropped (40 steps: 999, 974, …, 25). "leading" is DDIMScheduler's: (arange(N)·(T // N)) reversed
    plus steps_offset (50 steps with offset 1: 981, 961, …, 1). The two schedulers define the other
    spacing differently, so only these pairs are offered.
    """
    T = schedule.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"timesteps: num_steps must be an integer in 1..{T}, got {num_steps!r}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + schedule.steps_offset
    else:
        raise ValueError(f"timesteps: spacing must be 'linspace' (DPM-Solver) or 'leading' (DDIM), got {spacing!r}")
    ts = [int(t) for t in ts]
    if len(set(ts)) != len(ts) or ts[0] > T - 1:
        raise ValueError(f"timesteps: {num_steps} steps with {spacing!r} spacing give repeated or out-of-range "
                         f"timesteps (max {ts[0]}, T = {T})")
    return ts


# -----------------------------------------------------------------------------
# shared checks for the model callable and the per-step hook


def _check_latents(x, who):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{who}: x must be a floating-point torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))


def _run_hook(before_step, x, i, t, who):
    y = before_step(x, i, t)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{who}: before_step must return a tensor of shape {tuple(x.shape)} "
                         f"(step {i}, t = {t}), got {got}")
    return y


def _predict_eps(eps_fn, x, i, t, who):
    eps = eps_fn(x, t)
    if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
        got = f"shape {tuple(eps.shape)}" if isinstance(eps, torch.Tensor) else type(eps).__name__
        raise ValueError(f"{who}: eps_fn must return a tensor of shape {tuple(x.shape)} "
                         f"(step {i}, t = {t}), got {got}")
    return eps


# -----------------------------------------------------------------------------
# DPM-Solver++ 2M


def dpm_solver_pp_2m(eps_fn, x, schedule, num_steps, before_step=None, callback=None):
    """Sample with DPM-Solver++ 2M from the noise `x`; returns the final latent (x̂0 of the last step).

    eps_fn(x, t) -> ε, with t a Python int. before_step(x, i, t) -> x runs at the start of step i,
    before the model call (LVD's guidance). callback(info) runs after each step with
    info = {'i', 't', 'x' (the new latent), 'x0_pred'}. x may have any shape; the update is elementwise.
    Steps: first order at i = 0, second-order midpoint for 1 … N−2, x̂0 at the last step (§9.6).
    """
    who = "dpm_solver_pp_2m"
    _check_latents(x, who)
    ts = timesteps(schedule, num_steps, "linspace")
    work = torch.promote_types(x.dtype, torch.float32)       # fp16/bf16/fp32 -> fp32; fp64 -> fp64
    x0_pred_p = h_p = None
    for i, t in enumerate(ts):
        if before_step is not None:
            x = _run_hook(before_step, x, i, t, who)
        eps = _predict_eps(eps_fn, x, i, t, who)
        alpha_bar = schedule.alpha_bar(t)
        alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
        x0_pred = (x - sigma * eps) / alpha                   # x̂0 = (x_t − σ_t ε)/α_t, model dtype (§9.6.1)
        if i == len(ts) - 1:
            # final DPM sigma "zero": α_N = 1, σ_N = 0, e^{−h} = 0, so the first-order update is x̂0 exactly
            x_n = x0_pred
        else:
            alpha_bar_n = schedule.alpha_bar(ts[i + 1])
            alpha_n, sigma_n = math.sqrt(alpha_bar_n), math.sqrt(1.0 - alpha_bar_n)
            lambda_, lambda_n = math.log(alpha) - math.log(sigma), math.log(alpha_n) - math.log(sigma_n)
            h = lambda_n - lambda_                            # h_i = λ_{t_{i+1}} − λ_{t_i}
            phi = alpha_n * math.expm1(-h)                    # α_{t_{i+1}}(e^{−h} − 1), written with expm1
            xw, D0 = x.to(work), x0_pred.to(work)             # the update runs in the working precision
            if x0_pred_p is None:
                # 1st order (Algorithm 2, first update; DDIM): x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1}(e^{−h} − 1) x̂0_i
                x_n = (sigma_n / sigma) * xw - phi * D0
            else:
                r0 = h_p / h                                  # r = h_{i−1}/h_i
                D1 = (D0 - x0_pred_p.to(work)) / r0           # D1 = (x̂0_i − x̂0_{i−1})/r0
                # 2M midpoint (Algorithm 2, loop): x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1}(e^{−h} − 1)(D0 + D1/2);
                # the paper's D_i = (1 + 1/(2r)) x̂0_i − 1/(2r) x̂0_{i−1} is split into D0 + D1/2 as in diffusers.
                x_n = (sigma_n / sigma) * xw - phi * D0 - (0.5 * phi) * D1
            x_n = x_n.to(x0_pred.dtype)                       # back to the model-output dtype, as diffusers
            h_p = h
        x0_pred_p = x0_pred
        if callback is not None:
            callback({"i": i, "t": t, "x": x_n, "x0_pred": x0_pred})
        x = x_n
    return x


# -----------------------------------------------------------------------------
# DDIM (eta 0)


def ddim(eps_fn, x, schedule, num_steps=50, before_step=None, callback=None):
    """Sample with DDIM, eta 0, "leading" spacing plus steps_offset, as diffusers' DDIMScheduler.

    Same callables as `dpm_solver_pp_2m`. The step from t goes to t − T // N; below 0 the final ᾱ is 1
    when set_alpha_to_one, else ᾱ_0 (ModelScope). Arithmetic in the dtype of x and ε, as diffusers.
    """
    who = "ddim"
    _check_latents(x, who)
    ts = timesteps(schedule, num_steps, "leading")
    stride = schedule.num_train_timesteps // num_steps
    final_alpha_bar = 1.0 if schedule.set_alpha_to_one else schedule.alpha_bar(0)
    for i, t in enumerate(ts):
        if before_step is not None:
            x = _run_hook(before_step, x, i, t, who)
        eps = _predict_eps(eps_fn, x, i, t, who)
        t_n = t - stride                                      # the timestep this step lands on
        alpha_bar = schedule.alpha_bar(t)
        alpha_bar_n = schedule.alpha_bar(t_n) if t_n >= 0 else final_alpha_bar
        # x̂0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t
        x0_pred = (x - math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha_bar)
        if schedule.clip_sample:
            x0_pred = x0_pred.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        # DDIM eq. (12) with σ_t = 0: x_{t'} = √ᾱ_{t'} x̂0 + √(1 − ᾱ_{t'}) ε
        x_n = math.sqrt(alpha_bar_n) * x0_pred + math.sqrt(1.0 - alpha_bar_n) * eps
        if callback is not None:
            callback({"i": i, "t": t, "x": x_n, "x0_pred": x0_pred})
        x = x_n
    return x
