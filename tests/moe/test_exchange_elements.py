"""The byte model behind moe.ep_exchange (docs/expert_parallelism.md) and the trainer's line about it."""

import random

import pytest

from smoe_ds.config.schema import load_config
from smoe_ds.moe.dispatch import exchange_elements, ranks_reached, weights_bytes_sent
from smoe_ds.moe.experts import GroupedExperts
from smoe_ds.train import describe_exchange


@pytest.mark.parametrize("n, p", [(8, 2), (16, 8), (16, 4)])
def test_ranks_reached_matches_counting_random_routes(n, p):
    e, rng = n // p, random.Random(0)
    for k in (1, 2, n // 2, n - e, n - e + 1, n):
        draws = [rng.sample(range(n), k) for _ in range(4000)]
        counted = sum(len({x // e for x in d}) for d in draws) / len(draws)
        assert ranks_reached(k, n, p) == pytest.approx(counted, rel=0.03), k
    assert ranks_reached(1, n, p) == 1.0
    assert all(ranks_reached(k, n, p) == p for k in range(n - e + 1, n + 1))  # full routes


def test_weights_bytes_are_what_the_gather_sends_forward_and_the_gradients_return():
    experts = GroupedExperts(4, 128, 64, "ep_size_2")  # the default job's rank: 4 of 8 experts
    per_direction = weights_bytes_sent(dict(experts.named_parameters()), ep_size=2) / 4  # elements
    assert exchange_elements(1024, 128, 8, 64, 2, k=8)["weights"] == 2 * per_direction


def test_tokens_bytes_at_full_routes_are_every_token_out_and_back_both_ways():
    # k = N, P = 2: each token goes to the other rank with its D values and 4 gates, D come back,
    # and backward the same again
    assert exchange_elements(1024, 128, 8, 64, 2, k=8)["tokens"] == 2 * 1024 * (128 + 4 + 128)


def config(*sets):
    return load_config("ds_configs/cpu_tiny.json", list(sets))


def test_the_default_job_moves_the_weights_without_a_warning():
    line = describe_exchange(config(), tokens_per_rank=8 * 128)
    assert "moves the weights" in line and "0.5 MiB" in line and "the tokens would be 2.0 MiB" in line
    assert "warning" not in line


@pytest.mark.parametrize(
    "sets, better",
    [
        (["moe.ep_exchange=tokens"], "weights"),  # the default job: the weights are a quarter
        (["model.d_model=256", "moe.num_experts=16", "moe.d_expert=512", "moe.k_schedule.k_max=16"], "tokens"),
    ],
)
def test_the_trainer_warns_when_the_other_exchange_moves_fewer_bytes(sets, better):
    line = describe_exchange(config(*sets), tokens_per_rank=8 * 128)
    assert f"warning: moe.ep_exchange={better} would move fewer bytes" in line


def test_sixteen_bit_training_halves_the_figures():
    line = describe_exchange(config("bf16.enabled=true"), tokens_per_rank=8 * 128)
    assert "0.2 MiB" in line and "1.0 MiB" in line
