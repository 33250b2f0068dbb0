"""Adaptive Sparse Training (AST): train only on the samples a significance score picks, at a held rate.

    # CPU, seconds: digits, `full` vs AST vs `random`, prints the comparison table
    python train_ast.py --config configs/quickstart.yaml
    # one GPU, CIFAR-10 (add --data.download=true the first time)
    python train_ast.py --config configs/cifar10.yaml
    # ImageNet folder (train/ and val/ inside data.root), one node with 8 GPUs
    torchrun --nproc_per_node=8 train_ast.py --config configs/imagenet_resnet50.yaml --data.root=/data/imagenet
    # any key can be overridden: --section.key=value ; the controls side by side: --compare
    python train_ast.py --config configs/cifar10.yaml --ast.mode=epoch --ast.controller.target_rate=0.2 --compare

Modes (ast.mode):
  full    every sample, every step (the baseline).
  batch   a no-grad forward scores the whole batch; forward+backward run only on the selected subset,
          gathered into a smaller batch, so unselected samples cost one inference forward and no backward.
          A PI controller moves the threshold to hold ast.controller.target_rate.
  epoch   no extra forward: each sample's score is the loss it had when last trained; samples below the
          threshold are dropped from the next epoch, a random `explore_rate` share of them is kept and
          reweighted by the inverse keep probability (unbiased gradient; it also refreshes their stale
          scores); the first
          `warmup_epochs` and the last `final_full_fraction` of epochs use all data.
  random  a uniform random subset at the same rate through the same machinery (`match` copies the exact
          sample counts of another compare run).
  budget  full data, training cut to the backward-sample budget of another run (`budget_of`).
"""
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lib import checkpoint, dist
from lib.config import ConfigError, merge, to_dict, write_run_info
from lib.data import DataConfig, build_data
from lib.energy import EnergyMeter
from lib.loop import (LoopConfig, MetricsLog, OptimConfig, Throughput, TrainStep,
                      build_optimizer, check_micro_batch, per_rank_batch, prepare_model)
from lib.memory import find_micro_batch, plan_accumulation
from lib.models import ModelConfig, build_model
from lib.selection import (ControllerConfig, FeatureCapture, PIController, check_score, per_sample_loss,
                           significance)
from lib.storage import format_report, run_report

MODES = ("full", "batch", "epoch", "random", "budget")


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
    mode: str = "batch"             # full | batch | epoch | random | budget (see the docstring)
    score: str = "loss"             # loss | loss_intensity | loss_gradnorm | loss_entropy
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    # batch mode
    score_batch: int = 0            # samples scored per optimizer step over all ranks (0 = loop.global_batch)
    score_resolution: int = 0       # px of the scoring forward (0 = training resolution; lower = cheaper)
    round_to: int = 32              # trained subset rounded up to a multiple with the next-highest scores: few
                                    # distinct shapes, each autotuned once by cuDNN (measured on an H100: every
                                    # new size costs 2-10 s of autotuning; with heuristics instead, a ~100-sample
                                    # step took as long as a 256-sample one)
    # batch + epoch modes
    warmup_epochs: int = 1          # batch + epoch modes: first epochs on all data (hard-sample selection from
                                    # step 0 destabilizes training; epoch mode also needs every sample scored)
    final_full_fraction: float = 0.1  # last fraction of epochs on all data
    explore_rate: float = 0.02      # share of the data kept at random from below the threshold (reweighted)
    # controls
    random_granularity: str = "batch"  # random: select per batch or per epoch (when `match` does not say)
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
        if self.mode == "epoch" and not 0 < self.explore_rate < self.controller.target_rate:
            raise ConfigError(f"ast.explore_rate={self.explore_rate} must be in (0, target_rate="
                              f"{self.controller.target_rate}): explored samples count towards the rate")
        if not 0 <= self.final_full_fraction < 1:
            raise ConfigError(f"ast.final_full_fraction must be in [0, 1), got {self.final_full_fraction}")


