"""The training clock: validations and saves do not count, and a resumed run adds its sittings."""

import time

from smoe_ds.loop import TrainClock


def test_paused_time_is_left_out_and_reads_as_at_the_pause_start():
    clock = TrainClock()
    time.sleep(0.05)
    with clock.paused():
        at_pause = clock.elapsed_s()
        time.sleep(0.5)
        assert clock.elapsed_s() == at_pause  # a validation records the time before it began
    time.sleep(0.05)
    assert 0.1 <= clock.elapsed_s() < 0.45  # the 0.5 s pause is not in it


def test_a_resumed_clock_carries_the_earlier_sittings():
    first = TrainClock()
    time.sleep(0.05)
    state = first.state()
    second = TrainClock.resumed(state)
    assert second.elapsed_s() >= state["train_wall_s"] >= 0.05 and second.sitting_s() < 0.05
    assert TrainClock.resumed({}).elapsed_s() < 0.05  # a checkpoint without the key: from zero
