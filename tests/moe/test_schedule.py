import pytest

from smoe_ds.config.schema import KScheduleConfig
from smoe_ds.moe.schedule import default_milestones, k_at_step


def sched(kind, k_min=8, k_max=16, start=0, end=400, **kw):
    return KScheduleConfig(kind=kind, k_min=k_min, k_max=k_max, start_step=start, end_step=end, **kw)


@pytest.mark.parametrize(
    "kind, expected",
    [
        # step:      0   100  200  300  400  1000
        ("linear", [8, 10, 12, 14, 16, 16]),
        ("cosine", [8, 9, 12, 15, 16, 16]),  # 8 + 8 * (1 - cos(pi p)) / 2: 9.17, 12, 14.83
        ("exponential", [8, 10, 11, 13, 16, 16]),  # 8 * 2 ** p: 9.51, 11.31, 13.45
        ("multistep", [8, 10, 12, 14, 16, 16]),  # milestones 100, 200, 300, 400
    ],
)
def test_k_at_chosen_steps(kind, expected):
    assert [k_at_step(sched(kind), s) for s in (0, 100, 200, 300, 400, 1000)] == expected


def test_linear_matches_released_formula():
    # k = round((k_max - k_min) * step / T) + k_min, T = 400
    cfg = sched("linear")
    for step in range(0, 401, 7):
        assert k_at_step(cfg, step) == round(8 * step / 400) + 8


def test_start_step_holds_k_min_until_start():
    cfg = sched("linear", start=100, end=300)
    assert k_at_step(cfg, 0) == 8 and k_at_step(cfg, 100) == 8
    assert k_at_step(cfg, 200) == 12 and k_at_step(cfg, 300) == 16


def test_multistep_with_explicit_milestones():
    cfg = sched("multistep", k_min=1, k_max=4, milestones=[10, 20, 30])
    assert [k_at_step(cfg, s) for s in (0, 9, 10, 19, 20, 30, 99)] == [1, 1, 2, 2, 3, 4, 4]


def test_default_milestones_end_at_end_step():
    assert default_milestones(0, 400) == [100, 200, 300, 400]


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential", "multistep"])
@pytest.mark.parametrize("k_min, k_max, start, end", [(1, 16, 0, 50), (3, 5, 10, 11), (4, 4, 0, 0), (2, 7, 5, 5)])
def test_k_never_leaves_range_and_never_decreases(kind, k_min, k_max, start, end):
    cfg = sched(kind, k_min, k_max, start, end)
    ks = [k_at_step(cfg, s) for s in range(0, 120)]
    assert all(k_min <= k <= k_max for k in ks)
    assert ks == sorted(ks)
    assert ks[-1] == k_max and ks[0] == (k_max if end <= start == 0 else k_min)
