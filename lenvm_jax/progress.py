"""One progress line for a person at the console: done / total, the caller's numbers (loss, tokens/s), time left.

On a terminal the line is redrawn in place (at most every `refresh_s`); elsewhere (a log file, CI) each `update`
the caller chooses to show is one line, so a log keeps one line per log interval. The line goes to stderr, beside
the logs; metrics for machines stay in metrics.jsonl and TensorBoard (train/metrics_log.py).

Time left is measured from the first update on, not from the start: the first step of a run (or the first batch of
a decode) includes compilation, which would otherwise inflate every estimate of the run; a resumed run starts
counting at its resumed step.
"""

import sys
import time
from typing import Callable, TextIO

_CLEAR = "\r\x1b[K"  # Back to the line's start, erase to its end.
_active = None  # The ProgressLine drawn in place right now (a log record must first erase it: clear_active_line).


def format_duration(seconds: float | None) -> str:
  """'1h02m', '5m07s', '42s'; '?' when unknown."""
  if seconds is None or seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def format_number(value) -> str:
  """Four significant digits; thousands and millions as k / M from 10,000 on (12.3k, 4.56M)."""
  if isinstance(value, str):
    return value
  value = float(value)
  if abs(value) >= 1e6:
    return f"{value / 1e6:.3g}M"
  if abs(value) >= 1e4:
    return f"{value / 1e3:.3g}k"
  return f"{value:.4g}"


def eta_seconds(done: int, total: int, first_done: int, first_time: float, now: float) -> float | None:
  """Seconds left at the rate measured since (first_done, first_time): (total - done) / rate; None before any
  progress has been measured, 0 once done reaches total."""
  if done >= total:
    return 0.0
  if done <= first_done or now <= first_time:
    return None
  return (total - done) * (now - first_time) / (done - first_done)


class ProgressLine:
  """`label done/total (pct) name value ... ETA 5m07s`.

  start: where counting starts (a resumed run's step); the first `update` sets the point the rate is measured from.
  started_at: when the work began (clock time; default: now), for the "done in" of the last line.
  refresh_s: a terminal's line is redrawn at most this often; line_every_s: elsewhere, at most one line this often
  (0: every update shown). The last update (done = total) is always drawn.
  """

  def __init__(self, label: str, total: int, *, start: int = 0, started_at: float | None = None,
               stream: TextIO | None = None, in_place: bool | None = None, refresh_s: float = 0.5,
               line_every_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
    self.label, self.total = label, int(total)
    self._stream = stream if stream is not None else sys.stderr
    self.in_place = _is_terminal(self._stream) if in_place is None else in_place
    self._every_s = refresh_s if self.in_place else line_every_s
    self._clock = clock
    self._start_done, self._start_time = int(start), clock() if started_at is None else started_at
    self.done = int(start)
    self._first: tuple[int, float] | None = None
    self._drawn_at: float | None = None
    self._fields: dict = {}

  def text(self, done: int, now: float, fields: dict | None = None) -> str:
    """The line for `done` at time `now` (no side effect)."""
    first_done, first_time = self._first or (self._start_done, self._start_time)
    eta = eta_seconds(done, self.total, first_done, first_time, now)
    parts = [f"{self.label} {done}/{self.total} ({done / max(self.total, 1):.0%})"]
    parts += [f"{name} {format_number(value)}" for name, value in (fields or {}).items()]
    elapsed = format_duration(now - self._start_time)
    parts.append(f"ETA {format_duration(eta)}" if done < self.total else f"done in {elapsed}")
    return "  ".join(parts)

  def update(self, done: int, *, show: bool = True, **fields) -> None:
    """Records progress; draws the line when `show` (on a terminal: at most every refresh_s, and always the last).
    fields (name=value) replace the ones given before, so a line drawn between log steps keeps the last loss."""
    global _active
    now = self._clock()
    self.done = int(done)
    if self._first is None:
      self._first = (int(done), now)
    self._fields.update(fields)
    if not show:
      return
    last = done >= self.total
    if not last and self._drawn_at is not None and now - self._drawn_at < self._every_s:
      return
    self._drawn_at = now
    line = self.text(done, now, self._fields)
    if self.in_place:
      self._stream.write(_CLEAR + line + ("\n" if last else ""))
      _active = None if last else self
    else:
      self._stream.write(line + "\n")
    self._stream.flush()

  def advance(self, count: int = 1, **fields) -> None:
    """update(done + count): for work counted in stages (evaluate's decodes)."""
    self.update(self.done + count, **fields)

  def close(self) -> None:
    """Ends a line drawn in place (a run stopped before its total), so what follows starts on its own line."""
    global _active
    if _active is self:
      self._stream.write("\n")
      self._stream.flush()
      _active = None


def clear_active_line() -> None:
  """Erases a line drawn in place, so that a log record printed now does not land in the middle of it (the next
  update draws it again below the record)."""
  global _active
  if _active is not None:
    _active._stream.write(_CLEAR)  # pylint: disable=protected-access
    _active._stream.flush()  # pylint: disable=protected-access
    _active._drawn_at = None  # pylint: disable=protected-access  # Redraw at the next update.
    _active = None


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # A closed or replaced stream.
    return False
