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


def world_size():
    return torch_dist.get_world_size() if is_dist() else 1


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


def broadcast_object(obj, src=0):
    """Send a picklable python object from `src` to every rank (used for small control data)."""
    if not is_dist():
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=src)
    return holder[0]


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """Shuffled, rank-sharded indices that can start mid-epoch: set_epoch(epoch, start_index)."""

    def __init__(self, num_samples, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True):
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.start_index = 0, 0
        self.indices = None  # optional subset of dataset indices for this epoch

    def set_epoch(self, epoch, start_index=0, indices=None):
        """Choose the epoch (shuffle seed), skip this rank's first `start_index` samples, optional subset."""
        self.epoch, self.start_index = epoch, start_index
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long).cpu()

    def _rank_indices(self):
        pool = torch.arange(self.num_samples) if self.indices is None else self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            pool = pool[torch.randperm(len(pool), generator=g)]
        per_rank = len(pool) // self.world_size if self.drop_last else -(-len(pool) // self.world_size)
        if not self.drop_last and per_rank * self.world_size > len(pool):
            pad = per_rank * self.world_size - len(pool)
            pool = torch.cat([pool, pool[:pad]])  # pad by repeating, as DistributedSampler does
        return pool[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self):
        return iter(self._rank_indices()[self.start_index:].tolist())

    def __len__(self):
        return max(0, len(self._rank_indices()) - self.start_index)
