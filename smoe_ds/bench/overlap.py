"""Can an all-to-all hide behind compute on this machine? Two spawned CPU ranks, one thread each.

    python -m smoe_ds.bench.overlap [--tokens 1024] [--columns 132] [--compute-ms 3] [--iters 200] [--out DIR]

Each rank holds a [2 x tokens, columns] fp32 payload (the default is the README's default job's
full-route dispatch at one layer: 1024 tokens, d_model 128 plus 4 gates, to 2 ranks) and times,
per iteration, the mean over ``--iters``:
- ``all_to_all``: the exchange alone (between idle ranks: its cost without waiting for a peer);
- ``compute``: a matmul loop of about ``--compute-ms`` alone;
- ``in turn``: the exchange, then the compute (what the dispatcher does);
- ``overlapped``: the exchange started asynchronously, the compute, then the wait;
- ``all_gather + reduce_scatter``: the full-route alternative's pair on the same bytes.
Overlap pays only if ``overlapped`` is clearly below ``in turn``. Prints a table and writes
``DIR/bench_overlap.json``. The gloo collectives run in the same way as the trainer's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODES = ("all_to_all", "compute", "in turn", "overlapped", "all_gather + reduce_scatter")


def _timed_ms(step, iters: int) -> float:
    dist.barrier()
    started = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - started) / iters * 1000.0


def one_thread_rank(rank: int, world: int, port: int) -> None:
    """Set up a spawned rank: the environment torch.distributed and DeepSpeed read, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)


def interleaved_best_ms(steps: dict, iters: int, rounds: int) -> dict[str, float]:
    """Time each of ``steps`` (name -> callable) for ``iters`` calls, in ``rounds`` that interleave
    them so that drift hits all alike, after a warm-up -> ms per call: each rank's best round, the
    slower rank's (a step costs what its slowest rank takes). Every rank must call it."""
    for step in steps.values():  # warm-up
        _timed_ms(step, 10)
    rows = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            rows[name].append(_timed_ms(step, iters))
    times = torch.tensor([min(rows[name]) for name in steps])
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return {name: float(t) for name, t in zip(steps, times)}


def _worker(rank: int, world: int, port: int, args: dict, queue) -> None:
    one_thread_rank(rank, world, port)
    dist.init_process_group("gloo")
    payload = torch.randn(world * args["tokens"], args["columns"])
    received = torch.empty_like(payload)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    calibrate = _timed_ms(lambda: a @ b, 50)
    matmuls = max(1, round(args["compute_ms"] / calibrate))

    def compute():
        for _ in range(matmuls):
            a @ b

    def overlapped():
        work = dist.all_to_all_single(received, payload, async_op=True)
        compute()
        work.wait()

    # the same bytes to the peer as the all-to-all: this rank's tokens out, a block of results back
    mine = payload[: args["tokens"]]
    gathered, scattered = torch.empty(world * args["tokens"], args["columns"]), torch.empty_like(mine)

    def gather_scatter():
        dist.all_gather_into_tensor(gathered, mine)
        dist.reduce_scatter_tensor(scattered, gathered)

    steps = {
        "all_to_all": lambda: dist.all_to_all_single(received, payload),
        "compute": compute,
        "in turn": lambda: (dist.all_to_all_single(received, payload), compute()),
        "overlapped": overlapped,
        "all_gather + reduce_scatter": gather_scatter,
    }
    best = interleaved_best_ms({mode: steps[mode] for mode in MODES}, args["iters"], args["rounds"])
    if rank == 0:
        queue.put(best)
    dist.destroy_process_group()


def run_two_ranks(worker, spec: dict) -> dict:
    """Spawn ``worker(rank, 2, port, spec, queue)`` on 2 CPU processes; returns what rank 0 puts in the queue."""
    from smoe_ds.distributed.process_group import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, spec, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    result = queue.get(timeout=1800)
    for proc in procs:
        proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smoe-bench-overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--columns", type=int, default=132, help="payload columns (d_model + gates)")
    p.add_argument("--compute-ms", type=float, default=3.0)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/bench_overlap"))
    args = p.parse_args(argv)
    spec = {k: getattr(args, k) for k in ("tokens", "columns", "compute_ms", "iters", "rounds")}
    result = run_two_ranks(_worker, spec)
    mb = 2 * args.tokens * args.columns * 4 / 2**20
    print(f"2 ranks (gloo, 1 thread each), {mb:.2f} MiB payload per rank")
    print("ms per iteration (the slower rank's, best of the rounds):")
    for mode in MODES:
        print(f"{mode:>28} {result[mode]:>8.3f}")
    print(f"overlapped / in turn: {result['overlapped'] / result['in turn']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {**spec, "payload_mib_per_rank": mb}
    (args.out / "bench_overlap.json").write_text(json.dumps({"settings": settings, "ms": result}, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_overlap.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
