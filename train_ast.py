"""Adaptive Sparse Training (AST): train only on the samples a significance score picks, at a held rate.

    # CPU, seconds: digits, `full` vs AST vs `random`, prints the comparison table
    python train_ast.py --config configs/quickstart.yaml
    # one GPU, CIFAR-10 (add --data.download=true the first time)
    python train_ast.py --config configs/cifar10.yaml
    # ImageNet folder (train/ and val/ inside data.root), one node with 8 GPUs
    torchrun --nproc_per_node=8 train_ast.py --config configs/imagenet_resnet50.yaml --data.root=/data/imagenet
    # any key can be overridden: --section.key=value ; the controls side by side: --compare
    python train_ast.py --config configs/cifar10.yaml --ast.mode=epoch --ast.controller.target_rate=0.2 --compare
    # regression (data.task=regression): frame sequences + scalars -> km; CPU, seconds: AST vs random vs full in km
    python tools/make_temporal_regression.py --out=data/temporal_demo.npz --samples=800 --size=24 --channels=1
    python train_ast.py --config configs/regression_demo.yaml
    # the T4 presets, with the automatic out-of-memory ladder (memory.fallback=auto, lib/fallback.py)
    python train_ast.py --config configs/t4_full.yaml --data.root=data/temporal.npz

Modes (ast.mode):
  full    every sample, every step (the baseline).
  batch   a no-grad forward scores the whole batch; forward+backward run only on the selected subset,
          gathered into a smaller batch, so unselected samples cost one inference forward and no backward.
          A PI controller sets how many to train (ast.controller.target_rate, +-ast.rate_band per step);
          ast.batch_policy=sample draws which ones, with a keep probability rising with the score and never zero.
  epoch   no extra forward: each sample's score is the loss it had when last trained. ast.epoch_policy=infobatch
          prunes, at random, the samples whose last loss is below the mean (InfoBatch's rule) until the epoch holds
          target_rate of the data; every sample keeps a chance (ast.uniform_mix). The first `warmup_epochs` and
          the last `final_full_fraction` of epochs use all data.
  random  a uniform random subset at the same rate through the same machinery (`match` copies the exact
          sample counts of another compare run).
  budget  full data, training cut to the backward-sample budget of another run (`budget_of`).
  curriculum  easy-to-hard control: `match`'s per-epoch sample counts, drawn at random from the easiest samples by
          last-seen loss, a pool that grows over the run (ast.pacing, curriculum_start, curriculum_ramp).
Measured on real held-out data (bench/ast_quality.py, docs/BENCHMARKS.md): both modes beat random at the same
backward samples in every setting tried; the old policies stay selectable (ast.batch_policy / epoch_policy=top).
Regression: the score is the per-sample loss (MSE or Huber, data.regression_loss); tests report MAE and RMSE in
target units (km), lower is better.

Why one file of ~800 lines: it is the recipe a user copies and edits, read top to bottom as config -> selection ->
one run in phases (build, train, run_epoch: the hot loop, summarize) -> the comparison runner; the reusable parts
already live in lib/ (selection, compare, run, loop, data), and what is left here is the loop and its glue.
"""
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lib import checkpoint, dist
from lib.config import ConfigError, to_dict
from lib.data import DataConfig, SelectiveBatch, build_data
from lib.energy import EnergyMeter
from lib.fallback import MemoryConfig, MemoryFallbackError, MemoryLadder, Restart, saved_effective
from lib.loop import (LoopConfig, OptimConfig, Throughput, TrainStep, build_optimizer, check_micro_batch,
                      per_rank_batch, prepare_model)
from lib.memory import find_micro_batch, plan_accumulation
from lib.models import ModelConfig, build_model
from lib.compare import load_predictions, save_predictions, write_comparison
from lib.selection import (ControllerConfig, FeatureCapture, PIController, check_score, gradient_proxy,
                           importance_weights, inclusion_probabilities, per_sample_loss, significance,
                           stratified_counts, systematic_sample)
from lib.run import MAY_CHANGE as RUN_MAY_CHANGE, CompareConfig, Run, run_script, run_variants
from lib.storage import format_report, run_report

MODES = ("full", "batch", "epoch", "random", "budget", "curriculum")
# keys a rerun may change without invalidating a finished or checkpointed run (where it runs, how it reports)
MAY_CHANGE = RUN_MAY_CHANGE + ("run.eval_every", "loop.compile", "loop.compile_mode", "compare")
BATCH_POLICIES = ("sample", "top")
EPOCH_POLICIES = ("sample", "infobatch", "top")


# ----------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    name: str = "ast"               # run folder: <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"            # auto | cuda | cpu
    epochs: int = 10
    max_steps: int = 0              # stop after this many optimizer steps (0 = all epochs)
    eval_every: int = 1             # epochs between test evaluations (the accuracy vs wall-clock curve)
    checkpoint_every: int = 0       # optimizer steps between checkpoints (0 = at the end of each epoch only)
    keep_checkpoints: int = 3
    resume: str = "auto"            # auto (latest complete checkpoint in the run folder) | none | <path>


