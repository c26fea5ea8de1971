"""smoe-tune's memory model: the ZeRO table's formulas against what engines held (bench_memory's
committed 4-rank measurements), the parameter counts against the built model, and activations
measured from the tensors autograd keeps."""

from __future__ import annotations

import json

import pytest

from smoe_ds.bench.memory import VARIANTS, largest_state, variant_sets
from smoe_ds.config.schema import load_config
from smoe_ds.models.lm import build_model
from smoe_ds.models.lm import count_parameters as built_count
from smoe_ds.tuning.activations import saved_activation_bytes
from smoe_ds.tuning.memory_model import count_parameters, predict, vocab_size
from tests.helpers.launch import REPO

TINY = str(REPO / "tests" / "configs" / "e2e_tiny.json")
# python -m smoe_ds.bench.memory --ranks 4 --ep-sizes 1,2,4: every variant at every ep_size on 4 CPU ranks
MEASURED = REPO / "docs" / "results" / "tuning" / "bench_memory_4ranks.json"


def loaded(path: str, *sets: str):
    cfg = load_config(path, list(sets))
    cfg.model.vocab_size = vocab_size(cfg)
    return cfg


class Args:  # what bench_memory's variant_sets reads
    steps = 5


@pytest.mark.parametrize("ep_size", [1, 2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_predicted_model_state_is_within_10_percent_of_what_4_ranks_held(variant, ep_size):
    """The default job on 4 CPU ranks, each rank's weights, masters and moments read from its
    engine, at every ZeRO variant and ep_size (docs/results/tuning/bench_memory_4ranks.json)."""
    result = json.loads(MEASURED.read_text())
    sets = variant_sets(variant, Args, ep_size)
    cfg = loaded(str(REPO / "ds_configs" / "cpu_tiny.json"), *(f"{k}={v}" for k, v in sets.items()))
    predicted = predict(cfg, 4, count_parameters(cfg), 0, accelerator_is_host=True)
    measured = largest_state(result["ranks"][f"{variant}, ep_size {ep_size}"])
    assert abs(predicted.model_state - measured) <= 0.10 * measured, (predicted.model_state, measured)


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_parameter_counts_match_the_built_model(ep_size):
    cfg = loaded(TINY, f"moe.ep_size={ep_size}")
    counts = count_parameters(cfg)
    model = build_model(cfg.model, cfg.moe, ep_rank=0, for_deepspeed=False)
    unique = {id(p): p for p in model.parameters()}.values()
    assert counts.outside_experts + counts.experts_per_rank == sum(p.numel() for p in unique)
    assert counts.outside_experts + counts.experts_all == built_count(model, ep_size)
    frozen = sum(p.numel() for p in unique if not p.requires_grad)
    assert counts.outside_experts - counts.trainable_outside_experts == frozen > 0
    assert counts.experts_per_rank * ep_size == counts.experts_all


def test_zero_stages_shrink_what_each_rank_holds_in_the_tables_order():
    """Stage by stage on 4 ranks: masters appear at 1 (partitioned), gradients partition at 2,
    weights at 3; more expert parallelism holds fewer expert weights per rank."""
    counts = count_parameters(loaded(TINY))
    need = {s: predict(loaded(TINY, f"zero_optimization.stage={s}"), 4, counts, 0, True) for s in range(4)}
    assert need[0].master_weights == 0 and need[1].master_weights > 0
    assert need[1].gradients > need[2].gradients and need[2].weights > need[3].weights
    assert need[3].zero3_resident > 0 == need[2].zero3_resident
    e1, e4 = (count_parameters(loaded(TINY, f"moe.ep_size={e}")).experts_per_rank for e in (1, 4))
    assert e1 == 4 * e4


def test_bf16_halves_weights_and_gradients_and_keeps_fp32_masters():
    fp32 = loaded(TINY, "zero_optimization.stage=0")
    counts = count_parameters(fp32)
    a = predict(fp32, 2, counts, 0, True)
    bf16 = fp32.__class__(**{**fp32.__dict__, "deepspeed": {**fp32.deepspeed, "bf16": {"enabled": True}}})
    b = predict(bf16, 2, counts, 0, True)
    assert 2 * b.weights == a.weights and 2 * b.gradients == a.gradients
    assert (
        a.master_weights
        == 0
        < b.master_weights
        == 2 * b.weights - 4 * (counts.outside_experts - counts.trainable_outside_experts)
    )


def test_activations_grow_with_the_micro_batch_and_leave_the_weights_out():
    cfg = loaded(TINY)
    one, four = saved_activation_bytes(cfg, 1), saved_activation_bytes(cfg, 4)
    assert 3.5 * one <= four <= 4.5 * one  # linear in the batch, up to what does not scale with it
    weights = 4 * (count_parameters(cfg).outside_experts + count_parameters(cfg).experts_all)
    # per token and layer, at least the residual stream's few D-wide rows: far from the weights' bytes
    assert one > cfg.model.block_size * cfg.model.d_model * 4 * cfg.model.n_layers
    assert one != weights
