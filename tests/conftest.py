"""Shared pytest fixtures."""

import torch

# CI and dev machines have 2 cores; fixed thread counts keep timings and numerics stable.
torch.set_num_threads(2)
