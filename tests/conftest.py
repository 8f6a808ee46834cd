"""Test-wide settings. The models here are tiny: one thread beats two on such tensors and
keeps timings steady on a 2-core machine shared with other work."""

import torch

torch.set_num_threads(1)
