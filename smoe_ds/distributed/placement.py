"""Where the experts live: which rank holds which experts, on which host, and which groups the
all-to-all (expert-parallel) and the expert-gradient all-reduce (expert-data-parallel) run over.

DeepSpeed forms expert-parallel groups from runs of ``ep_size`` consecutive ranks, and every
launcher numbers ranks node by node, so when ``ep_size`` divides the ranks per node the
all-to-all stays inside a node (fast links) and only the expert-data-parallel all-reduce
crosses nodes. The layout is read back from DeepSpeed's actual groups, not recomputed, and a
warning is printed when an expert-parallel group spans nodes although it could fit in one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from smoe_ds.distributed import process_group as D
from smoe_ds.moe.parallel import expert_data_parallel_group, expert_parallel_group


def gather_layout(ep_size: int, num_experts: int) -> dict:
    """The job's layout, the same dict on every rank (a collective: call on all ranks).

    Keys: hosts [world], experts_of_rank [world][N/ep_size], expert_parallel_groups and
    expert_data_parallel_groups (lists of rank lists), ep_size, world_size.
    """
    mine = {
        "host": os.uname().nodename,
        "ep": dist.get_process_group_ranks(expert_parallel_group(ep_size)),
        "edp": dist.get_process_group_ranks(expert_data_parallel_group(ep_size)),
    }
    everyone = D.all_gather_object(mine)
    n_local = num_experts // ep_size
    ep_rank = [m["ep"].index(r) for r, m in enumerate(everyone)]
    return {
        "world_size": D.world_size(),
        "ep_size": ep_size,
        "hosts": [m["host"] for m in everyone],
        "experts_of_rank": [list(range(e * n_local, (e + 1) * n_local)) for e in ep_rank],
        "expert_parallel_groups": sorted({tuple(m["ep"]) for m in everyone}),
        "expert_data_parallel_groups": sorted({tuple(m["edp"]) for m in everyone}),
    }


def spans_nodes_needlessly(layout: dict) -> list[tuple[int, ...]]:
    """Expert-parallel groups spread over several hosts although ep_size divides the ranks per host."""
    hosts = layout["hosts"]
    per_host = min(hosts.count(h) for h in set(hosts))
    if layout["ep_size"] > per_host or per_host % layout["ep_size"]:
        return []
    return [g for g in layout["expert_parallel_groups"] if len({hosts[r] for r in g}) > 1]


def describe(layout: dict) -> str:
    hosts = layout["hosts"]
    lines = [f"  expert placement (ep_size {layout['ep_size']}, {len(set(hosts))} host(s)):"]
    for r, experts in enumerate(layout["experts_of_rank"]):
        lines.append(f"    rank {r} on {hosts[r]}: experts {experts[0]}..{experts[-1]}")
    lines.append(f"    expert-parallel groups: {[list(g) for g in layout['expert_parallel_groups']]}")
    lines.append(f"    expert-gradient all-reduce groups: {[list(g) for g in layout['expert_data_parallel_groups']]}")
    for g in spans_nodes_needlessly(layout):
        lines.append(
            f"    warning: all-to-all group {list(g)} spans hosts {sorted({hosts[r] for r in g})}; "
            "launch with the same number of ranks on every node so that groups stay inside one"
        )
    return "\n".join(lines)


def write(layout: dict, out_dir: Path) -> None:
    serialisable = {k: [list(g) for g in v] if k.endswith("_groups") else v for k, v in layout.items()}
    (out_dir / "layout.json").write_text(json.dumps(serialisable, indent=2) + "\n")
