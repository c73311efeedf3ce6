"""RNG states of a run (torch, CUDA, python, numpy, named torch.Generators), saved with a
checkpoint and restored on resume so that sampling continues exactly."""

import random

import numpy as np
import torch

from packrl.checkpointing.layout import CheckpointError


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    saved = state["generators"]
    if set(saved) != set(generators):
        raise CheckpointError(
            f"the checkpoint has generator states for {sorted(saved)} but generators= "
            f"{sorted(generators)} was passed; pass the same names as at save time"
        )
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    for k, g in generators.items():
        g.set_state(saved[k])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
