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
