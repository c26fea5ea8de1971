#!/usr/bin/env bash
# make gpu-check: every GPU path of smoe-ds, checked and measured in one call of a few minutes.
#   GPU_CHECK_OUT=DIR bash launch/gpu_check.sh     (make gpu-check; DIR defaults to runs/gpu_check)
#
# Meant for a GPU machine without network that holds torch with CUDA (its own build: this never
# installs torch) and receives a copy of this repository with .whl/ filled by `make gpu-wheels`.
# Without CUDA it says so in one line and exits 0. With it, in order, each step under its own
# timeout and all of them under GPU_CHECK_BUDGET_S (default 450 s), so one hang cannot eat the
# machine's time; a failed step is recorded and the next one runs:
#   install   .whl/ into a temporary folder on PYTHONPATH (pip --no-index --no-deps --target)
#   fusedadam JIT-build DeepSpeed's FusedAdam with the machine's nvcc (smoe_ds.ops.prebuild
#             --fused-adam, which fixes TORCH_CUDA_ARCH_LIST for DeepSpeed), timed, beside the tests;
#             if it fails or times out, the trainer steps use torch's fused AdamW instead
#   pytest    pytest -m gpu tests/gpu: the layer against the naive loop (fp32, bf16, each path),
#             unaligned grouped GEMMs, the router on GPU and CPU, a 1-GPU bf16 ZeRO-2 engine and
#             its export, peak memory against the dense FFN; no host sync (a training step of the
#             layer under torch.cuda.set_sync_debug_mode("error")), its forward replayed from a
#             CUDA graph to the eager output, two runs bit-identical (tests/gpu/test_layer_sync_free.py)
#   bench     smoe_ds.bench.layer, bf16: d_model 2048, 16 experts x 512, 16k tokens; then the paper's
#             shape (d_model 256, 16 x 512, 22 x 512 tokens); ours / stock DeepSpeed MoE / dense,
#             and ours with each compute path forced (--each-path); the profiler's table of ours
#             at the paper's shape (--profile, in the log); the summary prints each figure
#             against issue 32's goal
#   gelu      smoe_ds.bench.gated_gelu, bf16: the fused GELU x gate compiled against the eager form
#   e2e       smoe_ds.bench.e2e with ds_configs/gpu_bf16.json: dense against SMoE-Dropout
#   train     launch/local.sh ds_configs/gpu_bf16.json for 300 steps on the GPU(s), then convert
#             and the self-slimming evaluation of the export on one GPU
# It writes at most 8 files into GPU_CHECK_OUT: gpu_check.log (everything printed),
# summary.json (versions, each step's status and seconds, the headline figures), nvidia_smi.txt,
# bench_d2048.json, bench_paper.json, bench_e2e.json, train_summary.json, self_slimming.json.
#
# GPU_CHECK_DEVICE=cpu rehearses the script itself on a machine without a GPU: every step runs
# on the CPU (most are cut short by their timeouts there) and its figures mean nothing.
set -uo pipefail # no -e: a failing step is recorded, and the others still run
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
DEVICE=${GPU_CHECK_DEVICE:-cuda}

if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA device here ($PYTHON has no torch with a usable GPU): nothing to check"
  exit 0
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1
START=$SECONDS
: >"$WORK/steps.tsv"

# step NAME LIMIT_S CMD...: run CMD under the smaller of LIMIT_S and what is left of the budget.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 20)); then
    echo "== $name: skipped, the budget of ${BUDGET_S}s is spent"
    printf '%s\tskipped\t0\n' "$name" >>"$WORK/steps.tsv"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=15 "$limit" "$@"
  rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status="timed out" || { ((rc != 0)) && status="failed (exit $rc)"; }
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$WORK/steps.tsv"
  echo "== $name: $status after $((SECONDS - t0))s"
  return $rc
}

nvidia-smi >"$OUT/nvidia_smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$OUT/nvidia_smi.txt"

SITE=$WORK/site
if compgen -G ".whl/*.whl" >/dev/null; then
  step install 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