@dataclass
class ASTConfig:
    mode: str = "batch"             # full | batch | epoch | random | budget | curriculum (see the docstring)
    score: str = "loss"             # loss | loss_intensity | loss_gradnorm | loss_entropy
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    # batch mode
    score_batch: int = 0            # samples scored per optimizer step over all ranks (0 = loop.global_batch)
    score_resolution: int = 0       # px of the scoring forward (0 = training resolution; lower = cheaper)
    rate_band: float = 0.02         # every step trains target_rate +- this share of the scored batch; the
                                    # controller holds the mean on the target inside the band
    round_to: int = 32              # trained subset size rounded up to a multiple (where the band allows): few
                                    # distinct shapes, each autotuned once by cuDNN (measured on an H100: every
                                    # new size costs 2-10 s of autotuning; with heuristics instead, a ~100-sample
                                    # step took as long as a 256-sample one)
    # which samples to train (measured in bench/ast_quality.py, issue 20): `sample` = drawn at random with a keep
    # probability that rises with the score and never falls below uniform_mix x the average (a bounded gradient
    # proxy, see lib/selection.py); `top` = the highest scores (batch mode: above the controller's threshold;
    # epoch mode: top + a random explore_rate share, inverse-probability weighted); `infobatch` (epoch mode) =
    # InfoBatch's rule: samples below the mean score are the ones pruned, at random
    batch_policy: str = "sample"    # batch mode: sample | top
    epoch_policy: str = "infobatch"  # epoch mode: sample | infobatch | top
    uniform_mix: float = 0.3        # sample/infobatch: share of each keep probability spread uniformly (the floor)
    weight_power: float = 0.0       # sample/infobatch: loss weight (1/keep probability)^power, mean 1 in a step.
                                    # 0 = unweighted (measured best in both modes); 1 = unbiased estimate of the
                                    # full-data gradient (weights up to 1 / uniform_mix)
    class_balanced: bool = False    # epoch mode: keep each class's share of the plan (stratified by label)
    # batch + epoch modes
    warmup_epochs: int = 1          # batch + epoch modes: first epochs on all data (hard-sample selection from
                                    # step 0 destabilizes training; epoch mode also needs every sample scored)
    final_full_fraction: float = 0.1  # last fraction of epochs on all data
    explore_rate: float = 0.02      # epoch_policy=top: share of the data kept at random from below the threshold
    # controls
    random_granularity: str = "batch"  # random: select per batch or per epoch (when `match` does not say)
    pacing: str = "root"            # curriculum: how the pool of easiest samples grows: root (Platanios et al.,
                                    # 2019: sqrt growth) | linear
    curriculum_start: float = 0.3   # curriculum: share of the data (easiest first) in the pool at the first sparse
                                    # epoch; at least the epoch's kept share
    curriculum_ramp: float = 0.8    # curriculum: share of the run after which the pool holds all data
    match: str = ""                 # random: copy the per-step / per-epoch sample counts of this compare run
    budget_of: str = ""             # budget: as many backward samples as this compare run used
    budget_samples: int = 0         # budget: ... or this many backward samples

    def validate(self):
        if self.mode not in MODES:
            import difflib
            close = difflib.get_close_matches(self.mode, MODES, n=1)
            raise ConfigError(f"ast.mode '{self.mode}' is not one of {', '.join(MODES)}"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
        check_score(self.score)
        if self.random_granularity not in ("batch", "epoch"):
            raise ConfigError(f"ast.random_granularity must be batch or epoch, got '{self.random_granularity}'")
        if self.batch_policy not in BATCH_POLICIES:
            raise ConfigError(f"ast.batch_policy must be one of {', '.join(BATCH_POLICIES)}, got '{self.batch_policy}'")
        if self.epoch_policy not in EPOCH_POLICIES:
            raise ConfigError(f"ast.epoch_policy must be one of {', '.join(EPOCH_POLICIES)}, got '{self.epoch_policy}'")
        if not 0 <= self.weight_power <= 1:
            raise ConfigError(f"ast.weight_power must be in [0, 1] (0 = unweighted, 1 = unbiased), got {self.weight_power}")
        if not 0 < self.uniform_mix <= 1:
            raise ConfigError(f"ast.uniform_mix must be in (0, 1] (1 = uniform random), got {self.uniform_mix}")
        if self.mode == "epoch" and self.epoch_policy == "top" and \
                not 0 < self.explore_rate < self.controller.target_rate:
            raise ConfigError(f"ast.explore_rate={self.explore_rate} must be in (0, target_rate="
                              f"{self.controller.target_rate}): explored samples count towards the rate")
        if self.pacing not in ("root", "linear"):
            raise ConfigError(f"ast.pacing must be root or linear, got '{self.pacing}'")
        if not 0 < self.curriculum_start <= 1 or not 0 < self.curriculum_ramp <= 1:
            raise ConfigError("ast.curriculum_start and ast.curriculum_ramp must be in (0, 1]")
        if not 0 <= self.final_full_fraction < 1:
            raise ConfigError(f"ast.final_full_fraction must be in [0, 1), got {self.final_full_fraction}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    ast: ASTConfig = field(default_factory=ASTConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)


# ----------------------------------------------------------------------------- helpers
def say(*args):
    if dist.is_main():
        tqdm.write(" ".join(str(a) for a in args))


def sample_loss(cfg, outputs, targets, task):
    """Per-sample training loss (B,): cross-entropy, or the regression loss data.regression_loss."""
    return per_sample_loss(outputs, targets, task, cfg.data.regression_loss, cfg.data.huber_delta)


def batchnorm_layers(model):
    """The model's BatchNorm layers (collected once: the momentum switch below runs twice per step)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class bn_momentum:
    """Temporarily set the given BatchNorm layers' momentum (0 keeps running statistics unchanged; None: no change)."""

    def __init__(self, layers, momentum):
        self.layers = layers
        self.momentum = momentum

    def __enter__(self):
        self.saved = [m.momentum for m in self.layers]
        if self.momentum is not None:  # None: leave the layers as they are
            for m in self.layers:
                m.momentum = self.momentum

    def __exit__(self, *exc):
        for m, v in zip(self.layers, self.saved):
            m.momentum = v


@torch.no_grad()
def evaluate(model, loader, autocast, task, num_test):
    """Top-1 / top-5 accuracy (classification) or MAE / RMSE in target units (regression, the mean over the target
    columns) on the test loader, and the per-sample results in
    test-set order. Each sample counts once, also under DDP, where the last shard is padded with repeats: results
    are written into one slot per sample index and combined over ranks."""
    model.eval()
    loader.set_epoch(0)
    device = next(model.parameters()).device
    first = torch.zeros(num_test, device=device)   # correct at top-1 | absolute error
    top5 = torch.zeros(num_test, device=device)    # correct at top-5 | squared error
    labels = torch.full((num_test,), -1, dtype=torch.long, device=device)
    seen = torch.zeros(num_test, device=device)
    for x, y, idx in loader:
        with autocast():
            out = model(x)
        if task == "classification":
            hit = out.float().topk(min(5, out.shape[1]), dim=1).indices == y[:, None]  # (B, 5)
            first[idx] = hit[:, 0].float()
            top5[idx] = hit.any(1).float()
            labels[idx] = y
        else:
            error = (out.float() - y.float()).reshape(len(y), -1)  # (B, K) in target units
            first[idx] = error.abs().mean(1)
            top5[idx] = error.square().mean(1)
        seen[idx] = 1.0
    if dist.is_dist():  # a sample evaluated on two ranks wrote the same slot twice; MAX keeps one copy
        for t in (first, top5, labels, seen):
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    model.train()
    n = max(int(seen.sum().item()), 1)
    valid = seen.bool().cpu()
    if task == "classification":
        metrics = {"top1": float(first.sum()) / n, "top5": float(top5.sum()) / n}
        per_sample = {"correct": first.cpu()[valid].to(torch.uint8).numpy(), "label": labels.cpu()[valid].numpy()}
    else:
        metrics = {"mae": float(first.sum()) / n, "rmse": math.sqrt(float(top5.sum()) / n)}
        per_sample = {"abs_error": first.cpu()[valid].numpy(), "squared_error": top5.cpu()[valid].numpy()}
    per_sample["index"] = torch.nonzero(valid).flatten().numpy()
    return metrics, per_sample


# ----------------------------------------------------------------------------- selection
# batch mode: which samples of a scored batch to train; epoch mode: which samples an epoch trains
def select_batch(cfg, model, bn_layers, x, y, idx, controller, gen, step_fn, capture, task, match_counts,
                 counters):
    """Batch mode: score the batch without grad, pick the subset; returns it gathered with its loss weights (None =
    plain mean), and the offered and scored counts. `x` is the batch, or from image files a SelectiveBatch: its
    low-resolution scoring images now, and the full-resolution training crops of the selected samples on request."""
    ast = cfg.ast
    batch = len(y)
    weights = None
    lazy = isinstance(x, SelectiveBatch)
    if ast.mode == "random":
        if match_counts:
            k = match_counts[min(counters["step"], len(match_counts) - 1)]
        else:
            rate = ast.controller.target_rate
            k = subset_size(round(rate * batch), batch, rate, ast.round_to, ast.rate_band)
        selected = torch.randperm(batch, device=y.device, generator=gen)[:k]
        scored = 0  # the random control needs no scores: unselected samples cost nothing
    else:
        train_px = x.resolution if lazy else x.shape[-1]
        same_res = ast.score_resolution in (0, train_px)
        # Running BN statistics come from the full scoring batch when it runs at the training resolution
        # (unbiased), else from the trained subset; the other forward leaves them unchanged (momentum 0).
        with torch.no_grad(), step_fn.autocast(), bn_momentum(bn_layers, None if same_res else 0.0):
            xs = x.scoring if lazy else x
            if xs.shape[-1] != (ast.score_resolution or train_px):
                xs = F.interpolate(xs, size=ast.score_resolution, mode="bilinear", align_corners=False)
            outputs = model(xs)
            loss = sample_loss(cfg, outputs, y, task)
            s = significance(ast.score, outputs, y, images=xs if lazy else getattr(x, "frames", x), loss=loss,
                             task=task, features=capture.features if capture else None)
        mask = controller.select(s, generator=gen)
        k = int(mask.sum())  # the one host sync per step: the subset size sets the shapes below
        k = subset_size(k, batch, ast.controller.target_rate, ast.round_to, ast.rate_band)
        if ast.batch_policy == "sample":
            # the controller decides how many, the scores which: drawn with keep probabilities that rise with the
            # gradient proxy and never fall to zero (see lib/selection.py)
            p = inclusion_probabilities(gradient_proxy(s, ast.score, task), k, ast.uniform_mix)
            selected = systematic_sample(p, k, generator=gen)
            if ast.weight_power > 0:
                weights = importance_weights(p, selected, k, batch, ast.weight_power)
        else:
            priority = torch.where(mask, torch.full_like(s, float("inf")), s)
            selected = priority.topk(k, sorted=False).indices
        chosen = torch.zeros(batch, dtype=torch.bool, device=y.device)
        chosen[selected] = True
        controller.update(chosen)
        scored = batch
    counters["counts"].append(len(selected))
    x = x.full(selected) if lazy else x[selected]  # (k, C, H, W): only these are decoded whole; the gather may
    if x.dim() == 4 and cfg.loop.channels_last and x.is_cuda:  # drop channels_last
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y[selected], idx[selected], weights, batch, scored


def subset_size(k, batch, target_rate, round_to, band=0.02):
    """The number of samples to train this step: the controller's count `k`, rounded up to a multiple of a bucket
    and kept within target_rate +- band of the batch.

    Buckets keep the set of shapes small (each new shape costs cuDNN autotuning: `round_to` samples where the
    band is wide enough, a power of two that fits it otherwise); the band keeps every step's rate within
    +-band of the target while the controller, which counts what is finally trained, holds the mean on it.
    """
    target_k = target_rate * batch
    low = max(1, math.ceil((target_rate - band) * batch - 1e-9))
    high = min(batch, math.floor((target_rate + band) * batch + 1e-9))
    if high < low:  # a band narrower than one sample: the nearest count
        low = high = min(batch, max(1, round(target_k)))
    step = max(1, min(round_to, 2 ** int(math.floor(math.log2(max(1.0, (high - low) / 2))))))
    first, last = math.ceil(low / step) * step, (high // step) * step
    if first > last:
        first = last = max(low, min(high, round(target_k)))
        step = 1
    k = math.ceil(max(k, 1) / step) * step
    return min(last, max(first, k))


def epoch_size(cfg, epoch, num_train, count=None):
    """Samples an epoch-wise run trains on in `epoch`: all of them in the warm-up and final epochs, else the kept
    share; `count` (another run's number for this epoch, when matching it) overrides both. None means all data."""
    if count is not None:
        return None if count >= num_train else max(1, count)
    final_full = math.ceil(cfg.ast.final_full_fraction * cfg.run.epochs)
    if epoch < cfg.ast.warmup_epochs or epoch >= cfg.run.epochs - final_full:
        return None
    return max(1, round(cfg.ast.controller.target_rate * num_train))


def plan_epoch(cfg, epoch, scores, num_train, task="classification", labels=None, num_classes=0, count=None):
    """Epoch-mode sample plan: (indices or None for all data, per-sample weights or None, threshold)."""
    ast = cfg.ast
    n_keep = epoch_size(cfg, epoch, num_train, count)
    if n_keep is None:
        return None, None, float("nan")
    g = torch.Generator().manual_seed(cfg.run.seed * 7919 + epoch)
    if ast.mode == "random":
        return torch.randperm(num_train, generator=g)[:n_keep], None, float("nan")
    scores = scores.detach().float().cpu()
    if ast.mode == "curriculum":
        return plan_curriculum(ast, epoch / cfg.run.epochs, scores, num_train, n_keep, g), None, float("nan")
    if ast.epoch_policy == "top":
        return _plan_top_explore(ast, scores, num_train, n_keep, g)
    if ast.epoch_policy == "infobatch":
        # InfoBatch (Qin et al., ICLR 2024): samples whose last loss is below the mean are "well learned" and
        # pruned at random; the others are kept. Here the pruning share follows from the budget n_keep.
        finite = scores[torch.isfinite(scores)]
        mean = finite.mean() if finite.numel() else torch.tensor(0.0)
        proxy = (scores >= mean).float()
        threshold = float(mean)
    else:
        proxy = gradient_proxy(scores, ast.score, task)
        threshold = float("nan")
    if ast.class_balanced and labels is not None:
        labels = torch.as_tensor(labels).cpu().long()
        p = torch.zeros(num_train, dtype=torch.float64)
        picked = []
        for c, k_c in enumerate(stratified_counts(labels, n_keep, num_classes).tolist()):
            members = torch.nonzero(labels == c).flatten()
            if k_c == 0:
                continue
            p_c = inclusion_probabilities(proxy[members].double(), k_c, ast.uniform_mix)
            p[members] = p_c
            picked.append(members[systematic_sample(p_c, k_c, g)])
        keep = torch.cat(picked)
    else:
        p = inclusion_probabilities(proxy.double(), n_keep, ast.uniform_mix)
        keep = systematic_sample(p, n_keep, g)
    if ast.weight_power == 0:
        return keep, None, threshold
    weights = torch.zeros(num_train)
    weights[keep] = importance_weights(p, keep, n_keep, num_train, ast.weight_power).float()
    return keep, weights, threshold


def plan_curriculum(ast, progress, scores, num_train, n_keep, g):
    """The curriculum control: n_keep samples drawn at random from the easiest part of the data by last-seen loss,
    a pool that grows with the run's progress (0..1) by the pacing function, from curriculum_start of the data to
    all of it at curriculum_ramp (easy-to-hard curriculum learning: Bengio et al., 2009; competence-based pacing:
    Platanios et al., 2019; the pacing functions of Hacohen & Weinshall, 2019). Unscored samples count as hardest."""
    start, t = ast.curriculum_start, min(1.0, progress / ast.curriculum_ramp)
    competence = math.sqrt(start ** 2 + (1 - start ** 2) * t) if ast.pacing == "root" else start + (1 - start) * t
    pool = torch.argsort(scores)[:max(n_keep, min(num_train, math.ceil(competence * num_train)))]
    return pool[torch.randperm(len(pool), generator=g)[:n_keep]]


def _plan_top_explore(ast, scores, num_train, n_keep, g):
    """epoch_policy=top: the highest last-seen scores plus a random `explore_rate` share of the rest, weighted by
    the inverse keep probability (Horvitz-Thompson). The explored samples carry most of the weight: at 10% with
    2% explored they get ~92% of it, which is why this is no longer the default (issue 20)."""
    p = ast.explore_rate
    order = torch.argsort(scores, descending=True)  # never-scored samples (+inf) come first
    n_high = min(n_keep, round((ast.controller.target_rate - p) / (1 - p) * num_train))
    high, low = order[:n_high], order[n_high:]
    explored = low[torch.randperm(len(low), generator=g)[:n_keep - n_high]]
    rate = n_keep / num_train
    weights = torch.full((num_train,), rate)
    weights[explored] = rate * len(low) / max(1, len(explored))
    threshold = float(scores[order[n_high - 1]]) if n_high > 0 else float("inf")
    return torch.cat([high, explored]), weights, threshold


# ----------------------------------------------------------------------------- one training run
@dataclass
class Variant:
    """Everything one training run is built from (the build phase); the loop below reads it."""
    cfg: Config
    info: object
    name: str
    batch_like: bool                # selection per scored batch (batch mode, random per batch)
    epoch_like: bool                # a sample plan per epoch (epoch mode, random per epoch, curriculum)
    data: object
    model: torch.nn.Module          # DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    step_fn: TrainStep
    controller: PIController
    gen: torch.Generator            # this rank's selection randomness (checkpointed)
    capture: object                 # FeatureCapture for loss_gradnorm, else None
    bn_layers: list
    scores: torch.Tensor            # epoch modes: last-seen score per training sample (+inf = never trained)
    seen: torch.Tensor              # ... and whether this epoch trained it (merged over ranks at epoch end)
    train_labels: object            # class-balanced plans: labels of the training split
    match_counts: list | None       # the per-step / per-epoch sample counts of the run this one matches
    total_steps: int
    loader_batch: int               # samples per loader batch on this rank (batch mode: the scoring batch)
    ladder: MemoryLadder            # memory.fallback: what an out-of-memory step does (lib/fallback.py)


def build(cfg, info, name, reference, ladder):
    """Data, model, optimizer, the training step and the selection state of one variant."""
    ast, device = cfg.ast, info.device
    if ast.mode == "random" and ast.match:
        granularity = "epoch" if reference.get(ast.match, {}).get("mode") == "epoch" else "batch"
    else:
        granularity = ast.random_granularity
    batch_like = ast.mode == "batch" or (ast.mode == "random" and granularity == "batch")
    epoch_like = ast.mode in ("epoch", "curriculum") or (ast.mode == "random" and granularity == "epoch")
    per_rank = per_rank_batch(cfg.loop.global_batch, info.world_size)
    loader_batch = per_rank_batch(ast.score_batch or cfg.loop.global_batch, info.world_size) if batch_like \
        else per_rank
    data = build_data(cfg.data, device, batch_size=loader_batch, seed=cfg.run.seed,
                      rank=info.rank, world_size=info.world_size)
    if data.num_train // info.world_size < loader_batch:
        raise ConfigError(f"the training set has {data.num_train} samples, fewer than one batch of "
                          f"{loader_batch} per rank x {info.world_size} ranks; lower loop.global_batch")
    check_score(ast.score, data.task)
    if data.temporal and ast.score_resolution:
        raise ConfigError("ast.score_resolution rescales images; temporal data is scored at its own size: set it to 0")

    torch.manual_seed(cfg.run.seed)  # same init on every rank and for every compare variant
    model = prepare_model(build_model(cfg.model, data.in_channels, data.num_classes, data.image_size,
                                      temporal=data.temporal), cfg.loop, device)
    raw_model = checkpoint.unwrap(model)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = build_optimizer(raw_model, cfg.optim, device)

    # optimizer steps: the LR schedule is a pure function of the step, so it needs the total up front
    n = data.num_train
    n_rank = lambda count: (count // info.world_size) // loader_batch  # batches a rank gets from `count` samples
    match_counts = reference.get(ast.match, {}).get("counts") if ast.match else None
    if epoch_like and match_counts and reference[ast.match].get("mode") in ("batch", "random") \
            and len(match_counts) > cfg.run.epochs:
        # an epoch-wise control matched to a batch-mode run: the same backward samples per epoch
        per_epoch = len(match_counts) // cfg.run.epochs
        match_counts = [info.world_size * sum(match_counts[e * per_epoch:(e + 1) * per_epoch])
                        for e in range(cfg.run.epochs)]
    if epoch_like:
        sizes = [epoch_size(cfg, e, n, match_counts[e] if match_counts else None) for e in range(cfg.run.epochs)]
        total_steps = sum(n_rank(n if size is None else size) for size in sizes)
    else:
        total_steps = cfg.run.epochs * n_rank(n)
    if ast.mode == "budget":
        budget = ast.budget_samples or reference.get(ast.budget_of, {}).get("backward_samples", 0)
        if budget <= 0:
            raise ConfigError("ast.mode=budget needs ast.budget_samples > 0 or ast.budget_of naming an earlier "
                              "compare run")
        total_steps = math.ceil(budget / cfg.loop.global_batch)
    if cfg.run.max_steps:
        total_steps = min(total_steps, cfg.run.max_steps)

    if cfg.loop.micro_batch > 0:
        if not batch_like:
            check_micro_batch(per_rank, cfg.loop.micro_batch)
        micro = cfg.loop.micro_batch
    elif cfg.loop.micro_batch == -1 and device.type == "cuda":
        micro = auto_micro_batch(model, data, cfg, per_rank, data.task)
    else:
        # batch mode gathers subsets of any size up to the whole scoring batch (its warm-up trains on all of
        # it): never run more than the per-rank training batch through one forward
        micro = per_rank if batch_like else None
    step_fn = TrainStep(model, optimizer, cfg.loop, cfg.optim, total_steps, device, micro_batch=micro, log=say,
                        on_oom=ladder if ladder.active else None)
    say(f"[{name}] mode={ast.mode} model={cfg.model.name} train={n} steps={total_steps} "
        f"global batch={cfg.loop.global_batch} per rank={per_rank} micro={micro or per_rank} "
        f"ranks={info.world_size} precision={step_fn.dtype or 'fp32'} device={device}")
    v = Variant(cfg=cfg, info=info, name=name, batch_like=batch_like, epoch_like=epoch_like, data=data,
                model=model, optimizer=optimizer, step_fn=step_fn,
                controller=PIController(ast.controller, device),
                gen=torch.Generator(device=device).manual_seed(cfg.run.seed + 17 * info.rank),
                capture=FeatureCapture(raw_model) if ast.score == "loss_gradnorm" else None,
                bn_layers=batchnorm_layers(raw_model), scores=torch.full((n,), float("inf"), device=device),
                seen=torch.zeros(n, dtype=torch.bool, device=device),
                train_labels=training_labels(data.train) if ast.class_balanced else None,
                match_counts=match_counts, total_steps=total_steps, loader_batch=loader_batch, ladder=ladder)
    ladder.attach(v)  # the in-place rungs (compile off, checkpointing) act on v.model and v.step_fn
    return v


def train(cfg, info, run_dir, reference=None):
    """Train one variant into run_dir; returns its measured summary (also written to result.json). A memory fallback
    that changes the model or the data (lib/fallback.py) restarts it from step 0 with the effective config."""
    ladder = MemoryLadder(cfg, run_dir, info.world_size, log=say)
    while True:
        try:
            return train_once(ladder.effective_config(), info, run_dir, reference, ladder)
        except Restart:
            ladder.set_aside_checkpoints()


def train_once(cfg, info, run_dir, reference, ladder):
    with Run(cfg, info, may_change=MAY_CHANGE, run_dir=run_dir, log=say) as run, contextlib.ExitStack() as stack:
        ladder.write_note(run.dir)  # config.yaml: the effective settings and what the fallbacks changed
        v = build(cfg, info, run.dir.name, reference or {}, ladder)
        stack.callback(v.data.close)  # the loaders' workers stop with the run, not whenever the GC finds them

        # ---- resume
        counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "backward_samples": 0, "score_forward_samples": 0,
                    "offered_samples": 0, "train_seconds": 0.0, "energy_j": 0.0, "counts": [], "curve": []}
        state = run.resume(info.device)
        if state is not None:
            checkpoint.restore_training(state, v.model, v.optimizer, v.step_fn, counters, info.rank, cfg.run.seed)
            v.controller.load_state_dict(state["controller"])
            v.scores.copy_(state["scores"])
            if info.rank == 0:
                v.gen.set_state(state["generator"].cpu())
            else:  # the checkpoint holds rank 0's generator; the other ranks derive theirs from the step
                v.gen.manual_seed(cfg.run.seed + 17 * info.rank + 1_000_003 * counters["step"])

        def snapshot():
            return checkpoint.training_state(v.model, v.optimizer, v.step_fn, counters, to_dict(cfg),
                                             controller=v.controller.state_dict(), scores=v.scores,
                                             generator=v.gen.get_state())

        def evaluate_into_curve(epoch_done):
            result, per_sample = evaluate(v.model, v.data.test, v.step_fn.autocast, v.data.task, v.data.num_test)
            counters["curve"].append({"epoch": epoch_done, "step": counters["step"],
                                      "train_seconds": counters["train_seconds"], **result})
            run.metrics.write(kind="eval", epoch=epoch_done, step=counters["step"],
                              train_seconds=counters["train_seconds"], **result)
            say(f"[{run.dir.name}] epoch {epoch_done}: " + " ".join(f"{k}={val:.4f}" for k, val in result.items())
                + f" train {counters['train_seconds']:.1f}s")
            return per_sample

        # ---- the epoch loop
        predictions = None
        meter = EnergyMeter(info.device)
        for epoch in range(counters["epoch"], cfg.run.epochs):
            if counters["step"] >= v.total_steps:
                break
            weights, plan_idx = epoch_plan(v, counters, epoch, run.metrics)
            v.data.train.set_epoch(epoch, indices=plan_idx, start_batch=counters["batch_in_epoch"])
            v.seen.zero_()
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)
            meter.start()
            t0 = time.perf_counter()
            run_epoch(v, run, counters, epoch, weights)
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)
            counters["train_seconds"] += time.perf_counter() - t0
            counters["energy_j"] = None if not meter.available else (counters["energy_j"] or 0) + meter.read()
            if v.epoch_like and info.distributed:
                sync_scores(v.scores, v.seen)
            if run.should_stop():
                run.preempted(counters["step"], snapshot)  # checkpoint, one line, exit 0: rerun to resume
            done = counters["step"] >= v.total_steps
            if (epoch + 1) % cfg.run.eval_every == 0 or done or epoch + 1 == cfg.run.epochs:
                predictions = evaluate_into_curve(epoch + 1)
            run.save(counters["step"], snapshot)

        # ---- summary
        if v.capture:
            v.capture.close()
        # the final evaluation belongs to the final step: a run stopped right after its last step (SIGTERM) and
        # rerun evaluates here instead of reporting the curve's previous point
        if not counters["curve"] or counters["curve"][-1]["step"] != counters["step"]:
            predictions = evaluate_into_curve(min(cfg.run.epochs, counters["epoch"] + (counters["batch_in_epoch"] > 0)))
        if dist.is_main() and predictions is not None:
            save_predictions(run.dir, predictions)
        return run.finish(summarize(v, counters, run.dir), did_work=predictions is not None, report=False)


def epoch_plan(v, counters, epoch, metrics):
    """Epoch-wise runs: (per-sample loss weights on the device or None, the epoch's sample indices or None = all).

    A run resumed inside an epoch continues that epoch's checkpointed plan: it was made from the scores at the
    epoch's start, which training has updated since, and re-planning would train other samples."""
    if not v.epoch_like:
        return None, None
    n = v.data.num_train
    plan = counters.get("plan")
    if counters["batch_in_epoch"] > 0 and plan is not None and plan["epoch"] == epoch:
        plan_idx, weights = plan["indices"], plan["weights"]
    else:
        count = v.match_counts[epoch] if v.match_counts else None
        plan_idx, weights, threshold = plan_epoch(v.cfg, epoch, v.scores, n, v.data.task, v.train_labels,
                                                  v.data.num_classes, count)
        counters["plan"] = {"epoch": epoch, "indices": plan_idx, "weights": weights}
        metrics.write(kind="epoch_plan", epoch=epoch, selected=n if plan_idx is None else len(plan_idx),
                      rate=1.0 if plan_idx is None else len(plan_idx) / n, threshold=threshold)
    if counters["batch_in_epoch"] == 0 and len(counters["counts"]) == epoch:
        counters["counts"].append(n if plan_idx is None else len(plan_idx))
    return (weights.to(v.info.device) if weights is not None else None), plan_idx


def run_epoch(v, run, counters, epoch, weights):
    """The steps of one epoch (from counters["batch_in_epoch"] on), until the loader runs out, the run's last step,
    or a preemption signal; counts samples and logs every loop.log_every steps."""
    cfg, ast, device = v.cfg, v.cfg.ast, v.info.device

    def forward_loss(model, inputs, targets):  # epoch-wise runs record each sample's score as it trains
        labels, index = targets
        outputs = model(inputs)
        loss = sample_loss(cfg, outputs, labels, v.data.task)
        if v.epoch_like:
            s = significance(ast.score, outputs.detach(), labels, images=getattr(inputs, "frames", inputs),
                             loss=loss.detach(), task=v.data.task,
                             features=v.capture.features if v.capture else None)
            v.scores[index] = s.float()
            v.seen[index] = True
        return loss

    # batch mode on image files: the loader decodes a scoring image per sample and, after the selection, only the
    # selected samples at full resolution (data.selective_decode; the random control scores nothing)
    decode_for_selection = getattr(v.data.train, "decode_for_selection", None)
    if decode_for_selection is not None:
        score_px = None  # plain batches: warm-up epochs and the other modes train every sample they load
        if v.batch_like and epoch >= ast.warmup_epochs:
            score_px = 0 if ast.mode == "random" else ast.score_resolution or v.data.train.resolution
        decode_for_selection(score_px)
    window = {"loss": torch.zeros((), device=device), "steps": 0, "selected": 0, "offered": 0}
    throughput = Throughput(device)
    v.model.train()
    bar = tqdm(total=len(v.data.train) + counters["batch_in_epoch"], initial=counters["batch_in_epoch"],
               desc=f"{run.dir.name} epoch {epoch}", disable=not dist.is_main(), leave=False, mininterval=2)
    for x, y, idx in v.data.train:
        w, scored_here = None, False  # did a scoring forward at the training resolution see this batch?
        if v.batch_like and epoch < ast.warmup_epochs:
            counters["counts"].append(x.shape[0])  # warm-up: the whole batch, no scoring forward
            offered = x.shape[0]
        elif v.batch_like:
            x, y, idx, w, offered, scored = select_batch(cfg, v.model, v.bn_layers, x, y, idx, v.controller, v.gen,
                                                         v.step_fn, v.capture, v.data.task, v.match_counts, counters)
            counters["score_forward_samples"] += scored
            scored_here = scored > 0 and ast.score_resolution in (0, x.shape[-1])
        elif weights is not None:
            w = weights[idx]
        if v.batch_like:
            counters["offered_samples"] += offered
            window["offered"] += offered
        # batch mode scoring at the training resolution already updated the running BN statistics from the
        # whole batch; the subset forward then leaves them alone (see select_batch)
        with bn_momentum(v.bn_layers, 0.0 if scored_here else None):
            out = v.step_fn(x, (y, idx), forward_loss, weights=w)
        counters["step"] += 1
        counters["batch_in_epoch"] += 1
        counters["backward_samples"] += out.samples
        window["selected"] += out.samples
        window["loss"] += out.loss
        window["steps"] += 1
        throughput.add(out.samples)
        bar.update(1)
        step = counters["step"]
        if step % cfg.loop.log_every == 0 or step == v.total_steps:
            rate, peak = throughput.read()
            loss = (window["loss"] / window["steps"]).item()
            record = {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": out.lr,
                      "samples_per_s": rate, "peak_gb": peak,
                      "nonfinite_skipped": int(v.step_fn.nonfinite_total.item())}
            if v.batch_like:
                record.update(activation_rate=window["selected"] / max(1, window["offered"]),
                              threshold=float(v.controller.score_threshold()))
            run.metrics.write(**record)
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.0f}", mem=f"{peak:.1f}G")
            window.update(loss=torch.zeros((), device=device), steps=0, selected=0, offered=0)
        if step >= v.total_steps:
            break
        run.save_if_due(step, lambda: checkpoint.training_state(
            v.model, v.optimizer, v.step_fn, counters, to_dict(cfg), controller=v.controller.state_dict(),
            scores=v.scores, generator=v.gen.get_state()))
        if run.should_stop(step):
            break
    else:
        counters["epoch"], counters["batch_in_epoch"] = epoch + 1, 0  # the loader ran out: epoch done
    bar.close()


