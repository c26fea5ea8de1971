"""Our layer from two checkouts of smoe-ds, timed side by side in one process.

    mkdir /tmp/base && git archive 6d3b8c3 | tar -x -C /tmp/base
    PYTHONPATH=. python docs/results/layer_sync_free/paired.py /tmp/base --shapes B --rounds 12 --repeats 3
    (flags: --shapes A, B or AB; --repeats N; --rounds N; --out FILE)

BASE_DIR's smoe_ds is imported as ``smoe_base`` (its source with ``smoe_ds`` renamed), the
current one as ``smoe_ds``; both run the same compiled CPU op. For shapes A and B of
``smoe_ds.bench.layer`` and every k: ours (base), ours (current) and the dense FFN, same weights,
fp32, forward + backward, in blocks of ``--repeats`` consecutive calls after one untimed call, the
three taking turns block by block for ``--rounds`` rounds; medians. On a shared machine the load
hits all three alike, so the ratios stay comparable where separate runs' do not.
"""
import argparse, importlib.abc, importlib.util, json, statistics, sys
from pathlib import Path

import torch


class Renamed(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, name, path, target=None):
        if name != "smoe_base" and not name.startswith("smoe_base."):
            return None
        rel = Path(*name.split(".")[1:])
        pkg = self.root / "smoe_ds" / rel / "__init__.py"
        mod = (self.root / "smoe_ds" / rel).with_suffix(".py")
        file = pkg if pkg.is_file() else mod
        if not file.is_file():
            return None
        spec = importlib.util.spec_from_file_location(name, file, loader=self,
                                                      submodule_search_locations=[str(file.parent)] if file == pkg else None)
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        src = Path(module.__spec__.origin).read_text().replace("smoe_ds.", "smoe_base.").replace("from smoe_ds import", "from smoe_base import")
        exec(compile(src, module.__spec__.origin, "exec"), module.__dict__)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default="paired.json")
    p.add_argument("--shapes", default="AB")
    args = p.parse_args()
    sys.meta_path.insert(0, Renamed(Path(args.base)))
    import smoe_base.moe.cpu_experts as base_ops
    import smoe_base.moe.experts as base_experts
    from smoe_base.bench import layer as base_bench
    from smoe_ds.bench import layer as bench
    from smoe_ds.moe.cpu_experts import load_op

    assert load_op() is not None
    base_ops.load_op = base_experts.load_op = load_op  # one build of the identical op
    rows = []
    for label, s in bench.SHAPES.items():
        if label not in args.shapes:
            continue
        d, n, h, t = s["d_model"], s["experts"], s["d_expert"], s["tokens"]
        cur = bench.build_layers(d, n, h, 1, torch.device("cpu"), torch.float32)
        base = base_bench.build_layers(d, n, h, 1, torch.device("cpu"), torch.float32)
        layers = {"base": base.ours, "current": cur.ours, "dense": cur.dense}
        torch.manual_seed(0)
        x = torch.randn(1, t, d, requires_grad=True)
        grad = torch.randn(1, t, d)
        for k in bench.ks_for(n):
            base.ours.deepspeed_moe.gate.k = cur.ours.deepspeed_moe.gate.k = k
            with torch.no_grad():
                diff = float((base.ours(x)[0] - cur.ours(x)[0]).abs().max())
            times = {name: [] for name in layers}
            for _ in range(args.rounds):
                for name, layer in layers.items():
                    bench.time_once(layer, x, grad, torch.device("cpu"))
                    times[name].extend(bench.time_once(layer, x, grad, torch.device("cpu")) for _ in range(args.repeats))
            med = {name: statistics.median(ts) for name, ts in times.items()}
            row = {"shape": label, "k": k, "base_vs_dense": med["base"] / med["dense"], "current_vs_dense": med["current"] / med["dense"],
                   "current_over_base": med["current"] / med["base"], "dense_ms": med["dense"] * 1e3, "max_abs_diff": diff}
            rows.append(row)
            print(f"{label} k={k:>2}: base {row['base_vs_dense']:.3f}  current {row['current_vs_dense']:.3f}  "
                  f"current/base {row['current_over_base']:.3f}  dense {row['dense_ms']:.1f} ms  |diff| {diff:.1e}", flush=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
