"""Layer benchmark: our SMoE-Dropout layer vs DeepSpeed's stock MoE vs a dense FFN.

    python -m smoe_ds.bench.layer                      # shapes A and B, k = 1, 2, 4, ..., N, plus 2-rank EP
    python -m smoe_ds.bench.layer --d-model 2048 --experts 16 --d-expert 512 --tokens 16384 \\
        --dtype bfloat16 --device cuda

Every figure is forward plus backward with the same weights and the same k, timed in one run
and reported as a multiple of the dense FFN with equal total parameters (N x d_expert wide),
because only ratios measured side by side survive a noisy machine. The stock layer runs
dropless. Outputs of ours and the stock layer are compared as a check. The expert-parallel
part spawns 2 ranks (gloo on CPU) and reports time and bytes sent per token for both layers.
Prints a table and writes JSON (``--out``, default bench_results.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = {
    "A": {"name": "paper", "d_model": 256, "experts": 16, "d_expert": 512, "tokens": 2048},
    "B": {"name": "many small experts", "d_model": 256, "experts": 16, "d_expert": 64, "tokens": 4096},
}


@dataclass
class Layers:
    ours: torch.nn.Module
    stock: torch.nn.Module
    dense: torch.nn.Module


def ks_for(n: int) -> list[int]:
    return [1 << i for i in range(n.bit_length()) if (1 << i) <= n]


def build_layers(d: int, n: int, h: int, ep_size: int, device, dtype, ep_rank: int = 0) -> Layers:
    """Our layer, DeepSpeed's stock MoE and a dense FFN, holding the same weights."""
    from deepspeed.moe.layer import MoE

    from smoe_ds.config.schema import MoEConfig
    from smoe_ds.moe.experts import FeedForward
    from smoe_ds.moe.layer import SMoEDropoutMoE

    # the tokens travel, as in DeepSpeed's layer; the expert-parallel part also times the weights exchange
    cfg = MoEConfig(num_experts=n, d_expert=h, ep_size=ep_size, ep_exchange="tokens")
    cfg.k_schedule.k_max = n
    ours = SMoEDropoutMoE(d, cfg, layer_index=0)
    # top2_2nd_expert_sampling off: plain top-k like ours (k = 1 still differs: DeepSpeed weights the
    # single expert by its full-softmax probability, SMoE-Dropout by 1).
    stock = MoE(
        d, FeedForward(d, h), num_experts=n, ep_size=ep_size, k=1, drop_tokens=False, top2_2nd_expert_sampling=False
    )
    dense = FeedForward(d, n * h)
    gen = torch.Generator().manual_seed(0)
    full_in, full_out = torch.randn(n, h, d, generator=gen) * 0.05, torch.randn(n, h, d, generator=gen) * 0.05
    e_local = n // ep_size
    mine = slice(ep_rank * e_local, (ep_rank + 1) * e_local)
    with torch.no_grad():
        ours.deepspeed_moe.experts.w_in.copy_(full_in[mine])
        ours.deepspeed_moe.experts.w_out.copy_(full_out[mine])
        stock.deepspeed_moe.gate.wg.weight.copy_(ours.deepspeed_moe.gate.wg.weight)
        for i, e in enumerate(stock.deepspeed_moe.experts.deepspeed_experts):
            e.w_in.weight.copy_(full_in[mine][i])
            e.w_out.weight.copy_(full_out[mine][i].t())
        dense.w_in.weight.copy_(full_in.reshape(n * h, d))
        dense.w_out.weight.copy_(full_out.reshape(n * h, d).t())
    return Layers(*(m.to(device=device, dtype=dtype) for m in (ours, stock, dense)))


def set_k(layers: Layers, k: int) -> None:
    layers.ours.deepspeed_moe.gate.k = k
    layers.stock.deepspeed_moe.gate.k = k


def fwd_bwd(layer, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad)
    return out


