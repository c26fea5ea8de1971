"""smoe-tune's candidates and search, in one process: what it enumerates, the configs it writes
(smoe-train's own loader reads them), the order it times candidates in, the time budget, resuming,
and the back-to-back confirmation that keeps the user's config unless the winner is as fast.

The search is driven here by trials whose tokens/s are given (a table, below), which makes its
decisions checkable; the real trials, smoe-train on 2 ranks, are test_tune.py's."""

from __future__ import annotations

import json
import time

import pytest

from smoe_ds.config.schema import ConfigError, load_config
from smoe_ds.tuning import candidates as C
from smoe_ds.tuning.search import CONFIRM, Row, Search
from smoe_ds.tuning.trials import OutOfTime, TrialResult, steady_tokens_per_s
from smoe_ds.tuning.tuner import parse_bytes
from tests.helpers.launch import REPO

DEFAULT = str(REPO / "ds_configs" / "cpu_tiny.json")


def test_every_candidate_keeps_the_global_batch_and_divides_the_world_and_the_experts():
    cfg = load_config(DEFAULT)  # micro-batch 8 x 1 per rank, N = 8
    found = C.enumerate_candidates(cfg, 2)
    assert len(found) == len(set(found))
    assert {(c.micro_batch, c.grad_accum) for c in found} == {(1, 8), (2, 4), (4, 2), (8, 1)}
    assert {c.ep_size for c in found} == {1, 2}
    assert {c.zero_stage for c in found} == {0, 1, 2, 3} and all(c.zero_stage in (2, 3) for c in found if c.offload)
    assert {c.ep_exchange for c in found if c.ep_size == 2} == {"tokens", "weights"}
    assert len(found) == 4 * (1 + 2) * (2 + 2 * 2)  # batches x (ep 1, ep 2 x exchanges) x (stages, offload at 2-3)
    assert C.of_config(cfg, 2) in found
    # 6 ranks and N = 8: ep_size must divide both
    assert {c.ep_size for c in C.enumerate_candidates(cfg, 6)} == {1, 2}


def test_each_candidate_is_a_config_smoe_train_loads_with_the_candidates_knobs(tmp_path):
    raw = json.loads(open(DEFAULT).read())
    raw["train_batch_size"] = 16  # a stale global batch must not contradict the candidate's
    cfg = load_config(DEFAULT)
    for c in C.enumerate_candidates(cfg, 2):
        path = tmp_path / f"{c.key}.json"
        path.write_text(json.dumps(C.apply(raw, cfg, c, accelerator_is_host=True)))
        loaded = load_config(str(path))
        loaded.validate_for_world(2)
        assert C.of_config(loaded, 2) == c
        assert loaded.deepspeed["optimizer"]["params"]["torch_adam"] is (not c.offload)
        assert loaded.moe.k_schedule == cfg.moe.k_schedule and loaded.model == cfg.model


def test_memory_budgets_are_read_with_their_units():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("8G") == 8 * 2**30 and parse_bytes("2e9") == 2 * 10**9 and parse_bytes("3GB") == 3 * 10**9
    with pytest.raises(ConfigError, match="--memory-budget 'lots': give bytes with an optional unit"):
        parse_bytes("lots")


def test_steady_throughput_leaves_the_warm_up_steps_out():
    """Each log line's tokens/s is the mean since the start: a first step of 10 s and then 1 s per
    step (100 tokens each) reads as 100 tokens/s once the first quarter is left out."""
    clock, history = 0.0, []
    for step in range(1, 13):
        clock += 10.0 if step == 1 else 1.0
        history.append({"step": step, "tokens_per_s": step * 100 / clock})
    assert steady_tokens_per_s(history, 100) == pytest.approx(100.0)
    assert history[-1]["tokens_per_s"] < 60  # what the whole run's mean would have said


# -- the search, driven by given throughputs ---------------------------------------------------


def speeds(c: C.Candidate) -> float:
    """A machine where micro-batch 4, ep_size 1 and ZeRO-1 are each the fastest choice of their knob."""
    return 1000.0 + 300 * (c.micro_batch == 4) + 200 * (c.ep_size == 1) + 100 * (c.zero_stage == 1) - 50 * c.offload


def search_of(cfg, yours, ran, deadline_s=1e6, wall_s=1.0, speed=speeds, done=None, pruned=()):
    rows = {c: Row(c, "pruned" if c in pruned else "not timed") for c in C.enumerate_candidates(cfg, 2)}
    done = {} if done is None else done

    def run(name, c, hang_s):
        ran.append(name)
        done[name] = TrialResult(speed(c), 1, 1, wall_s)
        return done[name]

    return Search(rows, yours, run, lambda name: done.get(name), time.monotonic() + deadline_s)


