"""Shared test helpers: the environment torchrun would give one rank, on loopback only; the two-rank jobs."""
import importlib
import os
import socket

# every job the suite runs on two gloo ranks, as "module:function(rank, world, out_dir)"; they run one after
# another in ONE mp.spawn (tests/conftest.py: two_ranks): starting two processes costs more than the jobs
# (a job creates one process group: a second one on the same rendezvous port can hang)
TWO_RANK_JOBS = ("tests.test_loop:ddp_job", "tests.test_ddp:ast_batch_job", "tests.test_ddp:ast_epoch_job",
                 "tests.test_ddp:dynvision_eval_job", "tests.test_ddp:ast_eval_job",
                 "tests.test_encode:two_rank_job", "tests.test_encode:two_rank_cache_job")


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_env(rank, world, port):
    """Set what torchrun sets for a rank; gloo is pinned to the loopback interface."""
    os.environ.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))


def run_two_rank_jobs(rank, world, ports, out_dir):
    """mp.spawn target: each job of TWO_RANK_JOBS with its own rendezvous port (each creates its process group)."""
    for job, port in zip(TWO_RANK_JOBS, ports):
        module, name = job.split(":")
        set_rank_env(rank, world, port)
        getattr(importlib.import_module(module), name)(rank, world, out_dir)
