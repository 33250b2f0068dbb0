"""Adaptive Sparse Training: per-sample significance scores and a PI controller for the activation rate.

Each step scores every sample in the batch (`significance`), keeps those above a threshold
(`PIController.select`) and trains on them only; `PIController.update` then moves the threshold so the
fraction kept (the activation rate) holds `target_rate`.

Everything here stays on the device and never syncs with the host (no .item(), bool(tensor) or
nonzero()), so it can run every step inside a CUDA-stream-bound training loop.

Controller in one paragraph: scores are compared on a scale-free axis. Each sample's score becomes
z = (log(score) - location) / spread, where location is a running (EMA) estimate of the batch's
(1 - target_rate) quantile of log-scores and spread the local standard deviation around it. Raw loss
falls ~50x during training and is heavy-tailed; composite scores live in [0, 1]; on the z axis both look
alike and the drift only moves location, so the threshold (in z) stays near 0 and the PI loop only
corrects what the running quantile misses (its lag, sigmoid blur, min_selected, shape changes). The PI
law acts on the error in logit(rate), whose sensitivity to z is nearly the same for targets from 0.05
to 0.5, so one set of gains fits all targets, batch sizes and scores.
"""
import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.config import ConfigError, _suggest

SCORES = ("loss", "loss_intensity", "loss_gradnorm", "loss_entropy")
TASKS = ("classification", "regression")
GATINGS = ("threshold", "sigmoid")
_NEEDS_LOGITS = ("loss_gradnorm", "loss_entropy")

# Scores at or below this are treated as equal when taking log(score); a CE loss underflows to
# exactly 0 in float32 once the margin passes ~17, and log(0) must not poison the statistics.
SCORE_FLOOR = 1e-12
# Smallest spread of log-scores (natural-log units) the controller divides by; guards batches whose
# scores are nearly all equal.
SPREAD_FLOOR = 1e-3
# Observed rates are clipped into [RATE_CLIP, 1 - RATE_CLIP] before the logit so that a batch
# selecting nothing (or everything) gives a large but finite error.
RATE_CLIP = 1e-3


# ----------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------

def _wide(x):
    """x in float32, or float64 if it already is (autocast hands us bf16/fp16 logits)."""
    return x if x.dtype == torch.float64 else x.float()


def check_score(name, task="classification"):
    """Raise ConfigError if `name` is not a known score or cannot be computed for `task`."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'{_suggest(task, TASKS)}; choose one of {', '.join(TASKS)}")
    if name not in SCORES:
        raise ConfigError(f"unknown significance score '{name}'{_suggest(name, SCORES)}; "
                          f"choose one of {', '.join(SCORES)}")
    if task == "regression" and name in _NEEDS_LOGITS:
        raise ConfigError(f"significance score '{name}' needs class logits and is not available for "
                          f"task 'regression'; use 'loss' or 'loss_intensity'")


def per_sample_loss(outputs, targets, task="classification", regression_loss="mse", huber_delta=1.0):
    """Per-sample loss (B,) in float32 (float64 stays): cross-entropy on logits, or for regression the MSE (or the
    Huber loss with `huber_delta` in target units) averaged over the non-batch dims."""
    if task == "classification":
        if outputs.dim() != 2:
            raise ValueError(f"classification outputs must be logits of shape (B, C), got {tuple(outputs.shape)}")
        # Soft targets (B, C) (mixup, label smoothing done by hand) go through the same call.
        logits = _wide(outputs)
        if targets.is_floating_point():
            targets = targets.to(logits.dtype)
        return F.cross_entropy(logits, targets, reduction="none")
    if task == "regression":
        if outputs.shape != targets.shape:
            raise ValueError(f"regression outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} "
                             f"must have the same shape")
        batch = outputs.shape[0]
        if regression_loss == "huber":
            error = F.huber_loss(_wide(outputs), _wide(targets), reduction="none", delta=huber_delta)
        else:
            error = (_wide(outputs) - _wide(targets)).square()
        return error.reshape(batch, -1).mean(dim=1)  # (B,)
    raise ValueError(f"unknown task '{task}'{_suggest(task, TASKS)}; choose one of {', '.join(TASKS)}")


def minmax_normalize(x, eps=1e-12):
    """Scale a (B,) tensor to [0, 1] within the batch; an all-equal batch maps to zeros."""
    low = x.amin()
    return (x - low) / (x.amax() - low).clamp_min(eps)


def _probabilities_and_targets(outputs, targets):
    logits = _wide(outputs.detach())
    probs = logits.softmax(dim=1)  # (B, C)
    if targets.is_floating_point() and targets.shape == logits.shape:
        return logits, probs, targets.detach().to(probs.dtype)
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"class targets must be indices (B,) or probabilities (B, C) matching logits "
                         f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
    return logits, probs, targets


def logit_gradient_norm(outputs, targets):
    """||softmax(z) - y|| per sample (B,): the norm of d CE / d logits for index or probability targets."""
    logits, probs, targets = _probabilities_and_targets(outputs, targets)
    if targets.is_floating_point():
        return (probs - targets).norm(dim=1)
    # ||p - e_y||^2 = ||p||^2 - 2 p_y + 1; avoids one_hot, whose class-count check can sync on CUDA.
    p_target = probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    return (probs.square().sum(dim=1) - 2 * p_target + 1).clamp_min(0).sqrt()


def last_layer_gradient_norm(outputs, targets, features=None):
    """Closed-form per-sample norm of d CE / d (weight, bias) of the last linear layer, shape (B,).

    The gradient is (p - y) h^T for the weight and (p - y) for the bias, so its norm is
    ||p - y|| * sqrt(||h||^2 + 1) with h the layer's input; without `features` this is ||p - y||.
    """
    norm = logit_gradient_norm(outputs, targets)
    if features is None:
        return norm
    if features.dim() != 2 or features.shape[0] != outputs.shape[0]:
        raise ValueError(f"features must be the (B, D) input of the last linear layer for B={outputs.shape[0]}, "
                         f"got {tuple(features.shape)}; token-level heads need features pooled to (B, D)")
    features = features.detach().to(norm.dtype)
    return norm * (features.square().sum(dim=1) + 1).sqrt()


def softmax_entropy(outputs):
    """Entropy of softmax(logits) per sample (B,), in nats."""
    log_probs = _wide(outputs.detach()).log_softmax(dim=1)  # (B, C)
    return -(log_probs.exp() * log_probs).sum(dim=1)


def pixel_std(images):
    """Standard deviation of each image's pixels (B,), over all channels and positions."""
    batch = images.shape[0]
    return _wide(images.detach()).reshape(batch, -1).std(dim=1)  # (B,)