else
  echo "gpu-check: .whl/ is empty: run make gpu-wheels on a machine with the package registry first"
  printf 'install\tno wheels\t0\n' >>"$WORK/steps.tsv"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 SMOE_DS_GPU_TEST_DEVICE=$DEVICE

# FusedAdam builds beside the tests (which use torch's Adam), and the trainer steps wait for it.
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST-(unset)}"
(step fusedadam 240 "$PYTHON" -m smoe_ds.ops.prebuild --fused-adam) \
  >"$WORK/fusedadam.log" 2>&1 &
BUILD=$!

step pytest 200 "$PYTHON" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA

wait "$BUILD"
cat "$WORK/fusedadam.log"
ADAM=()
if ! grep -q $'^fusedadam\tok' "$WORK/steps.tsv"; then
  echo "gpu-check: DeepSpeed's FusedAdam is not built: the trainer steps use torch's fused AdamW"
  ADAM=(--set optimizer.params.torch_adam=true --set optimizer.params.fused=true)
fi

step bench 150 "$PYTHON" -m smoe_ds.bench.layer --device "$DEVICE" --dtype bfloat16 --d-model 2048 --experts 16 \
  --d-expert 512 --tokens 16384 --no-ep --each-path --out "$OUT/bench_d2048.json"
step bench_paper 90 "$PYTHON" -m smoe_ds.bench.layer --device "$DEVICE" --dtype bfloat16 --d-model 256 --experts 16 \
  --d-expert 512 --tokens 11264 --no-ep --each-path --profile --out "$OUT/bench_paper.json"
step gelu 60 "$PYTHON" -m smoe_ds.bench.gated_gelu --device "$DEVICE" --dtype bfloat16 --shapes gpu \
  --out "$WORK/bench_gated_gelu.json"

step e2e 150 "$PYTHON" -m smoe_ds.bench.e2e --config ds_configs/gpu_bf16.json --steps 200 --d-model 512 \
  --layers 8 --experts 16 --d-expert 256 --block-size 512 --batch 32 --out "$WORK/e2e" "${ADAM[@]}" &&
  cp "$WORK/e2e/bench_e2e.json" "$OUT/"

RUN=$WORK/train
if step train 180 env PYTHON="$PYTHON" bash launch/local.sh ds_configs/gpu_bf16.json --set run.max_steps=300 \
  --set run.eval_interval=100 --set run.out_dir="$RUN" "${ADAM[@]}"; then
  cp "$RUN/train_summary.json" "$OUT/"
  step export 60 "$PYTHON" -m smoe_ds.convert "$RUN/checkpoints" "$RUN/export" &&
    step evaluate 60 "$PYTHON" -m smoe_ds.evaluate "$RUN/export" --device "$DEVICE" --out "$RUN/eval" &&
    cp "$RUN/eval/self_slimming.json" "$OUT/"
fi

"$PYTHON" - "$WORK/steps.tsv" "$OUT" "$((SECONDS - START))" "$WORK/bench_gated_gelu.json" <<'PY'
"""The summary: versions, each step's status and time, and the headline figures against their goals."""
import json
import platform
import sys
from pathlib import Path

import torch

steps_tsv, out, total_s, gelu = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
# Issue 32's goals, forward + backward time / dense FFN (bf16, one GPU), and end to end.
GOALS = {"bench_d2048": {16: 1.10, 2: 0.30, 1: 0.20}, "bench_paper": {16: 1.5}}
E2E_GOAL = 0.95
steps = [dict(zip(("step", "status", "seconds"), line.split("\t"))) for line in steps_tsv.read_text().splitlines()]


def version(name):
    try:
        return __import__(name).__version__
    except Exception as e:  # a missing package is a finding, not a crash of the summary
        return f"not importable: {type(e).__name__}"


summary = {
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device",
    "python": platform.python_version(),
    "versions": {name: version(name) for name in ("torch", "deepspeed", "transformers", "datasets")},
    "cuda": torch.version.cuda,
    "steps": steps,
    "total_s": total_s,
}
print(f"\ngpu-check on {summary['gpu']}, torch {summary['versions']['torch']} (CUDA {summary['cuda']}), "
      f"deepspeed {summary['versions']['deepspeed']}: {total_s}s")