def test_the_search_changes_one_knob_at_a_time_and_confirms_back_to_back():
    cfg = load_config(DEFAULT)
    yours = C.of_config(cfg, 2)
    ran: list[str] = []
    search = search_of(cfg, yours, ran)
    stages = ["micro_batch", "expert_parallel", "zero_stage", "offload"]
    assert search.planned(stages) == 1 + 3 + 2 + 3 + 1 + 2  # from your config: offload at ZeRO-2 too
    tuned = search.run(stages)
    assert (tuned.micro_batch, tuned.ep_size, tuned.zero_stage, tuned.offload) == (4, 1, 1, False)
    assert ran[0] == yours.key and ran[-2:] == [f"{n}-{tuned.key}" for n in CONFIRM]
    # nothing timed twice before the confirmation; once ZeRO-1 wins, offload (stages 2-3) has no candidate
    assert len(ran) == len(set(ran)) == search.planned(stages) - 1
    assert search.rows[tuned].status == "timed" and not search.stopped_early


def test_the_users_config_is_kept_when_the_winner_is_slower_back_to_back():
    cfg = load_config(DEFAULT)
    yours = C.of_config(cfg, 2)
    confirmations = iter([2000.0, 1500.0])  # yours, then the winner, in the back-to-back pair

    def speed(c):
        return next(confirmations) if ran[-1].startswith("confirm") else (1000.0 + 500 * (c.micro_batch == 1))

    ran: list[str] = []
    tuned = search_of(cfg, yours, ran, speed=speed).run(["micro_batch"])
    assert tuned == yours and ran[-2:] == [f"{n}-mb1x8-ep2-weights-z2" for n in CONFIRM]


def test_the_time_budget_stops_the_search_and_a_second_sitting_goes_on_where_it_stopped():
    """Trials of 110 s in a 300 s budget: after the first, another trial and the two of the
    confirmation would not fit, so the search stops. The next sitting reads the first back."""
    cfg = load_config(DEFAULT)
    yours = C.of_config(cfg, 2)
    done: dict = {}
    first: list[str] = []
    search = search_of(cfg, yours, first, deadline_s=300, wall_s=110.0, done=done)
    search.run(["micro_batch"])
    assert first == [yours.key] and search.stopped_early
    second: list[str] = []
    tuned = search_of(cfg, yours, second, done=done).run(["micro_batch"])
    assert yours.key not in second and second[:3] == [
        "mb1x8-ep2-weights-z2",
        "mb2x4-ep2-weights-z2",
        "mb4x2-ep2-weights-z2",
    ]
    assert tuned.micro_batch == 4
    third: list[str] = []
    assert search_of(cfg, yours, third, done=done).run(["micro_batch"]) == tuned and third == []  # all done


def test_a_config_over_the_budget_starts_the_search_from_the_nearest_candidate_that_fits():
    cfg = load_config(DEFAULT)
    yours = C.of_config(cfg, 2)
    over = [c for c in C.enumerate_candidates(cfg, 2) if c.micro_batch == 8]
    ran: list[str] = []
    search = search_of(cfg, yours, ran, pruned=over)
    start = search.start()
    assert start.micro_batch != 8 and start.differs_from(yours) == 1
    tuned = search.run(["micro_batch"])
    assert tuned.micro_batch == 4 and not any(n.startswith("confirm") for n in ran)  # nothing to confirm against


def test_a_trial_the_budget_ends_is_not_recorded_and_runs_again_next_sitting():
    cfg = load_config(DEFAULT)
    yours = C.of_config(cfg, 2)
    done: dict = {}
    ran: list[str] = []

    def run(name, c, hang_s):
        ran.append(name)
        if len(ran) == 2:
            raise OutOfTime()  # what run_trial raises when the deadline stops a trial
        assert hang_s is None or hang_s == 10.0  # ten times the longest trial so far
        done[name] = TrialResult(1000.0, 1, 1, 1.0)
        return done[name]

    rows = {c: Row(c, "not timed") for c in C.enumerate_candidates(cfg, 2)}
    search = Search(rows, yours, run, lambda name: done.get(name), time.monotonic() + 1e6)
    assert search.run(["micro_batch"]) == yours and search.stopped_early
    assert ran == [yours.key, "mb1x8-ep2-weights-z2"] and set(done) == {yours.key}
    assert rows[C.Candidate(1, 8, 2, "weights", 2, False)].status == "not timed"