def summarize(v, counters, run_dir):
    """The run's measured summary (result.json): accuracy, samples, time, what compare.md needs to explain it."""
    cfg, ast, n = v.cfg, v.cfg.ast, v.data.num_train
    final = counters["curve"][-1]
    scored = counters["score_forward_samples"]
    offered = counters["offered_samples"] if v.batch_like else cfg.run.epochs * n if v.epoch_like \
        else counters["backward_samples"]
    return {
        "name": run_dir.name, "mode": ast.mode, "steps": counters["step"], "num_classes": v.data.num_classes,
        "train_seconds": counters["train_seconds"], "energy_j": counters["energy_j"],
        # every trained sample had one training forward; batch mode adds its scoring forward
        "forward_samples": counters["backward_samples"] + scored, "backward_samples": counters["backward_samples"],
        "score_forward_samples": scored,
        # backward samples over samples offered: loader samples in batch mode, data x epochs in epoch mode
        "activation_rate": counters["backward_samples"] / max(1, offered),
        "skipped_files": getattr(v.data.train, "skipped", 0),
        "nonfinite_skipped": int(v.step_fn.nonfinite_total.item()),
        "counts": counters["counts"], "curve": counters["curve"],
        "target_rate": ast.controller.target_rate if ast.mode != "full" else 1.0, "match": ast.match,
        "budget_of": ast.budget_of, "epochs": cfg.run.epochs, "run_dir": str(run_dir), "classes": v.data.classes,
        **phase_rates(cfg, counters["counts"], n, v.loader_batch, v.batch_like, v.epoch_like),
        **{k: val for k, val in final.items() if k in ("top1", "top5", "mae", "rmse")},
        "target_units": v.data.temporal.get("units"),
        # every out-of-memory fallback taken, and separately those that changed what was trained
        "memory_fallback": [r["text"] for r in v.ladder.records],
        "changed_by_fallback": [r["text"] for r in v.ladder.records if r["changes_model_or_data"]],
    }


