"""Train recurrent vision models with biological delays (DyRCNN, after DynVision) on images shown over time.

    # CPU, seconds: a tiny DyRCNN on scikit-learn digits; writes accuracy per timestep (CSV + PNG)
    python train_dynvision.py --config configs/dynvision_debug.yaml
    # one GPU, CIFAR-100 at 32 px (add --data.download=true the first time)
    python train_dynvision.py --config configs/dynvision_cifar100.yaml
    # ImageNet folder (train/ and val/ inside data.root), DyRCNNx8, 224 px, delays 5/3: 20 + 20 residual steps
    torchrun --nproc_per_node=8 train_dynvision.py --config configs/dynvision_imagenet.yaml --data.root=/data/imagenet
    # a 16 GB T4: checkpointed chunks, micro-batches found under the memory budget, accumulated to 128
    python train_dynvision.py --config configs/dynvision_t4.yaml --data.root=/data/imagenet
    # any key: --section.key=value, e.g. --memory.strategy=checkpoint --memory.chunk_steps=10
    python train_dynvision.py --config configs/dynvision_debug.yaml --memory.strategy=stream --memory.stream_window_steps=6
    # check the memory strategies on your data before a long run: full, checkpoint, compress, stream back to back
    # (compare.runs picks others), then compare.md / compare.csv / accuracy_per_step.png in the run folder
    python train_dynvision.py --config configs/dynvision_debug.yaml --compare

Memory strategies (memory.strategy): full (plain BPTT), checkpoint (recompute chunks of steps in backward;
exact), offload (saved activations in pinned host memory; exact), compress (saved activations as int8/bf16;
approximate), stream (truncated BPTT: each window's loss is backpropagated when the window ends; memory
constant in the number of steps; approximate); offload+compress, stream+compress, stream+offload combine.
model.update_every (e.g. [1, 1, 2, 2]) makes later areas update at a lower rate: a different model.
What each costs in accuracy and temporal dynamics on real data: bench/dynvision_quality.py, docs/BENCHMARKS.md.
Progressive resolution: data.resize_schedule, e.g. {0: 112, 10: 168, 20: 224} (px by epoch).
"""
import contextlib
import csv
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib import checkpoint, dist
from lib.config import ConfigError, to_dict
from lib.data import DataConfig, build_data
from lib.dynvision import (AREAS, DyRCNN, LossConfig, MemoryConfig, ModelConfig, check_schedule, count_params,
                           stream_backward, strategy_forward, timestep_loss)
from lib.dynvision.report import after_reaction, write_strategy_comparison
from lib.loop import (LoopConfig, OptimConfig, Throughput, TrainStep, build_optimizer, check_micro_batch,
                      per_rank_batch, prepare_model)
from lib.memory import find_micro_batch, plan_accumulation
from lib.run import MAY_CHANGE as RUN_MAY_CHANGE
from lib.run import CompareConfig, Run, run_script, run_variants

# keys a resumed run may change (they change how the run is carried out, not what it computes)
MAY_CHANGE = RUN_MAY_CHANGE + ("run.eval_every", "loop.compile", "loop.compile_mode", "loop.memory_budget_gb",
                               "data.resident_max_gb", "compare")
# --compare without compare.runs: each strategy with this config's other memory settings
DEFAULT_COMPARE = {"full": {"memory": {"strategy": "full"}}, "checkpoint": {"memory": {"strategy": "checkpoint"}},
                   "compress": {"memory": {"strategy": "compress"}}, "stream": {"memory": {"strategy": "stream"}}}