def significance(name, outputs, targets, images=None, features=None, loss=None, task="classification"):
    """Per-sample significance (B,) float32 (float64 stays), detached: higher is more worth training on.

    "loss" is the raw per-sample loss; composite scores mix per-batch min-max normalized terms into [0, 1]:
    loss_intensity = 0.7 loss + 0.3 pixel std, loss_gradnorm = 0.5 loss + 0.5 last-layer gradient norm
    (||p - y|| * sqrt(||h||^2 + 1) with h = `features`, or ||p - y|| when features is None),
    loss_entropy = 0.5 loss + 0.5 softmax entropy. Pass `loss` to reuse an already computed per-sample loss.
    """
    check_score(name, task)
    if loss is None:
        loss = per_sample_loss(outputs.detach(), targets, task)
    loss = _wide(loss.detach())
    if loss.dim() != 1 or loss.shape[0] != outputs.shape[0]:
        raise ValueError(f"loss must be per-sample with shape ({outputs.shape[0]},), got {tuple(loss.shape)}; "
                         f"use per_sample_loss() rather than a reduced loss")
    if name == "loss":
        return loss
    if name == "loss_intensity":
        if images is None:
            raise ValueError("score 'loss_intensity' needs the input images: pass images=inputs")
        if images.shape[0] != loss.shape[0]:
            raise ValueError(f"images hold {images.shape[0]} samples but the loss has {loss.shape[0]}")
        return 0.7 * minmax_normalize(loss) + 0.3 * minmax_normalize(pixel_std(images))
    if name == "loss_gradnorm":
        gradient_norm = last_layer_gradient_norm(outputs, targets, features)
        return 0.5 * minmax_normalize(loss) + 0.5 * minmax_normalize(gradient_norm)
    return 0.5 * minmax_normalize(loss) + 0.5 * minmax_normalize(softmax_entropy(outputs))  # loss_entropy


def last_linear(model):
    """The last nn.Linear in model.modules() (registration order), e.g. the classifier head."""
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            found = module
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer; score 'loss_gradnorm' needs one "
                         f"(or pass features=None to use the logit gradient norm)")
    return found


