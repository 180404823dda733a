"""The server's Prometheus metrics (/metrics, text format): requests by endpoint and status, generated tokens and their
rate, queue depth, slot use, latency and time to first token. One registry per server, so two servers in one process
(tests) do not share counters."""

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_WINDOW_S = 10.0


class ServerMetrics:

  def __init__(self, stats, outstanding):
    """stats: () -> the engine's stats dict; outstanding: () -> sequences in flight or waiting (the runner's)."""
    self.registry = CollectorRegistry()
    self.requests = Counter("lenvm_requests", "HTTP requests answered, by endpoint and status code.",
                            ["endpoint", "status"], registry=self.registry)
    self.prompt_tokens = Counter("lenvm_prompt_tokens", "Prompt tokens of admitted sequences.", registry=self.registry)
    self.generated_tokens = Counter("lenvm_generated_tokens", "Tokens generated (EOS included).",
                                    registry=self.registry)
    self.latency = Histogram("lenvm_request_latency_seconds", "Time from a generation request to its last token.",
                             ["endpoint"], buckets=_BUCKETS, registry=self.registry)
    self.first_token = Histogram("lenvm_time_to_first_token_seconds", "Time from a generation request to its first "
                                 "token.", ["endpoint"], buckets=_BUCKETS, registry=self.registry)
    self._recent = collections.deque()  # (time, tokens) of the last RATE_WINDOW_S seconds.
    self._lock = threading.Lock()
    gauge = lambda name, doc, read: Gauge(name, doc, registry=self.registry).set_function(read)
    gauge("lenvm_slots", "Decode slots of the engine.", lambda: stats()["slots"])
    gauge("lenvm_busy_slots", "Slots decoding a request now.", lambda: stats()["busy_slots"])
    gauge("lenvm_queue_depth", "Sequences waiting for a slot.", lambda: stats()["waiting"])
    gauge("lenvm_outstanding_sequences", "Sequences admitted and not finished (running or waiting).", outstanding)
    gauge("lenvm_tokens_per_second", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.", self.rate)

  def count_tokens(self, tokens: int) -> None:
    self.generated_tokens.inc(tokens)
    with self._lock:
      self._recent.append((time.monotonic(), tokens))

  def rate(self) -> float:
    now = time.monotonic()
    with self._lock:
      while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
        self._recent.popleft()
      return sum(t for _, t in self._recent) / RATE_WINDOW_S

  def text(self) -> tuple[bytes, str]:
    return generate_latest(self.registry), CONTENT_TYPE_LATEST
