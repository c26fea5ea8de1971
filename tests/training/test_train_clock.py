"""The training clock: validations and saves do not count, and a resumed run adds its sittings.

The clock reads a fake time source moved by hand, so the figures are exact whatever the load.
"""

from smoe_ds.training.loop_helpers import TrainClock


class HandClock:
    """A time source that moves only when told to (seconds)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_paused_time_is_left_out_and_reads_as_at_the_pause_start():
    time = HandClock()
    clock = TrainClock(now=time)
    time.advance(2.0)
    with clock.paused():
        at_pause = clock.elapsed_s()
        time.advance(30.0)
        assert clock.elapsed_s() == at_pause == 2.0  # a validation records the time before it began
    time.advance(1.5)
    assert clock.elapsed_s() == clock.sitting_s() == 3.5  # the 30 s pause is not in it


def test_a_resumed_clock_carries_the_earlier_sittings():
    time = HandClock()
    first = TrainClock(now=time)
    time.advance(4.0)
    state = first.state()
    assert state == {"train_wall_s": 4.0}
    second = TrainClock.resumed(state, now=time)
    time.advance(0.25)
    assert second.sitting_s() == 0.25 and second.elapsed_s() == 4.25
    assert TrainClock.resumed({}, now=time).elapsed_s() == 0.0  # a checkpoint without the key: from zero
