"""Shared test settings. The tiny models gain nothing from several threads, and OpenMP
spin-waiting makes torch many times slower when the 2 cores are shared (pytest plus the
torchrun workers some tests start), so every test process runs single-threaded."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # also inherited by subprocesses (torchrun, train.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's top-level modules

import torch  # noqa: E402

torch.set_num_threads(1)