def phase_rates(cfg, counts, num_train, loader_batch, batch_like, epoch_like):
    """Epochs on all data (warm-up, final) and the activation rate of the sparse phase alone, from the counts."""
    if epoch_like:
        sparse = [c for e, c in enumerate(counts) if epoch_size(cfg, e, num_train) is not None]
        return {"full_data_epochs": cfg.run.epochs - len(sparse),
                "sparse_activation_rate": sum(sparse) / (num_train * len(sparse)) if sparse else None}
    if batch_like:
        sparse = [c for c in counts if c < loader_batch]
        return {"full_data_epochs": min(cfg.ast.warmup_epochs, cfg.run.epochs),
                "sparse_activation_rate": sum(sparse) / (loader_batch * len(sparse)) if sparse else None}
    return {"full_data_epochs": cfg.run.epochs, "sparse_activation_rate": None}


def training_labels(loader):
    """Labels of the whole training split in dataset order (for class-balanced plans), or None if unknown."""
    labels = getattr(loader, "labels", None)
    if labels is None:  # ImageFolderLoader keeps them in its worker-side dataset
        labels = getattr(getattr(getattr(loader, "_loader", None), "dataset", None), "labels", None)
    return None if labels is None else torch.as_tensor(labels).cpu()


def sync_scores(scores, seen):
    """Epoch mode under DDP: every rank takes the scores the other ranks saw this epoch."""
    fresh = torch.where(seen, scores, torch.full_like(scores, float("inf")))
    torch.distributed.all_reduce(fresh, op=torch.distributed.ReduceOp.MIN)
    scores.copy_(torch.where(torch.isinf(fresh), scores, fresh))


