"""Distributed helpers: torchrun environment -> process group, device, seeds; rank-0 gating.

Launch with `torchrun --nproc_per_node=N script.py ...`; a plain `python script.py` is world size 1.
"""
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def _pick_device(device, local_rank):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible; use --run.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(seed=0, device="auto"):
    """Init from torchrun's environment (nccl on GPU, gloo on CPU), pick this rank's device, seed seed+rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    distributed = world_size > 1
    if distributed and not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        torch_dist.init_process_group(backend=backend, **kwargs)
    seed_everything(seed + rank)
    return DistInfo(rank, world_size, local_rank, dev, distributed)


def cleanup():
    """Destroy the process group if one was created."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def is_dist():
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank():
    return torch_dist.get_rank() if is_dist() else 0




def is_main():
    """True on rank 0 (and in single-process runs): the only rank that prints and writes shared files."""
    return rank() == 0


def barrier():
    if is_dist():
        torch_dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op on one process); returns it."""
    if is_dist():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor):
    """Average a float tensor over ranks in place (no-op on one process); returns it."""
    if is_dist():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        tensor /= torch_dist.get_world_size()
    return tensor


class UniqueSampleSum:
    """Per-sample results summed over distinct sample indices across ranks: padded duplicates count once.

    Test shards wrap around to give every rank the same number of batches (shard_positions(pad=True)), so a plain
    sum over ranks counts a few samples twice. Each rank adds (index, value) pairs into a buffer of the split's
    size; `total()` all-reduces it (a collective) and averages a sample seen more than once, so N ranks report
    what one process would. Memory: num_samples x the value's size, on the values' device.
    """

    def __init__(self, num_samples, shape=(), device="cpu"):
        self.sums = torch.zeros(num_samples, *shape, device=device, dtype=torch.float64)
        self.counts = torch.zeros(num_samples, device=device, dtype=torch.float64)

    def add(self, index, values):
        """index (B,) dataset indices of the split; values (B, *shape) this rank's results for them."""
        index = index.to(self.sums.device)
        self.sums.index_add_(0, index, values.to(self.sums))
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=self.counts.dtype))

    def total(self):
        """(sum over distinct samples (*shape) float64, number of distinct samples); every rank gets the same."""
        all_reduce_sum(self.sums)
        all_reduce_sum(self.counts)
        seen = self.counts > 0
        per_sample = self.sums[seen] / self.counts[seen].view(-1, *[1] * (self.sums.dim() - 1))
        return per_sample.sum(0), int(seen.sum())


def shard_positions(n, rank, world_size, pad):
    """Positions of this rank's interleaved share of an epoch's n-sample order, equal counts on every rank.

    Interleaving (rank, rank + W, ...) makes each global batch of B x W samples the same set a single
    process would see in its batch of B x W, so 1 and N GPUs train on the same global batches. The
    remainder is dropped (training) or padded by wrapping around (evaluation). Resuming mid-epoch is the
    loaders' start_batch: the order is a function of (seed, epoch), so skipping batches needs no state.
    """
    if world_size == 1:
        return torch.arange(n)
    if pad:
        keep = torch.arange(-(-n // world_size) * world_size) % max(n, 1)
    else:
        keep = torch.arange(n // world_size * world_size)
    return keep[rank::world_size]
