"""The console's progress line (lenvm_jax/progress.py): its time left, its format, and how it draws on a terminal and
in a log."""

import io

import pytest

from lenvm_jax import progress


class Clock:
  def __init__(self, now=100.0):
    self.now = now

  def __call__(self):
    return self.now


def test_eta_is_the_rate_since_the_first_update_times_what_is_left():
  # 40 steps in 20 s since the first update -> 2 steps/s; 60 left -> 30 s.
  assert progress.eta_seconds(50, 110, first_done=10, first_time=5.0, now=25.0) == pytest.approx(30.0)
  assert progress.eta_seconds(10, 110, first_done=10, first_time=5.0, now=25.0) is None  # No progress measured yet.
  assert progress.eta_seconds(110, 110, first_done=10, first_time=5.0, now=25.0) == 0.0


@pytest.mark.parametrize("seconds, text", [(None, "?"), (float("inf"), "?"), (float("nan"), "?"), (0.4, "0s"),
                                           (42, "42s"), (59.6, "1m00s"), (307, "5m07s"), (3720, "1h02m"),
                                           (90061, "25h01m")])
def test_durations(seconds, text):
  assert progress.format_duration(seconds) == text


@pytest.mark.parametrize("value, text", [(0.012345, "0.01235"), (949.34, "949.3"), (9999, "9999"), (12345, "12.3k"),
                                         (4_560_000, "4.56M"), ("x", "x")])
def test_numbers(value, text):
  assert progress.format_number(value) == text


def test_a_log_gets_one_line_per_shown_update_with_time_left_from_the_first_update_on():
  clock, out = Clock(), io.StringIO()
  line = progress.ProgressLine("train", 1000, start=200, stream=out, in_place=False, clock=clock)
  clock.now += 60.0  # Compilation: not counted in the rate.
  line.update(201, show=False)
  clock.now += 10.0
  line.update(250, loss=0.5, **{"tokens/s": 12345.0})  # 49 steps in 10 s -> 750 left take 153 s.
  clock.now += 10.0
  line.update(260, show=False)  # Between log steps: counted, not printed; the fields stay.
  clock.now += 10.0
  line.update(300, loss=0.25)
  clock.now += 5.0
  line.update(1000, loss=0.125)
  assert out.getvalue().splitlines() == [
      "train 250/1000 (25%)  loss 0.5  tokens/s 12.3k  ETA 2m33s",
      "train 300/1000 (30%)  loss 0.25  tokens/s 12.3k  ETA 3m32s",  # 99 steps in 30 s: 700 left take 212 s.
      "train 1000/1000 (100%)  loss 0.125  tokens/s 12.3k  done in 1m35s",  # Since the line was made.
  ]


def test_a_terminal_line_is_redrawn_in_place_at_most_every_refresh_and_a_log_record_erases_it_first():
  clock, out = Clock(), io.StringIO()
  line = progress.ProgressLine("generate", 4, stream=out, in_place=True, refresh_s=1.0, clock=clock)
  line.update(1)
  clock.now += 0.5
  line.update(2)  # Too soon: not drawn.
  assert out.getvalue() == "\r\x1b[Kgenerate 1/4 (25%)  ETA ?"
  progress.clear_active_line()  # What cli's log filter does before a record is printed.
  assert out.getvalue().endswith("ETA ?\r\x1b[K")
  clock.now += 0.3
  line.update(3)  # Drawn again at once after a record, below it.
  assert out.getvalue().endswith("\r\x1b[Kgenerate 3/4 (75%)  ETA 0s")  # 2 in 0.8 s since the first update.
  clock.now += 9.2
  line.update(4)  # The last update is always drawn and ends the line.
  assert out.getvalue().endswith("\r\x1b[Kgenerate 4/4 (100%)  done in 10s\n")
  progress.clear_active_line()  # Nothing drawn in place any more: writes nothing.
  line.close()
  assert out.getvalue().endswith("done in 10s\n")


def test_a_run_stopped_before_its_total_ends_its_terminal_line_and_stages_advance():
  out = io.StringIO()
  line = progress.ProgressLine("evaluate", 5, stream=out, in_place=True, clock=Clock())
  line.advance()
  line.advance()
  assert line.done == 2
  line.close()
  assert out.getvalue().endswith("evaluate 1/5 (20%)  ETA ?\n")  # The second was within refresh_s.


def test_a_log_line_every_n_seconds():
  clock, out = Clock(), io.StringIO()
  line = progress.ProgressLine("generate", 100, stream=out, in_place=False, line_every_s=30, clock=clock)
  for done in range(1, 101):
    clock.now += 1.0
    line.update(done)
  assert [l.split()[1] for l in out.getvalue().splitlines()] == ["1/100", "31/100", "61/100", "91/100", "100/100"]


def test_done_in_counts_from_when_the_work_began():
  clock, out = Clock(100.0), io.StringIO()
  line = progress.ProgressLine("generate", 8, started_at=40.0, stream=out, in_place=False, clock=clock)
  line.update(8)  # Made at the first batch (its total known only then), 60 s after the work began.
  assert out.getvalue() == "generate 8/8 (100%)  done in 1m00s\n"


def test_the_line_goes_in_place_only_on_a_terminal():
  assert not progress.ProgressLine("x", 1, stream=io.StringIO()).in_place
