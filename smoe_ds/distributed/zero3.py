"""ZeRO-3 with SMoE-Dropout layers: every weight partitioned, experts over their expert-data-parallel group.

DeepSpeed 0.19.8 refuses its own ``MoE`` layers under ZeRO-3 (``runtime/engine.py``,
``_validate_zero3_moe_compatibility``), but partitions any parameter tagged
``ds_zero_placement_family="autoep_expert"`` over the process group in its
``ds_zero_partition_process_group`` (``zero/partition_parameters.py``, where the partition group
is read), which is how its AutoEP layers get expert-parallel ZeRO-3. So under ZeRO-3 the SMoE-Dropout
FFN is built as the plain ``SMoEDropoutFFN`` (not an ``MoE``), and ``prepare_model`` does what the
engine would do for AutoEP layers: make the expert groups, hand the dispatcher its all-to-all group
and tag every expert parameter. Non-expert parameters (frozen routers included) are partitioned
over all ranks; the N/ep_size experts of expert-parallel rank e over the ranks holding them.

Checkpoints: DeepSpeed writes one ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` per rank with
empty tensors in place of partitioned weights, plus the optimizer shards; that is what an exact
resume reads. ``write_full_weights`` adds the files every other smoe-ds reader uses (the model
file with all non-expert weights, one file per global expert), gathered from the partitions, so
``smoe_ds.convert``, export and resuming at another layout or stage work as for ZeRO-0/1/2. Where
training runs in bf16/fp16 those files hold the fp32 master weights, which is what an export
from ZeRO-1/2 takes from their shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from smoe_ds.distributed import process_group as D
from smoe_ds.moe.experts import split_stacked, stack_experts
from smoe_ds.moe.layer import is_moe, moe_layers
from smoe_ds.moe.parallel import (
    create_expert_groups,
    expert_data_parallel_group,
    expert_group_name,
    expert_parallel_group,
)


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in moe_layers(model) for p in layer.deepspeed_moe.experts.parameters()]


def prepare_model(model: nn.Module, ep_size: int) -> None:
    """Ready a model built with plain ``SMoEDropoutFFN`` layers for ``deepspeed.initialize`` at ZeRO-3.

    Creates DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep_size`` (on every
    rank, before the engine), gives each dispatcher its all-to-all group, and tags each expert
    parameter so that ZeRO-3 partitions it over this rank's expert-data-parallel group. The experts
    keep their stacked state-dict layout: DeepSpeed's per-rank model files hold partitioned (empty)
    tensors, which the per-expert split could not take apart.
    """
    layers = list(moe_layers(model))
    if not layers:
        return
    create_expert_groups(ep_size)
    a2a, edp = expert_parallel_group(ep_size), expert_data_parallel_group(ep_size)
    for layer in layers:
        layer.deepspeed_moe._set_ep_group(a2a)
        layer.deepspeed_moe.experts.use_stacked_state_dict()
    for p in expert_params(model):
        p.ds_zero_placement_family = "autoep_expert"
        p.ds_zero_partition_group_name = expert_group_name(ep_size)
        p.ds_zero_partition_process_group = edp


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def partition_share(p: nn.Parameter) -> dict:
    """What ZeRO-3 gave this rank of ``p``: full size, this rank's slice, the group it is split over."""
    group = p.ds_process_group
    return {
        "numel": p.ds_numel,
        "local_numel": p.ds_tensor.ds_numel,
        "group_ranks": torch.distributed.get_process_group_ranks(group),
    }


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block, ZeRO-3-partitioned ``params`` hold their full values on every rank of their
    group (a collective: every rank enters with the same structure); others are left alone."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Only those not already whole: small parameters below ZeRO-3's persistence threshold (the
    # routers) stay gathered for good, and GatheredParameters would release them on exit, which
    # breaks the engine's recorded fetch order at the next step.
    partitioned = [p for p in params if is_partitioned(p) and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not partitioned:
        yield
        return
    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def gathered_module(module: nn.Module) -> contextlib.AbstractContextManager:
    """``gathered`` over every parameter of ``module`` (exports: the whole model, briefly, on each rank)."""
    return gathered(list(module.parameters()))


def _local_slice(p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full value of ``p``: ranks split the flattened tensor, padded
    to a multiple of the group size, in rank order (DeepSpeed's ``_partition_param``)."""
    n = p.ds_tensor.ds_numel
    start = n * torch.distributed.get_rank(group=p.ds_process_group)
    flat = full.reshape(-1).to(p.ds_tensor.dtype)
    part = flat[start : start + n]
    return torch.cat([part, part.new_zeros(n - part.numel())]) if part.numel() < n else part


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor], ep_rank: int) -> None:
    """Copy a whole model's weights (``smoe_ds.checkpoint.read_model``'s layout: experts per expert,
    global ids) into this rank's partitions, or into plain parameters where there are none.

    No collective: every rank reads the same full state and keeps its own slice. Callers refresh the
    optimizer's fp32 master copies afterwards.
    """
    expert_names = {id(p) for p in expert_params(model)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in expert_names:
                first = ep_rank * p.ds_shape[0] if is_partitioned(p) else ep_rank * p.shape[0]
                n_local = p.ds_shape[0] if is_partitioned(p) else p.shape[0]
                full = stack_experts(state, name, range(first, first + n_local))
            else:
                full = state[name]
            if is_partitioned(p):
                p.ds_tensor.data.copy_(_local_slice(p, full))
                # After a forward, small parameters (ZeRO-3's persistence threshold) stay whole on every
                # rank and are not gathered again: keep that copy in step too. (Before the first forward,
                # where the trainer restores, every parameter is still partitioned only.)
                if p.data.numel() == p.ds_numel:
                    p.data.copy_(full.reshape(p.ds_shape).to(p.dtype))
            else:
                p.data.copy_(full.to(p.dtype))


def write_full_weights(model: nn.Module, tag_dir: Path, ep_rank: int, extra: dict) -> None:
    """Write the model file (non-expert weights under ``module``, plus ``extra``) and one file per
    global expert into ``tag_dir``, gathered from the ZeRO-3 partitions (a collective).

    One parameter at a time, so no rank holds more than one full weight beyond what it writes:
    rank 0 keeps the non-expert weights, and the first rank of each expert-data-parallel group
    the experts of its expert-parallel rank.
    """
    from smoe_ds.checkpoint.files import MODEL_FILE, expert_file

    expert_ids = {id(p) for p in expert_params(model)}
    module_state = {}
    # The state dict's entries, not named_parameters(): tied weights (the LM head) under each of
    # their names, and persistent buffers, as the other stages' model file has them.
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in expert_ids:
            value = whole_value(t)
            if D.is_main():
                module_state[name] = value
    if D.is_main():
        torch.save({"module": module_state, **extra}, tag_dir / MODEL_FILE)
    for layer_index, (prefix, layer) in enumerate(_named_moe_layers(model)):
        writes = D.rank() == min(torch.distributed.get_process_group_ranks(expert_data_parallel_group(layer.ep_size)))
        per_expert: dict[int, dict[str, torch.Tensor]] = {}
        for pname, p in layer.deepspeed_moe.experts.named_parameters():
            value = whole_value(p)
            if writes:
                first = ep_rank * value.shape[0]
                name = f"{prefix}.deepspeed_moe.experts.{pname}"
                for e in range(value.shape[0]):  # one expert at a time, to file it under its global id
                    per_expert.setdefault(first + e, {}).update(split_stacked(name, value[e : e + 1], first + e))
        for expert, state in per_expert.items():
            torch.save(state, tag_dir / expert_file(layer_index, expert))


def whole_value(t: torch.Tensor) -> torch.Tensor:
    """A whole copy of ``t`` on this rank (a collective over its partition group when partitioned):
    the optimizer's fp32 master of a trainable weight when training runs in bf16/fp16, as exports
    from ZeRO-1/2 take it from their shards; the weight itself otherwise (fp32, frozen, buffers)."""
    if isinstance(t, nn.Parameter) and is_partitioned(t) and t.requires_grad and t.dtype != torch.float32:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(t).detach().clone()
    with gathered([t] if isinstance(t, nn.Parameter) else []):
        return t.detach().clone()


def _named_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MoE layers with their names, in the order DeepSpeed numbers them in expert file names."""
    return [(name, m) for name, m in model.named_modules() if is_moe(m)]
