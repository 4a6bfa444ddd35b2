import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tiny networks run fastest on one thread (two threads on two shared cores were up to 300x slower per tiny conv);
# subprocesses (CLI runs, torchrun) inherit the same setting through the environment.
os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> str:
    """Absolute path of the repository (scripts like train.py live here)."""
    return ROOT
