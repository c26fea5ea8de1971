"""GELU x gate, the experts' fused elementwise pass: the eager ``GatedGelu`` against the expression
compiled by ``torch.compile`` (what ``smoe_ds.moe.gated_gelu`` runs on GPUs).

    python -m smoe_ds.bench.gated_gelu [--device cpu] [--dtype float32] [--shapes cpu] [--out FILE]

Forward plus backward (gradients of both inputs), median of ``--repeats`` calls after one untimed
call, the two forms taking turns call by call so that a busy machine slows both alike. Shapes
(``--shapes``): "cpu", the layer benchmark's shapes A and B in fp32 terms (dense-masked [T, E, H]
at k = N, sparse route rows [T x k, H] at k = 2); "gpu", the same two forms at d_model 2048, 16 x 512,
16,384 tokens. The first compiled call, which compiles, is timed apart. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    "cpu": {
        "A dense-masked k=N": ((2048, 16, 512), (2048, 16, 1)),
        "A sparse k=2": ((4096, 512), (4096, 1)),
        "B dense-masked k=N": ((4096, 16, 64), (4096, 16, 1)),
        "B sparse k=2": ((8192, 64), (8192, 1)),
    },
    "gpu": {
        "d2048 dense-masked k=N": ((16384, 16, 512), (16384, 16, 1)),
        "d2048 sparse k=2": ((32768, 512), (32768, 1)),
    },
}


def _call(fn, pre: torch.Tensor, gates: torch.Tensor, grad: torch.Tensor) -> float:
    p, g = pre.detach().requires_grad_(True), gates.detach().requires_grad_(True)
    if pre.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn(p, g).backward(grad)
    if pre.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(device: torch.device, dtype: torch.dtype, shapes: dict, repeats: int) -> list[dict]:
    from smoe_ds.moe.gated_gelu import GatedGelu, _compiled_gelu_times_gate

    forms = {"eager GatedGelu": GatedGelu.apply, "torch.compile": _compiled_gelu_times_gate()}
    rows = []
    for label, (pre_shape, gate_shape) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        pre = torch.randn(pre_shape, generator=gen).to(device, dtype)
        gates = (torch.rand(gate_shape, generator=gen) + 0.1).to(device, dtype)
        grad = torch.randn(pre_shape, generator=gen).to(device, dtype)
        first_compiled_s = _call(forms["torch.compile"], pre, gates, grad)
        _call(forms["eager GatedGelu"], pre, gates, grad)
        times: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(repeats):
            for name, fn in forms.items():
                times[name].append(_call(fn, pre, gates, grad))
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        rows.append(
            {
                "shape": label,
                "pre": list(pre_shape),
                **{f"{name}_ms": t * 1e3 for name, t in medians.items()},
                "compiled_over_eager": medians["torch.compile"] / medians["eager GatedGelu"],
                "first_compiled_call_s": first_compiled_s,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smoe_ds.bench.gated_gelu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shapes", default="cpu", choices=sorted(SHAPES))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="bench_gated_gelu.json")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = bench(device, dtype, SHAPES[args.shapes], args.repeats)
    print(f"GELU x gate, fwd+bwd, {args.dtype} on {device} ({torch.get_num_threads()} threads), median ms")
    print(f"{'shape':<24} {'eager':>9} {'compiled':>9} {'ratio':>7} {'compile s':>10}")
    for r in rows:
        print(
            f"{r['shape']:<24} {r['eager GatedGelu_ms']:>9.2f} {r['torch.compile_ms']:>9.2f} "
            f"{r['compiled_over_eager']:>7.3f} {r['first_compiled_call_s']:>10.1f}"
        )
    result = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
