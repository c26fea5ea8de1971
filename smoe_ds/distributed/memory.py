"""What each rank holds of the model state, read from the engine's own tensors.

- ``parameters``: this rank's storage of the weights: whole tensors, this rank's experts only under
  expert parallelism, and only its partition (``ds_tensor``) of each weight under ZeRO-3;
- ``master_weights``: the optimizer's fp32 copies (ZeRO-1/2/3 keep their partition of them; plain
  fp32 training updates the weights themselves and keeps none);
- ``optimizer_moments``: Adam's exp_avg and exp_avg_sq on this rank, and where they live
  (``optimizer_device``: "cpu" when ``offload_optimizer`` moved them there);
- ``peak_rss``: the process's peak resident memory, which includes Python, torch and the
  activations (on a CPU, offloaded optimizer state is in the same memory as everything else).

Gradient buffers are not listed: they exist only between backward and step (ZeRO-2/3 keep this
rank's partition, ZeRO-0/1 whole gradients); the README gives their size by formula.
"""

from __future__ import annotations

import resource

import torch

from smoe_ds.distributed import process_group as D


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def held_by_this_rank(engine) -> dict:
    """This rank's model-state bytes by kind (see the module docstring) and its peak RSS."""
    module = engine.module
    weights = sum(_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _bytes(p) for p in module.parameters())
    basic = getattr(engine, "basic_optimizer", None)
    own = {id(p) for p in module.parameters()}
    master, moments, device = 0, 0, "none"
    if basic is not None:
        master = sum(_bytes(t) for t in _master_copies(engine.optimizer, basic) if id(t) not in own)
        states = [t for s in basic.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        moments = sum(_bytes(t) for t in states)
        device = states[0].device.type if states else "none"
    return {
        "parameters": weights,
        "master_weights": master,
        "optimizer_moments": moments,
        "optimizer_device": device,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
    }


# Where DeepSpeed's ZeRO optimizers keep this rank's fp32 master partitions: stage 3 hands them to
# the inner optimizer only for the length of its step, so its param groups are empty in between.
MASTER_ATTRIBUTES = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


def _master_copies(optimizer, basic) -> list[torch.Tensor]:
    for name in MASTER_ATTRIBUTES:
        found = getattr(optimizer, name, None)
        if found:
            return [t for t in found if torch.is_tensor(t)]
    return [p for g in basic.param_groups for p in g["params"]]


def per_rank(engine) -> list[dict]:
    """``held_by_this_rank`` of every rank, in rank order (a collective: every rank calls it)."""
    return D.all_gather_object(held_by_this_rank(engine))
