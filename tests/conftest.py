import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest runs with -n 2 (one worker per core): one intra-op thread per worker avoids oversubscription,
# which made tiny-model tests up to ~10x slower on a loaded 2-core machine.
torch.set_num_threads(1)