# ----------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    name: str = "dynvision"         # run folder: <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"            # auto | cuda | cpu
    epochs: int = 10
    max_steps: int = 0              # stop after this many optimizer steps (0 = all epochs)
    eval_every: int = 1             # epochs between evaluations (accuracy per timestep)
    eval_batches: int = 0           # test batches per evaluation (0 = the whole test set)
    checkpoint_every: int = 0       # optimizer steps between checkpoints (0 = at the end of each epoch only)
    keep_checkpoints: int = 3
    resume: str = "auto"            # auto (latest complete checkpoint in the run folder) | none | <path>


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)   # num_classes / in_channels come from the data
    loss: LossConfig = field(default_factory=LossConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def validate(self):
        # delays vs reaction time, chunk vs unrolled steps, stream vs loss mode: fail before any data loads
        check_schedule(self.model, self.loss, self.memory)
        if "stream" in self.memory.parts() and self.memory.stream_window_steps <= 4 * self.model.forward_delay_steps:
            say(f"[config] note: stream windows of {self.memory.stream_window_steps} steps are not longer than the "
                f"{4 * self.model.forward_delay_steps} steps from V1 to the readout: V1 gets no gradient from the "
                f"main path (only via skips); raise memory.stream_window_steps for full credit assignment")


def say(*args):
    if dist.is_main():
        print(*args, flush=True)


# ----------------------------------------------------------------------------- steps
class StreamStep(TrainStep):
    """TrainStep whose micro-batches run truncated BPTT: backward happens inside the forward, per window."""

    def __init__(self, *args, memory_cfg, react, label_smoothing, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_cfg, self.react, self.label_smoothing = memory_cfg, react, label_smoothing

    def _accumulate(self, inputs, targets, forward_loss, weights):
        n = inputs.shape[0]
        micro = self.micro_batch or n
        loss_sum = torch.zeros((), device=self.device)
        ddp = hasattr(self.model, "no_sync")
        # several backward passes per forward do not fit DDP's reducer: accumulate locally, average after
        with self.model.no_sync() if ddp else contextlib.nullcontext():
            for start in range(0, n, micro):
                sl = slice(start, min(start + micro, n))
                with self.autocast():
                    per_sample = stream_backward(self.model, inputs[sl], targets[sl], self.react, self.memory_cfg,
                                                 loss_scale=1.0 / n, scaler=self.scaler,
                                                 label_smoothing=self.label_smoothing)
                loss_sum += per_sample.sum() / n
        if ddp:
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce_mean(p.grad)
        return loss_sum


def auto_micro_batch(model, cfg, example, per_rank, react, measure_peak=None, reset_peak=None, budget_bytes=None):
    """Largest micro-batch whose forward+backward under the memory strategy fits the budget (OOM-safe probe).

    The budget is loop.memory_budget_gb (or 90% of free GPU memory); tests inject measure_peak/budget_bytes.
    """
    if budget_bytes is None:
        budget_bytes = cfg.loop.memory_budget_gb * 1e9 if cfg.loop.memory_budget_gb else \
            0.9 * torch.cuda.mem_get_info()[0]
    x, y = example
    dtype = torch.bfloat16 if x.device.type == "cuda" and cfg.loop.precision in ("auto", "bf16") else None

    def try_step(b):
        xb = x[:1].expand(b, *x.shape[1:]).contiguous()
        yb = y[:1].expand(b).contiguous()
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if "stream" in cfg.memory.parts():
                stream_backward(model, xb, yb, react, cfg.memory, loss_scale=1.0 / b)
            else:
                loss = timestep_loss(strategy_forward(model, xb, cfg.memory), yb, react).mean()
        if "stream" not in cfg.memory.parts():
            loss.backward()
        model.zero_grad(set_to_none=True)

    largest = find_micro_batch(try_step, start=min(8, per_rank), max_batch=per_rank, budget_bytes=budget_bytes,
                               measure_peak=measure_peak, reset_peak=reset_peak, log=say)
    micro, steps = plan_accumulation(per_rank, largest)
    say(f"[micro-batch] largest fitting {largest} under {budget_bytes / 1e9:.2f} GB; using {micro} x {steps} "
        f"accumulation steps per rank")
    return micro, largest


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, loader, autocast, total_steps_unrolled, max_batches=0):
    """Accuracy at every unrolled step (T,) over the distinct test samples of all ranks (padding counted once)."""
    model.eval()
    loader.set_epoch(0)
    device = next(model.parameters()).device
    hits = dist.UniqueSampleSum(loader.num_samples, (total_steps_unrolled,), device)
    for i, (x, y, index) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        with autocast():
            logits = model(x)                               # (B, T, classes)
        hits.add(index, logits.argmax(-1) == y[:, None])    # (B, T) correct at each step
    correct, count = hits.total()
    model.train()
    return (correct / max(count, 1)).tolist()


def write_accuracy(run_dir, epoch, acc, model_cfg, react):
    """accuracy_per_step.csv (one row per step and epoch) and, with matplotlib, accuracy_per_step.png."""
    path = run_dir / "accuracy_per_step.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["epoch", "step", "time_ms", "stimulus_on", "labelled", "accuracy"])
        for t, a in enumerate(acc):
            w.writerow([epoch, t, round(t * model_cfg.dt_ms, 3), int(t < model_cfg.n_timesteps), int(t >= react),
                        round(a, 6)])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    times = [t * model_cfg.dt_ms for t in range(len(acc))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(times, [100 * a for a in acc], marker=".")
    ax.axvspan(0, model_cfg.n_timesteps * model_cfg.dt_ms, color="0.9", label="stimulus on")
    ax.axvline(react * model_cfg.dt_ms, color="C3", ls="--", label="reaction time")
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"accuracy per timestep, epoch {epoch}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy_per_step.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- build
@dataclass
class Parts:
    """What `build` makes: the data, the model (DDP-wrapped under torchrun) and its training step."""
    data: object
    model: torch.nn.Module
    raw_model: torch.nn.Module                  # unwrapped: what checkpoints hold
    optimizer: torch.optim.Optimizer
    step_fn: TrainStep
    model_cfg: ModelConfig                      # num_classes / in_channels filled in from the data
    total_steps: int                            # optimizer steps of the whole run
    total_unrolled: int                         # timesteps of one forward (stimulus + residual)
    react: int                                  # first step the loss counts (the reaction time)


def build(cfg, info):
    """Data, model, optimizer and training step for this rank; prints what was built."""
    device = info.device
    per_rank = per_rank_batch(cfg.loop.global_batch, info.world_size)
    data = build_data(cfg.data, device, batch_size=per_rank, seed=cfg.run.seed, rank=info.rank,
                      world_size=info.world_size)
    if data.num_train // info.world_size < per_rank:
        raise ConfigError(f"the training set has {data.num_train} samples, fewer than one batch of {per_rank} per "
                          f"rank x {info.world_size} ranks; lower loop.global_batch")
    model_cfg = dataclasses.replace(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    total_unrolled, react = check_schedule(model_cfg, cfg.loss, cfg.memory)

    torch.manual_seed(cfg.run.seed)  # same init on every rank
    model = prepare_model(DyRCNN(model_cfg), cfg.loop, device)
    raw_model = checkpoint.unwrap(model)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = build_optimizer(raw_model, cfg.optim, device)
    steps_per_epoch = (data.num_train // info.world_size) // per_rank
    total_steps = cfg.run.epochs * steps_per_epoch
    if cfg.run.max_steps:
        total_steps = min(total_steps, cfg.run.max_steps)

    if cfg.loop.micro_batch > 0:
        check_micro_batch(per_rank, cfg.loop.micro_batch)
        micro = cfg.loop.micro_batch
    elif cfg.loop.micro_batch == -1 and device.type == "cuda":
        x, y, _ = next(iter(data.train))
        micro, _ = auto_micro_batch(model, cfg, (x, y), per_rank, react)
    else:
        micro = None
    common = dict(micro_batch=micro, log=say)
    if "stream" in cfg.memory.parts():
        step_fn = StreamStep(model, optimizer, cfg.loop, cfg.optim, total_steps, device, memory_cfg=cfg.memory,
                             react=react, label_smoothing=cfg.loss.label_smoothing, **common)
    else:
        step_fn = TrainStep(model, optimizer, cfg.loop, cfg.optim, total_steps, device, **common)
    say(f"[dynvision] {model_cfg.preset} params={count_params(raw_model):,} steps unrolled={total_unrolled} "
        f"(stimulus {model_cfg.n_timesteps} + residual {model_cfg.residual()}), reaction step {react}, "
        f"memory={cfg.memory.strategy}, train={data.num_train} optimizer steps={total_steps}, global batch="
        f"{cfg.loop.global_batch}, per rank={per_rank}, micro={micro or per_rank}, ranks={info.world_size}, "
        f"precision={step_fn.dtype or 'fp32'}, device={device}")
    return Parts(data, model, raw_model, optimizer, step_fn, model_cfg, total_steps, total_unrolled, react)


# ----------------------------------------------------------------------------- train
def train(cfg, run, parts):
    """Resume, the epoch loop (the step, logging, checkpoints, evaluation), the summary; returns the result."""
    data, model, step_fn, react = parts.data, parts.model, parts.step_fn, parts.react
    device, world = run.info.device, run.info.world_size

    def forward_loss(model_, images, labels):  # runs under the loop's autocast
        logits = strategy_forward(model_, images, cfg.memory)          # (B, T, classes)
        return timestep_loss(logits, labels, react, cfg.loss.mode, cfg.loss.label_smoothing)

    # ---- resume
    # first_epoch: [steps, seconds] of epoch 0, which carries the one-time costs (kept out of step_seconds)
    counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "first_epoch": None}
    state = run.resume(map_location=device)
    if state is not None:
        checkpoint.restore_training(state, model, parts.optimizer, step_fn, counters, run.info.rank, cfg.run.seed)

    def snapshot():  # what a checkpoint holds
        return checkpoint.training_state(model, parts.optimizer, step_fn, counters, to_dict(cfg))

    # ---- the epoch loop
    total_steps = parts.total_steps
    throughput = Throughput(device)
    window_loss, window_steps = torch.zeros((), device=device), 0
    last_acc = None
    done = counters["step"] >= total_steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in range(counters["epoch"], cfg.run.epochs):
        if done:
            break
        data.train.set_epoch(epoch, start_batch=counters["batch_in_epoch"])  # also sets the resolution
        model.train()
        t0 = time.perf_counter()
        for x, y, _ in data.train:
            out = step_fn(x, y, forward_loss)
            counters["step"] += 1
            counters["batch_in_epoch"] += 1
            window_loss += out.loss
            window_steps += 1
            throughput.add(out.samples)
            step = counters["step"]
            if step % cfg.loop.log_every == 0 or step == total_steps:
                rate, peak = throughput.read()
                loss = (window_loss / window_steps).item()
                run.metrics.write(kind="train", step=step, epoch=epoch, loss=loss, lr=out.lr,
                                  samples_per_s=rate * world, peak_gb=peak, resolution=data.train.resolution)
                say(f"step {step}/{total_steps} epoch {epoch} loss {loss:.4f} lr {out.lr:.3g} "
                    f"{rate * world:.1f} samples/s peak {peak:.2f} GB res {data.train.resolution}px")
                window_loss, window_steps = torch.zeros((), device=device), 0
            if step >= total_steps:
                done = True
                break
            run.save_if_due(step, snapshot)
            if run.should_stop(step):
                break
        else:
            counters["epoch"], counters["batch_in_epoch"] = epoch + 1, 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # once per epoch: the epoch's kernels are in its seconds
        counters["train_seconds"] += time.perf_counter() - t0
        if epoch == 0 and counters["first_epoch"] is None:
            counters["first_epoch"] = [counters["step"], counters["train_seconds"]]
        if done and counters["batch_in_epoch"]:
            counters["epoch"], counters["batch_in_epoch"] = epoch + 1, 0
        if run.should_stop() and not done:  # every rank agrees here (a collective under torchrun)
            run.preempted(counters["step"], snapshot)  # checkpoint, then exit 0
        if (epoch + 1) % cfg.run.eval_every == 0 or done or epoch + 1 == cfg.run.epochs:
            last_acc = evaluate_and_log(cfg, run, parts, epoch, counters["step"])
        run.save(counters["step"], snapshot)

    # ---- summary (a rerun of a finished run trained nothing: its result.json is kept, not replaced)
    if last_acc is None and run.previous_result() is None:
        last_acc = evaluate(model, data.test, step_fn.autocast, parts.total_unrolled, cfg.run.eval_batches)
    steps, seconds = counters["step"], counters["train_seconds"]
    first = counters["first_epoch"]
    if first is not None and steps > first[0]:  # one-time costs (first epoch) left out
        steps, seconds = steps - first[0], seconds - first[1]
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    summary = {"steps": counters["step"], "train_seconds": round(counters["train_seconds"], 2),
               "step_seconds": seconds / steps if steps else None,
               "peak_memory_gb": None if peak is None else round(peak, 4),  # None: not measured (CPU)
               "accuracy_per_step": last_acc, "final_accuracy": last_acc[-1] if last_acc else None,
               "mean_accuracy_after_reaction": after_reaction(last_acc, react) if last_acc else None,
               "params": count_params(parts.raw_model), "memory_strategy": cfg.memory.strategy,
               "memory": to_dict(cfg.memory), "update_every": list(parts.model_cfg.update_every),
               "n_timesteps": parts.model_cfg.n_timesteps, "dt_ms": parts.model_cfg.dt_ms,
               "areas": AREAS, "reaction_step": react, "unrolled_steps": parts.total_unrolled}
    return run.finish(summary, did_work=counters["step"] > run.start_step)


def evaluate_and_log(cfg, run, parts, epoch, step):
    """Accuracy per timestep on the test set: accuracy_per_step.csv/.png, metrics.jsonl, one printed line."""
    acc = evaluate(parts.model, parts.data.test, parts.step_fn.autocast, parts.total_unrolled, cfg.run.eval_batches)
    if dist.is_main():
        write_accuracy(run.dir, epoch, acc, parts.model_cfg, parts.react)
        final = sum(acc[parts.react:]) / max(1, len(acc) - parts.react)
        run.metrics.write(kind="eval", epoch=epoch, step=step, accuracy_per_step=acc,
                          mean_accuracy_after_reaction=final)
        say(f"[eval] epoch {epoch}: accuracy at the last step {100 * acc[-1]:.2f}%, mean over "
            f"steps >= {parts.react}: {100 * final:.2f}%")
    return acc


# ----------------------------------------------------------------------------- comparison
def train_one(cfg, info, run_dir=None):
    """One run into run_dir (default <out_dir>/<name>); returns its summary (result.json)."""
    with Run(cfg, info, may_change=MAY_CHANGE, run_dir=run_dir, log=say) as run:
        parts = build(cfg, info)
        try:
            return train(cfg, run, parts)
        finally:
            parts.data.close()  # the loaders' workers stop with the run (see lib/loaders.py: close)


def run_compare(cfg, info):
    """The strategies of compare.runs back to back with the same seed and data, into <out_dir>/<name>/<variant>/;
    then compare.md, compare.csv and accuracy_per_step.png there. Finished variants are reused (lib/run.py,
    run_variants). Returns {name: summary} for one seed, {seed: {name: summary}} for several."""
    root = Path(cfg.run.out_dir) / cfg.run.name
    results, _ = run_variants(cfg, cfg.compare.runs or DEFAULT_COMPARE,
                              lambda vcfg, run_dir, reference: train_one(vcfg, info, run_dir),
                              MAY_CHANGE, seeds=cfg.compare.seeds, log=say,
                              warmup_steps=cfg.compare.warmup_steps if info.device.type == "cuda" else 0,
                              warmup_run={"eval_batches": 1})
    if dist.is_main():
        write_strategy_comparison(root, results, say=say)
    return results[next(iter(results))] if len(results) == 1 else results


# ----------------------------------------------------------------------------- main
def main(cfg):
    """Train and evaluate one DyRCNN run (or, with compare.enabled, each strategy of compare.runs); returns the
    summary written to result.json (a comparison: {name: summary}). Preempted: exit 0, rerun to resume."""
    info = dist.setup(cfg.run.seed, cfg.run.device)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a handful of fixed conv shapes: autotune once
    try:
        if cfg.compare.enabled:
            return run_compare(cfg, info)
        return train_one(cfg, info)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    run_script(main, Config(), __doc__, aliases={"--compare": "--compare.enabled=true"})
