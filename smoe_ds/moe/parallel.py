"""Expert parallelism in one place: group names, DeepSpeed's groups, and which experts a rank holds.

DeepSpeed forms expert-parallel groups from runs of ``ep_size`` consecutive ranks and names them
``ep_size_{ep_size}``; the expert-data-parallel groups (ranks holding the same experts) are the
strided ones. With N experts and ep_size E, rank r is expert-parallel rank r mod E and holds the
global experts [(r mod E) * N/E, (r mod E + 1) * N/E).

DeepSpeed exposes its groups only through private accessors (``groups._get_expert_parallel_*``);
this module is the one place that calls them, so a DeepSpeed upgrade that renames them is a
one-file change.
"""

from __future__ import annotations


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed gives the expert-parallel process groups of this ep_size."""
    return f"ep_size_{ep_size}"


def ep_rank_of(rank: int, ep_size: int) -> int:
    """The expert-parallel rank of global ``rank``: its place inside its run of ``ep_size`` ranks."""
    return rank % ep_size


def local_experts(ep_rank: int, ep_size: int, num_experts: int) -> range:
    """The global expert ids held by expert-parallel rank ``ep_rank``."""
    n_local = num_experts // ep_size
    return range(ep_rank * n_local, (ep_rank + 1) * n_local)


def expert_parallel_group(ep_size: int):
    """This rank's expert-parallel process group (the all-to-all's), as DeepSpeed made it."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(expert_group_name(ep_size))


def expert_data_parallel_group(ep_size: int):
    """This rank's expert-data-parallel group (the expert-gradient all-reduce's)."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(expert_group_name(ep_size))


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's expert-parallel rank as DeepSpeed's groups say (to check ``ep_rank_of`` against)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(expert_group_name(ep_size))


def create_expert_groups(ep_size: int) -> None:
    """Make DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep_size`` (a collective;
    once per ep_size). Its MoE layers do this inside ``deepspeed.initialize``; layers that are not
    DeepSpeed ``MoE`` instances (ZeRO-3, ``smoe_ds.distributed.zero3``) need it before."""
    from deepspeed.utils import groups

    if expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
