import os
import sys

import torch

# tests import the top-level scripts (model.py, loop.py, ...) from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the test models are tiny and overhead-bound: one thread is fastest, and two spin badly when the 2 cores are
# shared (~5-10x slower measured here)
torch.set_num_threads(1)
