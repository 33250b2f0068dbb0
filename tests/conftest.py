"""One intra-op thread per test process (OMP_NUM_THREADS overrides it).

The models in the tests are tiny, so extra threads only add synchronization; the two-process tests put two
ranks on two cores; and on a machine shared by several test suites, OpenMP's waiting threads made the bench
smoke tests about 7x slower (measured under a load of 8-11 on 2 cores: 390 s with 2 threads, 52 s with 1).
Child processes (mp.spawn, subprocess, DataLoader workers) inherit the setting through the environment.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tests.dist_env import TWO_RANK_JOBS, free_port, run_two_rank_jobs  # noqa: E402


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """The folder the two-rank jobs (tests/dist_env.py) wrote into; they run once per session, in one spawn."""
    out = tmp_path_factory.mktemp("two_ranks")
    ports = [free_port() for _ in TWO_RANK_JOBS]
    mp.spawn(run_two_rank_jobs, args=(2, ports, str(out)), nprocs=2, join=True)
    return out
