"""The one thread that owns the decode engine (lenvm_jax/decoding/engine.py) and calls its step(); request handlers
on the asyncio loop submit, cancel and await their tokens through this.

Why a thread: step() blocks for a whole jitted decode call, and the HTTP loop must keep answering (health, metrics,
new requests, disconnects) meanwhile. Each submitted sequence gets an asyncio.Queue; the engine thread feeds it with
loop.call_soon_threadsafe: ("tokens", request_id, ids) as they come, then ("done", request_id, Completion) (one
queue for the sequences submitted together, e.g. the n choices of one HTTP request). Admission is bounded here: at
most `slots + max_waiting` sequences are outstanding, beyond that a request is refused (the server answers 429), and
while draining (SIGTERM) nothing new is admitted (503) but what is in flight runs to its end.
"""

import asyncio
import threading
import time

from lenvm_jax.serving.protocol import RequestError


class EngineRunner:

  def __init__(self, engine, max_waiting: int, idle_wait_s: float = 0.05):
    self.engine = engine
    self.max_waiting = max_waiting
    self._idle_wait_s = idle_wait_s
    self._lock = threading.Lock()  # submit + registration vs. delivery of completions.
    self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
    self._wake = threading.Event()
    self._stop = threading.Event()
    self.draining = False
    self.error: BaseException | None = None
    self.step_seconds = 0.0
    self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    self._wake.set()
    self._thread.join(timeout=30)

  @property
  def outstanding(self) -> int:
    with self._lock:
      return len(self._queues)

  def submit_all(self, requests: list) -> tuple[list[int], asyncio.Queue]:
    """Submits sequences that are admitted together or not at all: (request_ids, their queue); RequestError 503 /
    429 when draining / full, 400 when the engine refuses one (its message names the field)."""
    if self.draining:
      raise RequestError(None, "the server is shutting down", status=503, kind="server_shutting_down")
    if self.error is not None:
      raise RequestError(None, f"the engine failed: {self.error}", status=500, kind="server_error")
    for request in requests:
      try:
        self.engine.check(request)
      except ValueError as e:
        raise RequestError(_field_of(str(e)), str(e)) from None
    loop, queue, ids = asyncio.get_running_loop(), asyncio.Queue(), []
    with self._lock:
      if len(self._queues) + len(requests) > self.engine.slots + self.max_waiting:
        raise RequestError(None, f"the server is busy ({len(self._queues)} sequences in flight or waiting, limit "
                           f"{self.engine.slots + self.max_waiting}); retry later", status=429,
                           kind="rate_limit_exceeded")
      for request in requests:
        request_id = self.engine.submit(request, self._on_tokens)
        self._queues[request_id] = (loop, queue)
        ids.append(request_id)
    self._wake.set()
    return ids, queue

  def cancel(self, request_ids) -> None:
    for request_id in request_ids:
      self.engine.cancel(request_id)
    self._wake.set()

  def _on_tokens(self, request_id, new_ids, new_logits) -> None:
    del new_logits
    with self._lock:
      target = self._queues.get(request_id)
    if target is not None:
      target[0].call_soon_threadsafe(target[1].put_nowait, ("tokens", request_id, new_ids.tolist()))

  def _loop(self) -> None:
    while not self._stop.is_set():
      if not self.engine.has_work():
        self._wake.wait(self._idle_wait_s)
        self._wake.clear()
        continue
      start = time.perf_counter()
      try:
        ended = self.engine.step()
      except BaseException as e:  # pylint: disable=broad-except  # A bug: every waiter hears it, nothing hangs.
        self.error = e
        with self._lock:
          queues, self._queues = self._queues, {}
        for loop, queue in queues.values():
          loop.call_soon_threadsafe(queue.put_nowait, ("error", None, e))
        raise
      self.step_seconds += time.perf_counter() - start
      with self._lock:
        targets = [(c, self._queues.pop(c.request_id, None)) for c in ended]
      for completion, target in targets:
        if target is not None:
          target[0].call_soon_threadsafe(target[1].put_nowait, ("done", completion.request_id, completion))


def _field_of(message: str) -> str | None:
  """The request field an engine check names first (its messages start with the field or its rule)."""
  for field, request_field in (("prompt", "prompt"), ("max_new_tokens", "max_tokens"), ("sampling temperature",
                               "temperature"), ("sampling top_k", "top_k"), ("sampling top_p", "top_p"),
                               ("sampling min_p", "min_p"), ("seed", "seed"), ("stop_token_ids", "stop_token_ids"),
                               ("a length rule", "temperature"), ("length rule", "custom_params"),
                               ("equal_to", "custom_params.target_length"),
                               ("at_least", "custom_params.target_length"),
                               ("eq_soft", "custom_params.target_length")):
    if message.startswith(field):
      return request_field
  return None