@dataclass
class CompareConfig:
    enabled: bool = False           # run the listed variants back to back and write compare.md / compare.csv
    # name -> overrides of this config, e.g. {random: {ast: {mode: random, match: ast}}}; empty = the defaults:
    # full, ast (this config's ast section), random (matched to ast), budget (matched to ast)
    runs: dict[str, dict] = field(default_factory=dict)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    ast: ASTConfig = field(default_factory=ASTConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


# ----------------------------------------------------------------------------- helpers
def say(*args):
    if dist.is_main():
        tqdm.write(" ".join(str(a) for a in args))


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
def evaluate(model, loader, autocast, task):
    """Top-1 / top-5 accuracy (classification) or MSE (regression) on the loader, summed over ranks."""
    model.eval()
    loader.set_epoch(0)
    totals = torch.zeros(3, device=next(model.parameters()).device)  # correct1, correct5 | sq_err, count
    for x, y, _ in loader:
        with autocast():
            out = model(x)
        if task == "classification":
            top = out.float().topk(min(5, out.shape[1]), dim=1).indices  # (B, 5)
            hit = top == y[:, None]
            totals += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=hit.device)])
        else:
            err = per_sample_loss(out.float(), y, task)
            totals += torch.stack([err.sum(), err.sum(), torch.tensor(float(len(y)), device=err.device)])
    dist.all_reduce_sum(totals)
    model.train()
    c1, c5, n = totals.tolist()
    if task == "classification":
        return {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1)}
    return {"mse": c1 / max(n, 1)}


def epoch_size(cfg, epoch, num_train, count=None):
    """Samples epoch mode trains on in `epoch`: all of them in the warm-up and final epochs, else the kept
    share (`count` copies another run's number); None means all data."""
    final_full = math.ceil(cfg.ast.final_full_fraction * cfg.run.epochs)
    if epoch < cfg.ast.warmup_epochs or epoch >= cfg.run.epochs - final_full:
        return None
    return count if count is not None else max(1, round(cfg.ast.controller.target_rate * num_train))


def plan_epoch(cfg, epoch, scores, num_train, count=None):
    """Epoch-mode sample plan: (indices or None for all data, per-sample weights or None, threshold)."""
    ast = cfg.ast
    n_keep = epoch_size(cfg, epoch, num_train, count)
    if n_keep is None:
        return None, None, float("nan")
    g = torch.Generator().manual_seed(cfg.run.seed * 7919 + epoch)
    if ast.mode == "random":
        return torch.randperm(num_train, generator=g)[:n_keep], None, float("nan")
    # The threshold is the exact quantile of the last-seen scores (all known here), so the rate is held
    # exactly; the PI controller is for batch mode, where scores arrive one batch at a time.
    p = ast.explore_rate
    order = torch.argsort(scores.cpu(), descending=True)  # never-scored samples (+inf) come first
    n_high = min(n_keep, round((ast.controller.target_rate - p) / (1 - p) * num_train))
    high, low = order[:n_high], order[n_high:]
    explored = low[torch.randperm(len(low), generator=g)[:n_keep - n_high]]
    # Horvitz-Thompson weights rate / keep_probability: each step's loss stays an unbiased estimate of the
    # full-data mean (kept samples average weight 1), so a sparse step is no larger than a full one.
    rate = n_keep / num_train
    weights = torch.full((num_train,), rate)
    weights[explored] = rate * len(low) / max(1, len(explored))
    threshold = float(scores[order[n_high - 1]]) if n_high > 0 else float("inf")
    return torch.cat([high, explored]), weights, threshold