def auto_micro_batch(model, data, cfg, per_rank, task):
    """Largest micro-batch that fits loop.memory_budget_gb (or 90% of free memory), probed OOM-safely."""
    x, y, _ = next(iter(data.train))
    budget = cfg.loop.memory_budget_gb * 1e9 if cfg.loop.memory_budget_gb else \
        0.9 * torch.cuda.mem_get_info()[0]

    def try_step(b):
        xb = x.expand_first(b) if hasattr(x, "expand_first") else x[:1].expand(b, *x.shape[1:]).contiguous()
        yb = y[:1].expand(b, *y.shape[1:]).contiguous()
        sample_loss(cfg, model(xb), yb, task).mean().backward()
        model.zero_grad(set_to_none=True)

    largest = find_micro_batch(try_step, start=8, max_batch=per_rank, budget_bytes=budget, log=say)
    micro, steps = plan_accumulation(per_rank, largest)
    say(f"[micro-batch] largest fitting {largest}; using {micro} x {steps} accumulation steps")
    return micro


# ----------------------------------------------------------------------------- comparison
DEFAULT_COMPARE = {"full": {"ast": {"mode": "full"}}, "ast": {},
                   "random": {"ast": {"mode": "random", "match": "ast"}},
                   "budget": {"ast": {"mode": "budget", "budget_of": "ast"}},
                   "curriculum": {"ast": {"mode": "curriculum", "match": "ast"}}}