def time_once(layer, x, grad, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fwd_bwd(layer, x, grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


ROUNDS = 3  # each layer's timed calls come in this many blocks, the layers taking turns


def time_in_rounds(layers: Layers, x, grad, device, repeats: int) -> dict[str, float]:
    """Median seconds of each layer over ``repeats`` timed calls.

    The calls come in blocks of consecutive calls of one layer, each block after one untimed
    call, and the layers take turns block by block, so that slow drifts of the machine hit
    them alike. Blocks rather than single calls in turn, because in training a layer follows
    itself: its allocations find the heap as its own previous step left it. Timed one call
    each in turn, a layer instead inherits the heap the stock layer's 64 MiB+ buffers leave
    behind, and pays page faults it never sees in training (docs/performance.md, "Measurements
    behind the code's choices").
    """
    per_block = max(1, -(-repeats // ROUNDS))
    samples: dict[str, list[float]] = {"ours": [], "stock": [], "dense": []}
    for _ in range(ROUNDS):
        for name, kept in samples.items():
            layer = getattr(layers, name)
            time_once(layer, x, grad, device)  # untimed: this layer's heap and caches, not the last one's
            kept.extend(time_once(layer, x, grad, device) for _ in range(per_block))
    return {name: statistics.median(ts) for name, ts in samples.items()}


@contextlib.contextmanager
def forced_path(layer, path: str):
    """Our layer with its experts held to one compute path ("dense" or "sparse"), whatever the density."""
    experts = layer.deepspeed_moe.experts
    experts.forward = getattr(experts, f"forward_{path}")  # an instance attribute shadows the method
    try:
        yield layer
    finally:
        del experts.forward


def time_each_path(layer, x, grad, device, repeats: int) -> dict[str, float]:
    """Median seconds of our layer with each compute path forced, one untimed call first."""
    times = {}
    for path in ("dense", "sparse"):
        with forced_path(layer, path):
            time_once(layer, x, grad, device)
            times[path] = statistics.median(time_once(layer, x, grad, device) for _ in range(repeats))
    return times


def profile_table(layer, x, grad, device, rows: int = 15) -> str:
    """torch.profiler's table of our layer's forward + backward, 5 calls, by self time on the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fwd_bwd(layer, x, grad)
    with profile(activities=activities) as prof:
        for _ in range(5):
            fwd_bwd(layer, x, grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def bench_shape(
    label: str,
    d: int,
    n: int,
    h: int,
    tokens: int,
    dtype,
    device,
    repeats: int,
    each_path: bool = False,
    profile: bool = False,
) -> dict:
    """Every k of one shape: ours, stock and dense timed side by side (and, with ``each_path``,
    ours with each compute path forced; with ``profile``, the profiler's table at k = 1 and N)."""
    torch.manual_seed(0)
    layers = build_layers(d, n, h, 1, device, dtype)
    x = torch.randn(1, tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, tokens, d, device=device, dtype=dtype)
    rows = []
    for k in ks_for(n):
        set_k(layers, k)
        with torch.no_grad():
            diff = float((layers.ours(x)[0] - layers.stock(x)[0]).abs().max())
        t = time_in_rounds(layers, x, grad, device, repeats)
        rows.append(
            {
                "k": k,
                "ours_vs_dense": t["ours"] / t["dense"],
                "stock_vs_dense": t["stock"] / t["dense"],
                "speedup_vs_stock": t["stock"] / t["ours"],
                "ideal": k / n,
                "ours_s": t["ours"],
                "stock_s": t["stock"],
                "dense_s": t["dense"],
                "max_abs_diff_vs_stock": diff,
            }
        )
        if each_path:
            paths = time_each_path(layers.ours, x, grad, device, repeats)
            rows[-1].update({f"ours_{p}_path_vs_dense": paths[p] / t["dense"] for p in paths})
        if profile and k in (1, n):
            print(f"profile of ours at k = {k} (d_model {d}, {n} x {h}, {tokens} tokens):")
            print(profile_table(layers.ours, x, grad, device), flush=True)
    return {"shape": label, "d_model": d, "experts": n, "d_expert": h, "tokens": tokens, "rows": rows}


# -- expert parallel (spawned ranks) ------------------------------------------------------


def _ep_worker(rank: int, world: int, port: int, spec: dict, queue) -> None:
    from smoe_ds.distributed.process_group import init_distributed, shutdown
    from smoe_ds.moe.dispatch import tokens_bytes_sent, weights_bytes_sent

    os.environ.update(
        DS_ACCELERATOR="cpu",  # gloo CPU ranks even on a GPU host, where DeepSpeed would pick NCCL
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    init_distributed(port)  # as the trainer joins: gloo on CPU, DeepSpeed's shm allreduce kept off
    d, n, h, tokens = spec["d_model"], spec["experts"], spec["d_expert"], spec["tokens"] // world
    dtype = getattr(torch, spec["dtype"])
    layers = build_layers(d, n, h, world, torch.device("cpu"), dtype, ep_rank=rank)
    for moe in (layers.ours, layers.stock):  # both are deepspeed MoE layers
        moe.set_deepspeed_parallelism()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(1, tokens, d, generator=gen, dtype=torch.float32).to(dtype).requires_grad_(True)
    grad = torch.randn(1, tokens, d, generator=gen).to(dtype)
    elem = torch.finfo(dtype).bits // 8
    rows = []
    dispatcher = layers.ours.deepspeed_moe
    # variant -> (layer, moe.ep_exchange of ours): our layer moving weights, moving tokens, and DeepSpeed's.
    # The token run comes after the weights run, so our layer's last plan is the token exchange's.
    variants = {"weights": (layers.ours, "weights"), "ours": (layers.ours, "tokens"), "stock": (layers.stock, None)}
    for k in ks_for(n):
        set_k(layers, k)
        times = {name: [] for name in variants}
        for rep in range(spec["repeats"] + 1):
            for name, (layer, exchange) in variants.items():
                if exchange:
                    dispatcher.ep_exchange = exchange
                dist.barrier()
                t = time_once(layer, x, grad, torch.device("cpu"))
                if rep:
                    times[name].append(t)
        ours_bytes = tokens_bytes_sent(dispatcher.last_plan, d, elem, rank)
        weights_bytes = weights_bytes_sent(dispatcher.experts._stacked(), world)
        # The stock layer ships its whole [N, C, D] buffer both ways; (P-1)/P of it leaves the rank.
        capacity = int(layers.stock.deepspeed_moe.exp_counts.max())
        cap = torch.tensor([capacity])
        dist.all_reduce(cap, op=dist.ReduceOp.MAX)
        stock_bytes = 2 * (world - 1) / world * n * int(cap) * d * elem
        medians = [statistics.median(times[name]) for name in ("ours", "weights", "stock")]
        t = torch.tensor([*medians, ours_bytes, weights_bytes, stock_bytes], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append(
            {
                "k": k,
                "ours_s": float(t[0]),
                "weights_s": float(t[1]),
                "stock_s": float(t[2]),
                "speedup_vs_stock": float(t[2] / t[0]),
                "weights_speedup_vs_stock": float(t[2] / t[1]),
                "ours_bytes_per_token": float(t[3]) / tokens,
                "weights_bytes_per_token": float(t[4]) / tokens,
                "stock_bytes_per_token": float(t[5]) / tokens,
            }
        )
    if rank == 0:
        queue.put(rows)
    shutdown()


def bench_expert_parallel(spec: dict, world: int = 2) -> dict:
    from smoe_ds.distributed.process_group import free_port
    from smoe_ds.ops.prebuild import prebuild

    prebuild()  # compile DeepSpeed's CPU op here, once, rather than racing in every spawned rank
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ep_worker, args=(r, world, port, spec, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=1800)
    for p in procs:
        p.join()
    return {**{k: v for k, v in spec.items() if k != "repeats"}, "ep_size": world, "rows": rows}


# -- reporting -----------------------------------------------------------------------------


def format_shape(result: dict) -> str:
    head = (
        f"shape {result['shape']}: d_model {result['d_model']}, {result['experts']} experts x {result['d_expert']}, "
        f"{result['tokens']} tokens (fwd+bwd time / dense FFN of equal parameters)"
    )
    paths = "ours_dense_path_vs_dense" in result["rows"][0]
    extra = f" {'dense path':>11} {'sparse path':>12}" if paths else ""
    lines = [head, f"{'k':>4} {'ideal':>7} {'ours':>7} {'stock':>7} {'stock/ours':>11} {'|ours-stock|':>13}{extra}"]
    for r in result["rows"]:
        extra = f" {r['ours_dense_path_vs_dense']:>11.3f} {r['ours_sparse_path_vs_dense']:>12.3f}" if paths else ""
        lines.append(
            f"{r['k']:>4} {r['ideal']:>7.3f} {r['ours_vs_dense']:>7.3f} {r['stock_vs_dense']:>7.3f} "
            f"{r['speedup_vs_stock']:>10.2f}x {r['max_abs_diff_vs_stock']:>13.2e}{extra}"
        )
    return "\n".join(lines)


def format_ep(result: dict) -> str:
    lines = [
        f"expert parallel, {result['ep_size']} ranks (gloo, 1 thread each): d_model {result['d_model']}, "
        f"{result['experts']} experts x {result['d_expert']}, {result['tokens']} tokens in all",
        "ours: moving tokens; weights: ours moving the experts instead (moe.ep_exchange); B/tok: bytes one"
        " rank sends per token of its own, forward",
        f"{'k':>4} {'ours ms':>9} {'weights ms':>11} {'stock ms':>9} {'stock/ours':>11} {'stock/weights':>14}"
        f" {'ours B/tok':>11} {'weights B/tok':>14} {'stock B/tok':>12}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['k']:>4} {r['ours_s'] * 1e3:>9.1f} {r['weights_s'] * 1e3:>11.1f} {r['stock_s'] * 1e3:>9.1f}"
            f" {r['speedup_vs_stock']:>10.2f}x {r['weights_speedup_vs_stock']:>13.2f}x"
            f" {r['ours_bytes_per_token']:>11.0f} {r['weights_bytes_per_token']:>14.0f}"
            f" {r['stock_bytes_per_token']:>12.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smoe-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, help="custom shape (with --experts, --d-expert, --tokens)")
    p.add_argument("--experts", type=int)
    p.add_argument("--d-expert", type=int)
    p.add_argument("--tokens", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all cores)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per layer and k (median is kept)")
    p.add_argument("--no-ep", action="store_true", help="skip the 2-rank expert-parallel part")
    p.add_argument("--each-path", action="store_true", help="also time ours with each compute path forced")
    p.add_argument("--profile", action="store_true", help="print the profiler's table of ours at k = 1 and N")
    p.add_argument("--out", default="bench_results.json")
    args = p.parse_args(argv)

    custom = [args.d_model, args.experts, args.d_expert, args.tokens]
    if any(v is not None for v in custom) and not all(v is not None for v in custom):
        p.error("a custom shape needs all of --d-model, --experts, --d-expert and --tokens")
    if args.experts is not None and args.experts & (args.experts - 1):
        p.error("--experts must be a power of two (k runs over 1, 2, 4, ..., N)")
    shapes = (
        {"custom": {"d_model": args.d_model, "experts": args.experts, "d_expert": args.d_expert, "tokens": args.tokens}}
        if args.d_model
        else SHAPES
    )
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "shapes": []}
    # glibc's allocator settings change CPU timings a lot (see README, Performance): record them.
    results["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    for label, s in shapes.items():
        dims = (s["d_model"], s["experts"], s["d_expert"], s["tokens"])
        r = bench_shape(label, *dims, dtype, device, args.repeats, args.each_path, args.profile)
        results["shapes"].append(r)
        print(format_shape(r) + "\n", flush=True)
    if not args.no_ep and device.type == "cpu":
        first = next(iter(shapes.values()))
        spec = {**first, "dtype": args.dtype, "repeats": max(3, args.repeats // 2)}
        results["expert_parallel"] = bench_expert_parallel(spec)
        print(format_ep(results["expert_parallel"]) + "\n", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