class FeatureCapture:
    """Records the (detached) input of the model's last linear layer on every forward, as `features`."""

    def __init__(self, model):
        self.features = None
        self._handle = last_linear(model).register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.features = args[0].detach()

    def close(self):
        """Remove the hook; `features` keeps the last captured tensor."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------
# PI controller
# ----------------------------------------------------------------------------------------------------

@dataclass
class ControllerConfig:
    # --- goal ---
    target_rate: float = 0.1            # fraction of samples trained on, in (0, 1]; 1 trains on all
    # --- PI law (threshold in z units: local std of log-score above its running target quantile) ---
    kp: float = 0.2                     # proportional gain, z per unit of logit(rate) error
    ki: float = 0.05                    # integral gain, z per unit of logit(rate) error per step
    ema_alpha: float = 0.1              # weight of each batch's observed rate in the rate EMA (1 = no smoothing)
    stats_alpha: float = 0.2            # weight of each batch in the running quantile/spread of log-scores
    threshold_init: float = 0.0         # z with zero error and integral; 0 = the running target quantile
    threshold_min: float = -4.0         # z clamp, below
    threshold_max: float = 4.0          # z clamp, above
    integral_limit: float = 3.0         # anti-windup clamp on the integral term, z units
    # --- gating ---
    gating: str = "threshold"           # threshold (score >= thr) | sigmoid (Bernoulli, soft)
    temperature: float = 0.3            # sigmoid gating temperature, z units (blurs the cut by ~0.5 z)
    # Always keep at least this many top-scored samples (BatchNorm needs >1); it floors the rate at
    # min_selected / batch, so a lower target_rate is unreachable (the threshold then pins at its max).
    min_selected: int = 2

    def validate(self):
        """Raise ConfigError naming the key for values the controller cannot work with."""
        if not 0.0 < self.target_rate <= 1.0:
            raise ConfigError(f"target_rate must be in (0, 1] (a fraction of the batch, e.g. 0.1), "
                              f"got {self.target_rate}")
        for key in ("kp", "ki", "integral_limit"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("ema_alpha", "stats_alpha"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must be in (0, 1] (weight of the newest batch), got {getattr(self, key)}")
        if self.threshold_min >= self.threshold_max:
            raise ConfigError(f"threshold_min ({self.threshold_min}) must be below threshold_max "
                              f"({self.threshold_max})")
        if not self.threshold_min <= self.threshold_init <= self.threshold_max:
            raise ConfigError(f"threshold_init ({self.threshold_init}) must lie in [threshold_min, threshold_max] "
                              f"= [{self.threshold_min}, {self.threshold_max}]")
        if self.gating not in GATINGS:
            raise ConfigError(f"unknown gating '{self.gating}'{_suggest(self.gating, GATINGS)}; "
                              f"choose one of {', '.join(GATINGS)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (z units), got {self.temperature}")
        if self.min_selected < 0:
            raise ConfigError(f"min_selected must be >= 0, got {self.min_selected}")


def _logit(p):
    return math.log(p / (1.0 - p))


def _batch_quantiles(values, levels):
    """Linear-interpolated quantiles of a (B,) tensor at host-side `levels`, via one sort (no host sync)."""
    ordered = values.sort().values
    last = ordered.shape[0] - 1
    out = []
    for level in levels:
        position = level * last
        low = int(math.floor(position))
        high = min(low + 1, last)
        frac = position - low
        out.append(ordered[low] * (1.0 - frac) + ordered[high] * frac)
    return out


class PIController:
    """Holds the activation rate at `cfg.target_rate` by moving a score threshold; state lives on `device`.

    Scale-free axis: z = (log(score) - location) / spread. location is a running (EMA) estimate of the
    (1 - target_rate) quantile of log-scores and spread of the local standard deviation there, taken from
    the gap to the (1 - target_rate / 2) quantile; both come from batch quantiles, so the raw loss's 50x
    downward drift, its heavy tail, or a pile of near-zero losses move the axis, not the controller.
    z = 0 is where the running quantile says the target rate lies. Law per step, with
    e = logit(rate_ema) - logit(target_rate) (rate too high -> e > 0 -> raise the threshold):
        integral  <- clamp(integral + ki * e, +-integral_limit), frozen while the threshold is pinned at
                     a clamp in the direction e pushes (anti-windup)
        threshold  = clamp(threshold_init + kp * e + integral, threshold_min, threshold_max)
    `threshold` is in z units; `score_threshold()` gives it in score units for logging.
    """

    def __init__(self, cfg, device="cpu"):
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device)
        rate = min(cfg.target_rate, 1.0 - RATE_CLIP)
        self._logit_target = _logit(rate)
        # Quantile levels of the batch that pin the axis, and the normal-quantile gap that turns their
        # spacing into a standard deviation.
        self._levels = (1.0 - rate, 1.0 - rate / 2)
        normal = NormalDist()
        self._normal_gap = normal.inv_cdf(1.0 - rate / 2) - normal.inv_cdf(1.0 - rate)

        def scalar(value, dtype=torch.float32):
            return torch.tensor(value, dtype=dtype, device=self.device)

        self.threshold = scalar(cfg.threshold_init)    # z units
        self.integral = scalar(0.0)                    # z units
        self.rate_ema = scalar(cfg.target_rate)        # starts on target: no kick before any data
        self.location = scalar(0.0)                    # running (1 - target) quantile of log(score)
        self.spread = scalar(1.0)                      # running local std of log(score) at that quantile
        self.stats_seen = scalar(False, torch.bool)    # the first batch seeds location/spread

    def standardize(self, scores):
        """Map scores (B,) onto the controller's z axis, folding the batch into the running statistics."""
        log_scores = scores.detach().float().clamp_min(SCORE_FLOOR).log()  # (B,)
        at_target, above_target = _batch_quantiles(log_scores, self._levels)
        batch_spread = (above_target - at_target) / self._normal_gap
        a = self.cfg.stats_alpha
        location = torch.where(self.stats_seen, (1 - a) * self.location + a * at_target, at_target)
        spread = torch.where(self.stats_seen, (1 - a) * self.spread + a * batch_spread, batch_spread)
        self.location.copy_(location)
        self.spread.copy_(spread.clamp_min(SPREAD_FLOOR))
        self.stats_seen.fill_(True)
        return (log_scores - self.location) / self.spread

    def select(self, scores, generator=None):
        """Boolean mask (B,) of the samples to train on; call once per batch, then update(mask)."""
        if scores.dim() != 1:
            raise ValueError(f"scores must be one value per sample, shape (B,), got {tuple(scores.shape)}")
        batch = scores.shape[0]
        if self.cfg.target_rate >= 1.0 or batch == 0:
            return torch.ones(batch, dtype=torch.bool, device=scores.device)
        z = self.standardize(scores)
        if self.cfg.gating == "threshold":
            mask = z >= self.threshold
        else:
            keep_probability = torch.sigmoid((z - self.threshold) / self.cfg.temperature)
            mask = torch.bernoulli(keep_probability, generator=generator).bool()
        top = min(self.cfg.min_selected, batch)
        if top > 0:
            # Ties at the k-th value may add a few more; that is harmless and avoids any host sync.
            kth_largest = scores.detach().topk(top).values[-1]
            mask = mask | (scores.detach() >= kth_largest)
        return mask

    def update(self, mask):
        """Fold the batch's activation rate into the EMA and move the threshold (all on device)."""
        cfg = self.cfg
        observed = mask.float().mean()
        self.rate_ema.mul_(1 - cfg.ema_alpha).add_(cfg.ema_alpha * observed)
        if cfg.target_rate >= 1.0:
            return
        rate = self.rate_ema.clamp(RATE_CLIP, 1 - RATE_CLIP)
        error = (rate / (1 - rate)).log() - self._logit_target
        integral = (self.integral + cfg.ki * error).clamp(-cfg.integral_limit, cfg.integral_limit)
        unclamped = cfg.threshold_init + cfg.kp * error + integral
        pinned = ((unclamped > cfg.threshold_max) & (error > 0)) | ((unclamped < cfg.threshold_min) & (error < 0))
        self.integral.copy_(torch.where(pinned, self.integral, integral))
        threshold = cfg.threshold_init + cfg.kp * error + self.integral
        self.threshold.copy_(threshold.clamp(cfg.threshold_min, cfg.threshold_max))

    def score_threshold(self):
        """The current threshold in score units (exp(location + spread * z)), a device scalar."""
        return (self.location + self.spread * self.threshold).exp()

    _STATE = ("threshold", "integral", "rate_ema", "location", "spread", "stats_seen")

    def state_dict(self):
        """Controller state as tensors, for checkpoints."""
        return {name: getattr(self, name).detach().clone() for name in self._STATE}

    def load_state_dict(self, state):
        """Restore state saved by state_dict(); tensors are moved to this controller's device."""
        missing = [name for name in self._STATE if name not in state]
        if missing:
            raise KeyError(f"controller state is missing {missing}; was it saved by PIController.state_dict()?")
        for name in self._STATE:
            getattr(self, name).copy_(torch.as_tensor(state[name]).to(self.device))