def run_compare(cfg, info):
    """Run the variants back to back, per seed (compare.seeds); write compare.md, compare.csv and per_class.csv.

    Returns {name: summary} for one seed, {seed: {name: summary}} for several. A variant whose result.json exists
    is reused (a preempted comparison resumes where it stopped) if its folder's config equals this one's.
    """
    root = Path(cfg.run.out_dir) / cfg.run.name
    results, dirs = run_variants(cfg, cfg.compare.runs or DEFAULT_COMPARE,
                                 lambda vcfg, run_dir, reference: train(vcfg, info, run_dir, reference=reference),
                                 MAY_CHANGE, seeds=cfg.compare.seeds, log=say, effective=saved_effective,
                                 warmup_steps=cfg.compare.warmup_steps if info.device.type == "cuda" else 0)
    seeds = list(results)
    predictions = {key: load_predictions(run_dir) for key, run_dir in dirs.items()}
    if dist.is_main():
        write_comparison(root, results, predictions, say=say)
    return results[seeds[0]] if len(seeds) == 1 else results


# ----------------------------------------------------------------------------- main
def main(cfg):
    info = dist.setup(cfg.run.seed, cfg.run.device)
    torch.backends.cudnn.benchmark = True  # shapes repeat (batch mode buckets its subsets): autotune once each
    try:
        if cfg.compare.enabled:
            results = run_compare(cfg, info)
        else:
            results = {cfg.run.name: train(cfg, info, Path(cfg.run.out_dir) / cfg.run.name)}
        if dist.is_main():
            root = Path(cfg.run.out_dir) / cfg.run.name
            print(format_report(run_report(root)))
        return results
    finally:
        dist.cleanup()


if __name__ == "__main__":  # --help, config errors and user errors as one line (lib/run.py)
    run_script(main, Config(), __doc__, aliases={"--compare": "--compare.enabled=true"},
               extra_errors=(MemoryFallbackError,))