print(f"{'step':<12} {'status':<18} {'s':>5}")
for s in steps:
    print(f"{s['step']:<12} {s['status']:<18} {s['seconds']:>5}")
for name in ("bench_d2048", "bench_paper"):
    path = out / f"{name}.json"
    if path.is_file():
        shape = json.loads(path.read_text())["shapes"][0]
        summary[name] = {r["k"]: {"ours": r["ours_vs_dense"], "stock": r["stock_vs_dense"],
                                  "dense_path": r.get("ours_dense_path_vs_dense"),
                                  "sparse_path": r.get("ours_sparse_path_vs_dense")} for r in shape["rows"]}
        print(f"\n{name}: d_model {shape['d_model']}, {shape['experts']} x {shape['d_expert']}, "
              f"{shape['tokens']} tokens, fwd+bwd time / dense FFN")
        print("   k " + " ".join(f"{r['k']:>6}" for r in shape["rows"]))
        print("k/N  " + " ".join(f"{r['ideal']:>6.3f}" for r in shape["rows"]))
        print("ours " + " ".join(f"{r['ours_vs_dense']:>6.3f}" for r in shape["rows"]))
        print("stock" + " ".join(f"{r['stock_vs_dense']:>6.3f}" for r in shape["rows"]))
        if "ours_dense_path_vs_dense" in shape["rows"][0]:
            print("dpath" + " ".join(f"{r['ours_dense_path_vs_dense']:>6.3f}" for r in shape["rows"]))
            print("spath" + " ".join(f"{r['ours_sparse_path_vs_dense']:>6.3f}" for r in shape["rows"]))
        goals = GOALS[name]
        print("goal " + " ".join(f"{goals[r['k']]:>6.2f}" if r["k"] in goals else f"{'':>6}" for r in shape["rows"]))
        met = {r["k"]: r["ours_vs_dense"] <= goals[r["k"]] for r in shape["rows"] if r["k"] in goals}
        print("met  " + " ".join(f"{('yes' if met[r['k']] else 'NO') if r['k'] in met else '':>6}" for r in shape["rows"]))
        summary.setdefault("goals", {})[name] = {k: {"goal": goals[k], "met": m} for k, m in met.items()}
if gelu.is_file():
    result = json.loads(gelu.read_text())
    summary["gated_gelu"] = result["rows"]
    print(f"\nGELU x gate, {result['dtype']} fwd+bwd, compiled / eager: "
          + ", ".join(f"{r['shape']} {r['compiled_over_eager']:.3f}" for r in summary["gated_gelu"]))
e2e = out / "bench_e2e.json"
if e2e.is_file():
    result = json.loads(e2e.read_text())
    summary["e2e"] = {r["mode"]: {"tokens_per_s": r["tokens_per_s"], "val_loss": r["val_loss_at_k_N"]}
                      for r in result["runs"]}
    summary["e2e"]["wall_ratio_smoe_over_dense"] = result["wall_ratio_smoe_over_dense"]
    ratio = result["wall_ratio_smoe_over_dense"]
    summary.setdefault("goals", {})["e2e"] = {"goal": E2E_GOAL, "met": ratio <= E2E_GOAL}
    print(f"\ne2e: SMoE-Dropout / dense wall time {ratio:.3f} (goal {E2E_GOAL}: {'met' if ratio <= E2E_GOAL else 'NOT met'}); "
          + ", ".join(f"{m} {v['tokens_per_s']:,.0f} tokens/s" for m, v in summary["e2e"].items() if m != "wall_ratio_smoe_over_dense"))
train = out / "train_summary.json"
if train.is_file():
    result = json.loads(train.read_text())
    summary["train"] = {"tokens_per_s": result.get("tokens_per_s"), "train_wall_s": result.get("train_wall_s"),
                        "self_slimming": result.get("self_slimming")}
    print(f"\ntrain (gpu_bf16.json, 300 steps): {result.get('tokens_per_s', 0):,.0f} tokens/s")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out / 'summary.json'}")
PY