# ----------------------------------------------------------------------------- one training run
def train(cfg, info, run_dir, reference=None):
    """Train one variant into run_dir; returns its measured summary (also written to result.json)."""
    reference = reference or {}
    ast = cfg.ast
    mode = ast.mode
    if mode == "random" and ast.match:
        granularity = "epoch" if reference.get(ast.match, {}).get("mode") == "epoch" else "batch"
    else:
        granularity = ast.random_granularity
    batch_like = mode == "batch" or (mode == "random" and granularity == "batch")
    epoch_like = mode == "epoch" or (mode == "random" and granularity == "epoch")
    device = info.device
    main_rank = dist.is_main()
    if main_rank:
        write_run_info(run_dir, cfg, device)

    per_rank = per_rank_batch(cfg.loop.global_batch, info.world_size)
    loader_batch = per_rank_batch(ast.score_batch or cfg.loop.global_batch, info.world_size) if batch_like \
        else per_rank
    data = build_data(cfg.data, device, batch_size=loader_batch, seed=cfg.run.seed,
                      rank=info.rank, world_size=info.world_size)
    if data.num_train // info.world_size < loader_batch:
        raise ConfigError(f"the training set has {data.num_train} samples, fewer than one batch of "
                          f"{loader_batch} per rank x {info.world_size} ranks; lower loop.global_batch")
    task = data.task
    check_score(ast.score, task)

    torch.manual_seed(cfg.run.seed)  # same init on every rank and for every compare variant
    model = build_model(cfg.model, data.in_channels, data.num_classes, data.image_size)
    model = prepare_model(model, cfg.loop, device)
    raw_model = checkpoint.unwrap(model)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = build_optimizer(raw_model, cfg.optim, device)
    capture = FeatureCapture(raw_model) if ast.score == "loss_gradnorm" else None
    bn_layers = batchnorm_layers(raw_model)

    # optimizer steps: the LR schedule is a pure function of the step, so it needs the total up front
    n = data.num_train
    n_rank = lambda count: (count // info.world_size) // loader_batch  # batches a rank gets from `count` samples
    match_counts = reference.get(ast.match, {}).get("counts") if ast.match else None
    if epoch_like:
        sizes = [epoch_size(cfg, e, n, match_counts[e] if match_counts else None) for e in range(cfg.run.epochs)]
        total_steps = sum(n_rank(n if size is None else size) for size in sizes)
    else:
        total_steps = cfg.run.epochs * n_rank(n)
    if mode == "budget":
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
        micro = auto_micro_batch(model, data, cfg, per_rank, task)
    else:
        # batch mode gathers subsets of any size up to the whole scoring batch (its warm-up trains on all of
        # it): never run more than the per-rank training batch through one forward
        micro = per_rank if batch_like else None
    step_fn = TrainStep(model, optimizer, cfg.loop, cfg.optim, total_steps, device, micro_batch=micro, log=say)
    controller = PIController(ast.controller, device)
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed + 17 * info.rank)
    scores = torch.full((n,), float("inf"), device=device)  # epoch mode: last-seen score per sample
    seen = torch.zeros(n, dtype=torch.bool, device=device)
    say(f"[{run_dir.name}] mode={mode} model={cfg.model.name} train={n} steps={total_steps} "
        f"global batch={cfg.loop.global_batch} per rank={per_rank} micro={micro or per_rank} "
        f"ranks={info.world_size} precision={step_fn.dtype or 'fp32'} device={device}")

    # ---- resume
    counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "backward_samples": 0,
                "score_forward_samples": 0, "offered_samples": 0, "train_seconds": 0.0, "energy_j": 0.0,
                "counts": [], "curve": []}
    ckpt_dir = run_dir / "checkpoints"
    resume_path = checkpoint.resolve_resume(cfg.run.resume, ckpt_dir)
    if resume_path is not None:
        state = checkpoint.load(resume_path, map_location=device)
        checkpoint.restore_training(state, model, optimizer, step_fn, counters, info.rank, cfg.run.seed)
        controller.load_state_dict(state["controller"])
        scores.copy_(state["scores"])
        if info.rank == 0:
            gen.set_state(state["generator"].cpu())
        else:  # the checkpoint holds rank 0's generator; the other ranks derive theirs from the step
            gen.manual_seed(cfg.run.seed + 17 * info.rank + 1_000_003 * counters["step"])
        say(f"[{run_dir.name}] resumed from {resume_path} at step {counters['step']} "
            f"(epoch {counters['epoch']}, batch {counters['batch_in_epoch']})")

    def save_checkpoint():
        if not main_rank:
            return
        checkpoint.save(ckpt_dir, counters["step"], checkpoint.training_state(
            model, optimizer, step_fn, counters, to_dict(cfg), controller=controller.state_dict(), scores=scores,
            generator=gen.get_state()), keep=cfg.run.keep_checkpoints)

    # ---- the loss of one micro-batch; epoch mode records each sample's score as it trains
    def forward_loss(model_, inputs, targets):
        labels, index = targets
        outputs = model_(inputs)
        loss = per_sample_loss(outputs, labels, task)
        if epoch_like:
            s = significance(ast.score, outputs.detach(), labels, images=inputs, loss=loss.detach(), task=task,
                             features=capture.features if capture else None)
            scores[index] = s.float()
            seen[index] = True
        return loss

    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=main_rank)
    meter = EnergyMeter(device)
    window = {"loss": torch.zeros((), device=device), "steps": 0, "selected": 0, "offered": 0}
    throughput = Throughput(device)
    done = counters["step"] >= total_steps
    with checkpoint.PreemptionHandler() as preempt:
        for epoch in range(counters["epoch"], cfg.run.epochs):
            if done:
                break
            weights = None
            plan_idx = None
            if epoch_like:
                count = match_counts[epoch] if match_counts else None
                plan_idx, weights_cpu, threshold = plan_epoch(cfg, epoch, scores, n, count)
                weights = weights_cpu.to(device) if weights_cpu is not None else None
                metrics.write(kind="epoch_plan", epoch=epoch, selected=n if plan_idx is None else len(plan_idx),
                              rate=1.0 if plan_idx is None else len(plan_idx) / n, threshold=threshold)
                if counters["batch_in_epoch"] == 0 and len(counters["counts"]) == epoch:
                    counters["counts"].append(n if plan_idx is None else len(plan_idx))
            data.train.set_epoch(epoch, indices=plan_idx, start_batch=counters["batch_in_epoch"])
            seen.zero_()
            model.train()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            meter.start()
            t0 = time.perf_counter()
            bar = tqdm(total=len(data.train) + counters["batch_in_epoch"], initial=counters["batch_in_epoch"],
                       desc=f"{run_dir.name} epoch {epoch}", disable=not main_rank, leave=False, mininterval=2)
            for x, y, idx in data.train:
                scored_here = False  # did a scoring forward at the training resolution see this batch?
                if batch_like and epoch < ast.warmup_epochs:
                    counters["counts"].append(x.shape[0])  # warm-up: the whole batch, no scoring forward
                    offered = x.shape[0]
                    w = None
                elif batch_like:
                    x, y, idx, offered, scored = select_batch(cfg, model, bn_layers, x, y, idx, controller, gen,
                                                     step_fn, capture, task, match_counts, counters)
                    counters["score_forward_samples"] += scored
                    scored_here = scored > 0 and ast.score_resolution in (0, x.shape[-1])
                    w = None
                if batch_like:
                    counters["offered_samples"] += offered
                    window["offered"] += offered
                else:
                    w = weights[idx] if weights is not None else None
                # batch mode scoring at the training resolution already updated the running BN statistics
                # from the whole batch; the subset forward then leaves them alone (see select_batch)
                with bn_momentum(bn_layers, 0.0 if scored_here else None):
                    out = step_fn(x, (y, idx), forward_loss, weights=w)
                counters["step"] += 1
                counters["batch_in_epoch"] += 1
                counters["backward_samples"] += out.samples
                window["selected"] += out.samples
                window["loss"] += out.loss
                window["steps"] += 1
                throughput.add(out.samples)
                bar.update(1)
                step = counters["step"]
                if step % cfg.loop.log_every == 0 or step == total_steps:
                    rate, peak = throughput.read()
                    loss = (window["loss"] / window["steps"]).item()
                    record = {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": out.lr,
                              "samples_per_s": rate, "peak_gb": peak,
                              "nonfinite_skipped": int(step_fn.nonfinite_total.item())}
                    if batch_like:
                        record.update(activation_rate=window["selected"] / max(1, window["offered"]),
                                      threshold=float(controller.score_threshold()))
                    metrics.write(**record)
                    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.0f}", mem=f"{peak:.1f}G")
                    window.update(loss=torch.zeros((), device=device), steps=0, selected=0, offered=0)
                if step >= total_steps:
                    done = True
                    break
                if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
                    save_checkpoint()
                if preempt.stop_now(step, cfg.loop.log_every, device):
                    break
            else:
                counters["epoch"], counters["batch_in_epoch"] = epoch + 1, 0  # the loader ran out: epoch done
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            counters["train_seconds"] += time.perf_counter() - t0
            counters["energy_j"] = None if not meter.available else (counters["energy_j"] or 0) + meter.read()
            if epoch_like and info.distributed:
                sync_scores(scores, seen)
            if preempt.sync_requested(device) if info.distributed else preempt.requested:  # collective under DDP
                save_checkpoint()
                say(f"[{run_dir.name}] preemption signal: checkpoint at step {counters['step']} written; "
                    f"rerun the same command to resume")
                metrics.close()
                dist.cleanup()
                sys.exit(0)
            if (epoch + 1) % cfg.run.eval_every == 0 or done or epoch + 1 == cfg.run.epochs:
                result = evaluate(model, data.test, step_fn.autocast, task)
                counters["curve"].append({"epoch": epoch + 1, "step": counters["step"],
                                          "train_seconds": counters["train_seconds"], **result})
                metrics.write(kind="eval", epoch=epoch + 1, step=counters["step"],
                              train_seconds=counters["train_seconds"], **result)
                say(f"[{run_dir.name}] epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in result.items())
                    + f" train {counters['train_seconds']:.1f}s")
            save_checkpoint()
    metrics.close()
    if capture:
        capture.close()
    final = counters["curve"][-1] if counters["curve"] else evaluate(model, data.test, step_fn.autocast, task)
    scored = counters["score_forward_samples"]
    summary = {
        "name": run_dir.name, "mode": mode, "steps": counters["step"], "num_classes": data.num_classes,
        "train_seconds": counters["train_seconds"], "energy_j": counters["energy_j"],
        # every trained sample had one training forward; batch mode adds its scoring forward
        "forward_samples": counters["backward_samples"] + scored, "backward_samples": counters["backward_samples"],
        "score_forward_samples": scored,
        # backward samples over samples offered: loader samples in batch mode, data x epochs in epoch mode
        "activation_rate": counters["backward_samples"] / max(1, counters["offered_samples"] if batch_like else
                                                              cfg.run.epochs * n if epoch_like else
                                                              counters["backward_samples"]),
        "skipped_files": getattr(data.train, "skipped", 0), "nonfinite_skipped": int(step_fn.nonfinite_total.item()),
        "counts": counters["counts"], "curve": counters["curve"],
        **{k: v for k, v in final.items() if k in ("top1", "top5", "mse")},
    }
    if main_rank:
        (run_dir / "result.json").write_text(json.dumps(summary, indent=2))
    return summary