# ----------------------------------------------------------------------------------------------------
# Importance sampling: which samples to train on, and with what weight
# ----------------------------------------------------------------------------------------------------
# Picking the k highest scores deterministically concentrates every step on a few hard (often ambiguous or
# mislabeled) samples with large gradients: at learning rates where a random subset trains well, that
# diverged (issue 20). Sampling instead keeps every sample's chance above zero and reweights what it picks,
# so a step is an estimate of the full-data gradient, at the step size of a random subset, with less
# variance: the highest-gradient samples are the ones most likely to be in it (Katharopoulos & Fleuret,
# 2018, "Not all samples are created equal"; Selective Backprop, Jiang et al., 2019).

PROXY_CAP_ITERATIONS = 8  # inclusion-probability capping passes (each caps the values that spilled over 1)


def gradient_proxy(scores, score_name="loss", task="classification"):
    """A bounded, per-sample stand-in for the norm of the loss gradient, (B,), from significance scores.

    Cross-entropy: 1 - exp(-loss) = 1 - p_target, a lower bound of ||softmax - onehot|| that saturates at 1
    for confidently wrong (often mislabeled) samples instead of growing with the loss. Regression: the root
    of the squared error (the gradient norm of MSE is proportional to it). Composite scores are already in
    [0, 1] and are used as they are. Unscored samples (+inf) get the largest value.
    """
    s = _wide(scores.detach())
    if score_name == "loss" and task == "classification":
        proxy = -torch.expm1(-s.clamp_min(0))                 # 1 - exp(-loss), inf -> 1
    elif score_name == "loss":
        proxy = s.clamp_min(0).sqrt()
    else:
        proxy = s.clamp_min(0)
    top = torch.where(torch.isfinite(proxy), proxy, torch.zeros_like(proxy)).amax()
    return torch.where(torch.isfinite(proxy), proxy, top.clamp_min(1.0))


