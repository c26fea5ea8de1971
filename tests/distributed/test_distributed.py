"""Router and expert-parallel numerics on real multi-rank gloo groups."""

import json

import pytest

from tests.helpers.launch import run_ranks

TOL = 1e-5


@pytest.mark.parametrize(
    "launcher, world, ep_size, zero",
    [("python", 1, 1, 0), ("torchrun", 2, 2, 2), ("deepspeed", 4, 2, 1)],
)
def test_frozen_router_identical_absent_from_optimizer_and_unchanged(tmp_path, launcher, world, ep_size, zero):
    out = tmp_path / "router.json"
    run_ranks(launcher, world, ["tests.helpers.workers.router", str(out), str(ep_size), str(zero)], module=True)
    r = json.loads(out.read_text())
    if launcher == "deepspeed":  # LOCAL_SIZE would switch DeepSpeed's leaky shm allreduce on; it stays off
        assert r["local_size"] == str(world) and r["shm_buffers"] == []
    assert r["world"] == r["ranks_reporting"] == world  # every rank's flags below, not rank 0's only
    assert r["router_identical_across_ranks"] and r["router_matches_seed"]
    assert not r["router_requires_grad"] and r["router_grad_is_none"]
    assert not r["router_in_optimizer"] and r["every_trainable_param_in_optimizer"]
    assert r["router_unchanged_after_20_steps"] and r["experts_trained"]
    assert r["expert_init_independent_of_ep_size"]


@pytest.fixture(scope="module")
def ep_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "ep.json"
    run_ranks("torchrun", 2, ["tests.helpers.workers.ep_equivalence", str(out)], module=True)
    return json.loads(out.read_text())


# sparse and dense: the compiled CPU ops; *_python: the paths GPUs use
@pytest.mark.parametrize("path", ["None", "sparse", "dense", "sparse_python", "dense_python"])
@pytest.mark.parametrize("k", ["1", "2", "3", "4"])
def test_ep2_layer_matches_naive_loop_with_uneven_tokens(ep_result, k, path):
    row = ep_result["layer"][path][k]
    assert row["out_norm"] > 1.0
    # each token reaches each rank at most once, whatever k; at k = N it reaches both exactly once
    assert all(sent <= row["tokens"] for sent in row["rows_sent"])
    if k == "4":
        assert row["rows_sent"] == [row["tokens"], row["tokens"]]
    for key in ("out", "grad_x", "grad_w_in", "grad_w_out"):
        assert row[key] <= TOL, (key, row)


@pytest.mark.parametrize("collective", ["all_to_all", "gather_scatter"])
@pytest.mark.parametrize("k", ["3", "4"])
def test_ep2_full_routes_match_naive_loop_without_counting(ep_result, k, collective):
    """k > N - E = 2 with the same token count on both ranks: every token goes to both ranks in
    fixed splits, uncounted, by the chosen collective; outputs and gradients as the naive loop."""
    row = ep_result["full_route"][collective][k]
    assert row["out_norm"] > 1.0
    assert not row["counted"] and row["gathered"] == (collective == "gather_scatter")
    assert row["rows_sent"] == [row["tokens"], row["tokens"]]
    for key in ("out", "grad_x", "grad_w_in", "grad_w_out"):
        assert row[key] <= TOL, (key, row)


@pytest.mark.parametrize("path", ["None", "sparse_python", "dense_python"])
@pytest.mark.parametrize("k", ["1", "2", "3", "4"])
def test_ep2_weights_exchange_matches_naive_loop_with_uneven_tokens(ep_result, k, path):
    """moe.ep_exchange = "weights": the experts are all-gathered and their gradients reduce-scattered,
    no token leaves its rank; outputs, the input's and this rank's experts' gradients as the naive
    loop, at every k, with 37 and 53 tokens on the two ranks."""
    row = ep_result["weights"][path][k]
    assert row["out_norm"] > 1.0 and row["rows_sent"] == []
    for key in ("out", "grad_x", "grad_w_in", "grad_w_out"):
        assert row[key] <= TOL, (key, row)


def test_capacity_factor_drops_without_hanging_and_full_capacity_is_exact(ep_result):
    cap = ep_result["capacity"]
    assert cap["full_capacity_equals_dropless"]
    assert 0.05 < cap["tight_dropped_fraction"] < 0.95 and cap["tight_finite"]


@pytest.mark.parametrize("exchange", ["tokens", "weights"])
@pytest.mark.parametrize("k", ["1", "2", "4"])
def test_ep2_model_matches_single_process_with_all_experts(ep_result, k, exchange):
    row = ep_result["model"][exchange][k]
    assert row["loss"] <= TOL and row["grad"] <= TOL, row


@pytest.mark.slow
def test_expert_gradients_are_averaged_over_the_expert_data_parallel_group(tmp_path):
    """4 ranks, ep_size 2, ZeRO-2, a different batch on each rank for 3 steps: the two copies of
    each expert (ranks r and r + 2) stay bit-identical, as do the non-expert weights everywhere,
    while the experts move and the two expert-parallel ranks hold different experts. (That the
    reduction is over that group and not all ranks, which would mix different experts, is what
    test_ep2_model_matches_single_process_with_all_experts shows.)"""
    out = tmp_path / "replicas.json"
    run_ranks("deepspeed", 4, ["tests.helpers.workers.expert_replicas", str(out)], module=True)
    result = json.loads(out.read_text())
    assert result["expert_moved"] > 1e-4
    assert result["expert_replica_diff"] == [0.0] * 4
    assert result["dense_diff"] == [0.0] * 4
    assert all(d > 1e-3 for d in result["expert_other_rank_diff"])


def test_free_port_is_bindable_and_below_the_ephemeral_range():
    """A rendezvous port the kernel cannot hand to an outgoing connection before the launcher binds it."""
    import random
    import socket

    from smoe_ds.distributed.process_group import PORT_FLOOR, _ephemeral_floor, free_port

    random.seed(0)
    ports = [free_port() for _ in range(20)]
    random.seed(0)
    assert [free_port() for _ in range(20)] != ports  # the seeded global generator does not choose them
    for port in ports:
        assert PORT_FLOOR <= port < _ephemeral_floor()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