def select_batch(cfg, model, bn_layers, x, y, idx, controller, gen, step_fn, capture, task, match_counts,
                 counters):
    """Batch mode: score the batch without grad, pick the subset; returns it gathered, offered and scored counts."""
    ast = cfg.ast
    batch = x.shape[0]
    if ast.mode == "random":
        if match_counts:
            k = match_counts[min(counters["step"], len(match_counts) - 1)]
        else:
            k = min(batch, math.ceil(ast.controller.target_rate * batch / ast.round_to) * ast.round_to)
        selected = torch.randperm(batch, device=x.device, generator=gen)[:k]
        scored = 0  # the random control needs no scores: unselected samples cost nothing
    else:
        same_res = ast.score_resolution in (0, x.shape[-1])
        # Running BN statistics come from the full scoring batch when it runs at the training resolution
        # (unbiased), else from the trained subset; the other forward leaves them unchanged (momentum 0).
        with torch.no_grad(), step_fn.autocast(), bn_momentum(bn_layers, None if same_res else 0.0):
            xs = x if same_res else F.interpolate(x, size=ast.score_resolution, mode="bilinear",
                                                  align_corners=False)
            outputs = model(xs)
            loss = per_sample_loss(outputs, y, task)
            s = significance(ast.score, outputs, y, images=x, loss=loss, task=task,
                             features=capture.features if capture else None)
        mask = controller.select(s, generator=gen)
        k = int(mask.sum())  # the one host sync per step: the subset size sets the shapes below
        k = subset_size(k, batch, ast.controller.target_rate, ast.round_to)
        priority = torch.where(mask, torch.full_like(s, float("inf")), s)
        selected = priority.topk(k, sorted=False).indices
        chosen = torch.zeros(batch, dtype=torch.bool, device=x.device)
        chosen[selected] = True
        controller.update(chosen)
        scored = batch
    counters["counts"].append(len(selected))
    x = x[selected]  # (k, C, H, W): the gather may drop channels_last
    if x.dim() == 4 and cfg.loop.channels_last and x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y[selected], idx[selected], batch, scored