def inclusion_probabilities(proxy, k, uniform_mix):
    """Probabilities p (B,) with sum k, p_i <= 1: a mixture of `uniform_mix` uniform and the rest proportional
    to `proxy`; the mass of samples capped at 1 is spread over the others (a fixed number of passes: no
    host sync). p_i >= uniform_mix * k / B, so no importance weight exceeds 1 / uniform_mix."""
    n = proxy.shape[0]
    q = proxy.clamp_min(0)
    q = q / q.sum().clamp_min(1e-30)
    p = k * ((1.0 - uniform_mix) * q + uniform_mix / n)
    for _ in range(PROXY_CAP_ITERATIONS):
        full = p >= 1.0
        spare = k - full.sum()                                 # mass the uncapped samples must carry
        rest = torch.where(full, torch.zeros_like(p), p)
        p = torch.where(full, torch.ones_like(p), rest * (spare / rest.sum().clamp_min(1e-30)))
    return p.clamp(max=1.0)


def systematic_sample(p, k, generator=None):
    """Exactly k distinct indices with inclusion probabilities p (sum p = k, each <= 1).

    Systematic sampling over a random order: lay the p_i end to end on [0, k), and take the samples under the
    points u, u + 1, ..., u + k - 1 for one uniform u; a sample of length p_i <= 1 holds at most one point.
    """
    n = p.shape[0]
    order = torch.randperm(n, device=p.device, generator=generator)
    edges = torch.cumsum(p[order].double(), 0)
    edges = edges * (k / edges[-1].clamp_min(1e-30))           # exact total despite rounding
    u = torch.rand((), device=p.device, generator=generator, dtype=torch.float64)
    points = u + torch.arange(k, device=p.device, dtype=torch.float64)
    slot = torch.searchsorted(edges, points, right=True).clamp(max=n - 1)
    return order[slot]


def importance_weights(p, selected, k, n, power=1.0):
    """Self-normalized Horvitz-Thompson weights of the selected samples: ((k / n) / p_i) ** power scaled to mean 1,
    so a step is as large as a random subset's of the same size (the learning rate means the same thing).
    power 1 makes the step an unbiased estimate of the full-data gradient; 0 trains the sample unweighted
    (biased towards high scores, as Selective Backprop does); values between trade the two."""
    w = ((k / n) / p[selected].clamp_min(1e-12)) ** power
    return w * (w.numel() / w.sum().clamp_min(1e-30))


def stratified_counts(labels, k, num_classes):
    """Per-class sample counts (num_classes,) summing to k, proportional to the class sizes (largest remainder)."""
    sizes = torch.bincount(labels, minlength=num_classes).double()
    exact = sizes * (k / sizes.sum())
    counts = exact.floor().long()
    short = k - int(counts.sum())
    if short > 0:
        counts[torch.argsort(exact - counts, descending=True)[:short]] += 1
    return torch.minimum(counts, sizes.long())