def subset_size(k, batch, target_rate, round_to):
    """Round the selected count up to a multiple of `round_to`, within one bucket of the target size.

    The band keeps per-step compute bounded and the set of shapes small (each new shape costs cuDNN
    autotuning); the controller counts what is finally trained, so the rate it holds is the real one.
    """
    target = max(round_to, math.ceil(target_rate * batch / round_to) * round_to)
    k = math.ceil(max(k, 1) / round_to) * round_to
    return min(batch, max(target - round_to, round_to, min(k, target + round_to)))


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
        xb = x[:1].expand(b, *x.shape[1:]).contiguous()
        yb = y[:1].expand(b, *y.shape[1:]).contiguous()
        per_sample_loss(model(xb), yb, task).mean().backward()
        model.zero_grad(set_to_none=True)

    largest = find_micro_batch(try_step, start=8, max_batch=per_rank, budget_bytes=budget, log=say)
    micro, steps = plan_accumulation(per_rank, largest)
    say(f"[micro-batch] largest fitting {largest}; using {micro} x {steps} accumulation steps")
    return micro


# ----------------------------------------------------------------------------- comparison
DEFAULT_COMPARE = {"full": {"ast": {"mode": "full"}}, "ast": {},
                   "random": {"ast": {"mode": "random", "match": "ast"}},
                   "budget": {"ast": {"mode": "budget", "budget_of": "ast"}}}


def run_compare(cfg, info):
    """Run the variants back to back with the same seed; write compare.md / compare.csv (and plots)."""
    root = Path(cfg.run.out_dir) / cfg.run.name
    variants = cfg.compare.runs or DEFAULT_COMPARE
    results = {}
    for name, overrides in variants.items():
        vcfg = merge(cfg, overrides)
        vcfg = merge(vcfg, {"compare": {"enabled": False}})
        run_dir = root / name
        done_file = run_dir / "result.json"
        if done_file.is_file() and vcfg.run.resume != "none":
            results[name] = json.loads(done_file.read_text())  # finished before a preemption: keep it
            say(f"[{name}] already finished, reusing {done_file}")
            continue
        results[name] = train(vcfg, info, run_dir, reference=results)
    if dist.is_main():
        write_comparison(root, results)
    return results


def write_comparison(root, results):
    """compare.md + compare.csv with measured numbers only, plus PNG plots when matplotlib is installed."""
    full = results.get("full")
    rows = []
    for name, r in results.items():
        speedup = full["train_seconds"] / r["train_seconds"] if full and r["train_seconds"] > 0 else None
        rows.append({"run": name, "mode": r["mode"], "top1": r.get("top1"), "top5": r.get("top5"),
                     "mse": r.get("mse"), "train_seconds": r["train_seconds"],
                     "forward_samples": r["forward_samples"], "backward_samples": r["backward_samples"],
                     "activation_rate": r["activation_rate"], "speedup_vs_full": speedup,
                     "energy_j": r["energy_j"]})
    show_top5 = any(r.get("top5") is not None and r.get("num_classes", 0) > 10 for r in results.values())
    keys = ["run", "mode", "top1"] + (["top5"] if show_top5 else []) + \
        ["train_seconds", "forward_samples", "backward_samples", "activation_rate", "speedup_vs_full", "energy_j"]
    if all(r.get("top1") is None for r in rows):
        keys[keys.index("top1")] = "mse"
    with open(root / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("not measured" if k == "energy_j" and row[k] is None else row[k]) for k in keys})

    def fmt(k, v):
        if v is None:
            return "not measured" if k == "energy_j" else "-"
        if k in ("top1", "top5", "activation_rate"):
            return f"{100 * v:.2f}%"
        if k in ("train_seconds", "energy_j"):
            return f"{v:.1f}"
        if k == "speedup_vs_full":
            return f"{v:.2f}x"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(k, row[k]) for k in keys) + " |" for row in rows]
    table = "\n".join(lines)
    text = (f"# Comparison: {root.name}\n\nAll numbers measured in this run (same seed, same machine, one after "
            f"another). train_seconds excludes evaluation; forward_samples includes the scoring forward of batch "
            f"mode; energy is the GPU driver's counter (NVML), 'not measured' where there is none.\n\n{table}\n")
    (root / "compare.md").write_text(text)
    print(table)
    plot_comparison(root, results)


def plot_comparison(root, results):
    """accuracy_vs_time.png and controller.png (threshold and activation rate per step), if matplotlib exists."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: skipping plots (pip install matplotlib)")
        return
    metric = "top1" if any(c.get("top1") is not None for r in results.values() for c in r["curve"]) else "mse"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot([c["train_seconds"] for c in r["curve"]], [c.get(metric) for c in r["curve"]], marker="o",
                label=name)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel(f"test {metric}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_time.png", dpi=100)
    plt.close(fig)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for name in results:
        path = root / name / "metrics.jsonl"
        if not path.is_file():
            continue
        rec = [json.loads(line) for line in path.read_text().splitlines()]
        rec = [r for r in rec if r.get("kind") == "train" and "activation_rate" in r]
        if rec:
            ax1.plot([r["step"] for r in rec], [r["threshold"] for r in rec], label=name)
            ax2.plot([r["step"] for r in rec], [r["activation_rate"] for r in rec], label=name)
    ax1.set_ylabel("threshold")
    ax2.set_ylabel("activation rate")
    ax2.set_xlabel("step")
    if ax1.lines:
        ax1.legend()
    fig.tight_layout()
    fig.savefig(root / "controller.png", dpi=100)
    plt.close(fig)


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


if __name__ == "__main__":
    from lib.run import run_script  # --help, config errors and user errors as one line, for every script
    run_script(main, Config(), __doc__, aliases={"--compare": "--compare.enabled=true"})
