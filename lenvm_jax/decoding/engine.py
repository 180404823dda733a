"""The decode engine: continuous batching over a fixed number of slots, one jitted decode program for every use.

Why: a static batch decodes until its longest row ends, so mixed-length work leaves most rows idle. Here each slot
holds one request; when a request ends its slot is free at the next call, and waiting requests are prefilled into
the free slots (several at once, left-padded to a bucketed width, long prompts in chunks: sampler.prefill) while the
other slots keep their caches; a request whose prompt another slot holds (n samples of a prompt) copies that slot's
prompt cache instead of a prefill. Every slot has its own KV-cache write index (KVCache.per_row), positions, sampling
settings, stop ids, token budget, length rule and random stream, so a request's output under a seed does not depend
on which requests share the batch: its key is fold_in(key(seed), sample_id) and step t draws with fold_in(key, t),
exactly as sampler.row_keys / step_keys (the static sampler's streams; `Sampler` and `GuidedSampler` now run here).

One decode program (`_decode`) serves plain generation (a generator: start / advance) and guided generation (any
GuidedModels: a shared trunk, a generator + LenVM Pair, the synthetic models): each step the LenVM scores the k
candidates of every slot in one forward (guided_models.py); a slot without a length rule samples from its whole
filtered distribution (its draw is put in candidate 0 and chosen, so the scorer's forward also commits it), which
equals plain sampling with the same seed. The program runs up to `steps_per_call` steps on the device
(lax.while_loop) and, when requests are waiting, stops as soon as a slot ends so the host can refill it. When no
request waits and at most half the slots are busy (a workload's tail), it runs over just the busy slots, gathered
into a power-of-two batch and put back after (`_decode_rows`), so the last long answers do not pay for idle slots.

Threads: one thread calls step() (the server's engine thread, or generate()); others may submit() and cancel().
Longer than most modules (~400 lines): the device program and the host bookkeeping share the slot layout, so the
one decode loop stays in one file.
"""

import collections
import dataclasses
import functools
import itertools
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lenvm_jax import sharding
from lenvm_jax.decoding import sampler
from lenvm_jax.decoding.eos import check_in_vocabulary
from lenvm_jax.decoding.guided import RULES, LengthRequest, choose, request_arrays
from lenvm_jax.model.kv_cache import KVCache

MAX_STOP_IDS = 8  # Stop ids per request besides the engine's EOS ids.
ADMISSIONS = ("continuous", "static")  # static: refill only when every slot is free (a static batch; benchmarks).


@dataclasses.dataclass(frozen=True)
class Request:
  """One completion to generate: the prompt's token ids, its budget, its sampling settings and length rule."""
  prompt: tuple[int, ...]
  max_new_tokens: int
  temperature: float = 1.0  # 0 = greedy (argmax of the raw logits).
  top_k: int = 0  # 0 = off.
  top_p: float = 1.0  # 1 = off.
  min_p: float = 0.0  # 0 = off.
  seed: int = 0
  sample_id: int = 0  # The random stream within the seed: n completions of one prompt use 0 .. n-1.
  length: LengthRequest | None = None  # A length rule (guided.py); needs an engine with a LenVM.
  stop_token_ids: tuple[int, ...] = ()  # Ids that end the request besides the engine's EOS ids (included in output).


@dataclasses.dataclass
class Completion:
  request_id: int
  tokens: np.ndarray  # Generated ids; the stop / EOS id is the last one when finish_reason == "stop".
  finish_reason: str  # "stop" (an EOS or stop id), "length" (max_new_tokens), "cancelled".
  logits: np.ndarray | None  # The LenVM's z of the state after each token (-inf after a stop id), else None.
  prompt_tokens: int


@dataclasses.dataclass
class _Running:
  """Host-side record of a request in a slot (or waiting for one)."""
  request_id: int
  request: Request
  on_tokens: Callable | None
  tokens: list = dataclasses.field(default_factory=list)
  logits: list = dataclasses.field(default_factory=list)


def _put_rows(engine_state, new_state, rows):
  """engine_state with rows[i] replaced by new_state's row i (batch on axis 0, KV caches on their own layout)."""
  def put(mine, theirs):
    if isinstance(mine, KVCache):
      return mine.put_rows(rows, theirs)
    return mine.at[rows].set(theirs.astype(mine.dtype), mode="drop")
  return jax.tree.map(put, engine_state, new_state, is_leaf=lambda x: isinstance(x, KVCache))


def _per_row_caches(state):
  return jax.tree.map(lambda x: x.per_row() if isinstance(x, KVCache) else x, state,
                      is_leaf=lambda x: isinstance(x, KVCache))


def _step_keys(seeds, sample_ids, steps):
  """[B] keys of each slot's next step: sampler.step_keys(sampler.row_keys(seed, sample_id), step) per slot."""
  return jax.vmap(lambda seed, sample, step: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), sample),
                                                                step))(seeds, sample_ids, steps)


def _stop_at(slots, token, step_count):
  """Whether each slot's new token ends it: an EOS / stop id, or its budget spent."""
  stopped = jnp.any(token[:, None] == slots["stop_ids"], axis=-1)
  return stopped, stopped | (step_count >= slots["max_new"])


def _decode(models, num_candidates: int, filter_style: str, gamma: float, max_steps: int, params, slots: dict, keep,
            stop_early):
  """Up to max_steps decode steps of every live slot.

  slots: the device state (models' state, next-token logits, per-slot settings; see Engine._empty_slots). keep [B]:
  slots the host still wants (a cancelled request's slot stops). stop_early: end the call as soon as a slot ends
  (requests are waiting for one). Returns (slots, tokens [B, max_steps], logits z [B, max_steps], emitted [B], steps run)."""
  slots = {**slots, "live": slots["live"] & keep}
  batch, width = slots["live"].shape[0], max_steps
  guided = num_candidates > 0

  def keep_going(carry):
    step, slots, _, _, emitted, ended = carry
    return (step < max_steps) & jnp.any(slots["live"]) & ~(stop_early & jnp.any(ended))

  def step_once(carry):
    step, slots, out, out_z, emitted, ended = carry
    live, logits = slots["live"], slots["logits"]
    keys = _step_keys(slots["seed"], slots["sample_id"], slots["generated"])
    filtered = sampler.filter_rows(logits, slots["temperature"], slots["top_k"], slots["top_p"], slots["min_p"],
                                   filter_style)
    drawn = sampler.sample_rows(logits, filtered, slots["temperature"], keys)
    positions = slots["positions"]
    if guided:
      candidate_logits, candidates = jax.lax.top_k(filtered, num_candidates)
      unguided = slots["rows"]["rule"] == RULES.index("none")
      candidates = candidates.at[:, 0].set(jnp.where(unguided, drawn, candidates[:, 0]))
      z, pending = models.score(params, slots["state"], candidates, positions)
      is_eos = jnp.any(candidates[..., None] == slots["stop_ids"][:, None, :], axis=-1)
      choice = choose(candidate_logits, z, is_eos, slots["generated"], keys, slots["rows"], gamma)
      choice = jnp.where(unguided, 0, choice)
      token = jnp.take_along_axis(candidates, choice[:, None], axis=1)[:, 0]
      token_z = jnp.take_along_axis(z, choice[:, None], axis=1)[:, 0]
      state, logits = models.commit(params, slots["state"], pending, choice, token, positions)
    else:
      token, token_z = drawn, jnp.zeros((batch,), jnp.float32)
      state, logits = models.advance(params, slots["state"], token, positions)
    generated = slots["generated"] + 1
    stopped, ends = _stop_at(slots, token, generated)
    column = jnp.minimum(emitted, width - 1)
    out = out.at[jnp.arange(batch), column].set(jnp.where(live, token, sampler.PAD_ID))
    out_z = out_z.at[jnp.arange(batch), column].set(jnp.where(live & ~stopped, token_z, -jnp.inf))
    slots = {**slots, "state": state, "logits": logits,
             "positions": jnp.where(live, positions + 1, positions), "generated": jnp.where(live, generated, 0),
             "live": live & ~ends}
    return step + 1, slots, out, out_z, emitted + live, ended | (live & ends)

  zeros = jnp.zeros((batch,), jnp.int32)
  carry = (jnp.zeros((), jnp.int32), slots, jnp.full((batch, width), sampler.PAD_ID, jnp.int32),
           jnp.full((batch, width), -jnp.inf, jnp.float32), zeros, jnp.zeros((batch,), bool))
  steps, slots, out, out_z, emitted, _ = jax.lax.while_loop(keep_going, step_once, carry)
  return slots, out, out_z, emitted, steps


def _take_rows(slots: dict, rows):
  """The slots `rows` ([b]) as a b-slot device state (batch on axis 0, KV caches on their own layout)."""
  take = lambda x: x.take_rows(rows) if isinstance(x, KVCache) else x[rows]
  return jax.tree.map(take, slots, is_leaf=lambda x: isinstance(x, KVCache))


def _decode_rows(decode, params, slots: dict, rows, keep, stop_early):
  """`decode` over only the slots `rows` ([b], b < B): when few slots are busy, a step costs b rows, not B (the
  tail of a workload, where the last long answers run alone). Returns what decode returns, rows in `rows` order."""
  part, tokens, logits, emitted, steps = decode(params, _take_rows(slots, rows), keep[rows], stop_early)
  return _put_rows(slots, part, rows), tokens, logits, emitted, steps


def _admit(models, cache_len: int, params, slots: dict, rows, prompt_tokens, prompt_lengths, settings: dict):
  """Prefills G left-padded prompts and puts them in slots `rows` ([G]; an index >= B is a padding row, dropped)."""
  state, logits = models.start(params, prompt_tokens, prompt_lengths, cache_len)
  state = _put_rows(slots["state"], _per_row_caches(state), rows)
  width = jnp.full(rows.shape, prompt_tokens.shape[1], jnp.int32)  # Every cache's write index after the prefill.
  return _start_rows(slots, state, rows, logits, prompt_lengths, width, settings)


def _fork(slots: dict, rows, sources, prompt_lengths, settings: dict):
  """Starts slots `rows` ([G]; >= B: padding, dropped) on the prompts that slots `sources` already hold, without a
  prefill: each cache's prompt part (the slots before the source's prompt_end) is copied, the source's generated
  tokens are left invalid, and the next-token logits are those the source's prefill ended with."""
  end = slots["prompt_end"][sources]

  def prompt_part(cache):
    part = cache.take_rows(sources)
    before_end = jnp.arange(cache.max_len)[None] < end[:, None]
    return cache.put_rows(rows, part.replace(valid=part.valid & before_end, index=end))
  state = jax.tree.map(prompt_part, slots["state"], is_leaf=lambda x: isinstance(x, KVCache))
  return _start_rows(slots, state, rows, slots["prompt_logits"][sources], prompt_lengths, end, settings)


def _start_rows(slots: dict, state, rows, logits, prompt_lengths, prompt_end, settings: dict):
  """slots with `rows` starting a request: its models' state (already in `state`), next-token logits, positions and
  settings; the logits and cache end are kept so later requests with the same prompt can fork from it."""
  put = lambda mine, theirs: mine.at[rows].set(theirs.astype(mine.dtype), mode="drop")
  out = {**slots, "state": state, "logits": put(slots["logits"], logits),
         "prompt_logits": put(slots["prompt_logits"], logits), "prompt_end": put(slots["prompt_end"], prompt_end),
         "positions": put(slots["positions"], prompt_lengths), "generated": put(slots["generated"], 0 * rows),
         "live": put(slots["live"], jnp.ones(rows.shape, bool)),
         "rows": {name: put(slots["rows"][name], value) for name, value in settings.pop("rows").items()}}
  return {**out, **{name: put(slots[name], value) for name, value in settings.items()}}


class Engine:
  """Continuous-batching generation on a mesh: `slots` requests decode at once (batch over data x fsdp).

  models: a generator (start / advance, e.g. guided_models.TransformerGenerator) when num_candidates == 0, else any
  GuidedModels (start / score / commit) scoring num_candidates candidates per step. Prompts up to max_prompt_len
  tokens and up to max_new_tokens generated tokens fit every slot's cache."""

  def __init__(self, models, params, mesh, *, eos_ids: Sequence[int], slots: int = 16, max_prompt_len: int = 512,
               max_new_tokens: int = 256, num_candidates: int = 0, filter_style: str = "hf",
               steps_per_call: int = 16, admission: str = "continuous"):
    sampler.check_batch_size(mesh, slots)
    if admission not in ADMISSIONS:
      raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
    if filter_style not in sampler.FILTER_STYLES:
      raise ValueError(f"filter_style must be one of {sampler.FILTER_STYLES}, got {filter_style!r}")
    if not 0 <= num_candidates <= models.vocab_size:
      raise ValueError(f"num_candidates must lie in [0, {models.vocab_size}], got {num_candidates}")
    if max_prompt_len < 1 or max_new_tokens < 1 or steps_per_call < 1:
      raise ValueError("max_prompt_len, max_new_tokens and steps_per_call must be positive")
    self.eos_ids = tuple(int(i) for i in eos_ids)
    check_in_vocabulary(self.eos_ids, models.vocab_size, "eos_ids", "the generator")
    self.models, self.params, self.mesh = models, params, mesh
    self.slots, self.num_candidates, self.admission = slots, num_candidates, admission
    self.max_new_tokens, self.steps_per_call = max_new_tokens, steps_per_call
    self.max_prompt_width = sampler.bucket_width(max_prompt_len, 8)
    self.max_prompt_len = max_prompt_len
    self.cache_len = self.max_prompt_width + max_new_tokens
    self._per_row = sharding.batch_sharding(mesh, 1)
    self._rows = sharding.batch_sharding(mesh, 2)
    gamma = getattr(models, "gamma", 1.0) if num_candidates else 1.0
    decode = functools.partial(_decode, models, num_candidates, filter_style, gamma, steps_per_call)
    self._decode = jax.jit(decode, donate_argnums=1)
    self._decode_rows = jax.jit(functools.partial(_decode_rows, decode), donate_argnums=1)
    self._admit = jax.jit(functools.partial(_admit, models, self.cache_len), donate_argnums=1)
    self._fork = jax.jit(_fork, donate_argnums=0)
    # A request whose prompt a slot already holds (n samples of one prompt, rollouts) copies that slot's prompt
    # cache instead of a prefill: possible when the models' whole state is KV caches (not the synthetic models).
    with jax.set_mesh(mesh):
      empty = jax.eval_shape(self._empty_program(), params)
    self.share_prompts = all(isinstance(leaf, KVCache) for leaf in jax.tree.leaves(
        empty["state"], is_leaf=lambda x: isinstance(x, KVCache)))
    self._lock = threading.Lock()
    self._waiting: collections.deque[_Running] = collections.deque()
    self._cancelled: set[int] = set()
    self._in_slot: list[_Running | None] = [None] * slots
    self._ids = itertools.count()
    self._device_slots = None  # Built on the first step (one prefill compile), so an unused engine costs nothing.
    self.generated_tokens = 0
    self.prefilled_prompts = self.shared_prompts = 0  # Admissions by prefill / by copying another slot's prompt.

  # Requests.
  def check(self, request: Request) -> None:
    """Raises ValueError naming the field when this engine cannot serve the request."""
    vocab = self.models.vocab_size
    if not request.prompt:
      raise ValueError("prompt is empty")
    if len(request.prompt) > self.max_prompt_len:
      raise ValueError(f"prompt has {len(request.prompt)} tokens, more than this engine's max_prompt_len "
                       f"{self.max_prompt_len}")
    if min(request.prompt) < 0 or max(request.prompt) >= vocab:
      raise ValueError(f"prompt has a token id outside the vocabulary [0, {vocab})")
    if not 1 <= request.max_new_tokens <= self.max_new_tokens:
      raise ValueError(f"max_new_tokens must lie in [1, {self.max_new_tokens}], got {request.max_new_tokens}")
    # The sampling settings' own checks (one place: SamplingConfig).
    sampler.SamplingConfig(request.max_new_tokens, self.eos_ids, request.temperature, request.top_k,
                           request.top_p, request.min_p, request.seed)
    if not 0 <= request.seed < 2**31 or not 0 <= request.sample_id < 2**31:
      raise ValueError(f"seed and sample_id must lie in [0, 2**31), got {request.seed}, {request.sample_id}")
    if len(request.stop_token_ids) > MAX_STOP_IDS or any(not 0 <= i < vocab for i in request.stop_token_ids):
      raise ValueError(f"stop_token_ids: at most {MAX_STOP_IDS} ids in [0, {vocab})")
    rule = request.length.rule if request.length else "none"
    if rule != "none":
      if not self.num_candidates:
        raise ValueError(f"length rule {rule!r} needs a LenVM: this engine generates without one")
      if request.temperature == 0:
        raise ValueError("a length rule samples among candidates: temperature must be > 0")
      if rule in ("equal_to", "at_least", "eq_soft") and request.length.target > request.max_new_tokens and \
          not np.isfinite(request.length.target_value):
        raise ValueError(f"{rule} {request.length.target} tokens cannot be met within max_new_tokens = "
                         f"{request.max_new_tokens}; raise max_new_tokens or lower the target")

  def submit(self, request: Request, on_tokens: Callable | None = None) -> int:
    """Queues a request (checked first); on_tokens(request_id, new_ids, new_logits) hears its tokens as they come."""
    self.check(request)
    return self._queue(request, on_tokens)

  def _queue(self, request: Request, on_tokens: Callable | None = None) -> int:
    with self._lock:
      request_id = next(self._ids)
      self._waiting.append(_Running(request_id, request, on_tokens))
    return request_id

  def cancel(self, request_id: int) -> None:
    with self._lock:
      self._cancelled.add(request_id)

  def has_work(self) -> bool:
    with self._lock:
      return bool(self._waiting) or any(r is not None for r in self._in_slot)

  @property
  def stats(self) -> dict:
    with self._lock:
      return dict(slots=self.slots, busy_slots=sum(r is not None for r in self._in_slot),
                  waiting=len(self._waiting), generated_tokens=self.generated_tokens,
                  prefilled_prompts=self.prefilled_prompts, shared_prompts=self.shared_prompts)

  def generate(self, requests: Sequence[Request], on_completion: Callable | None = None) -> list[Completion]:
    """Every request to its end, returned in input order (the offline use: rollouts, evaluation);
    on_completion(completion) hears each as it ends (progress)."""
    for i, request in enumerate(requests):  # All checked before any is queued; the error names the request.
      try:
        self.check(request)
      except ValueError as e:
        raise ValueError(f"request {i}: {e}") from None
    ids = [self._queue(request) for request in requests]
    done = {}
    while len(done) < len(ids):
      for completion in self.step():
        done[completion.request_id] = completion
        if on_completion:
          on_completion(completion)
    return [done[i] for i in ids]

  def warm_up(self, prompt_lengths: Sequence[int] = ()) -> None:
    """Compiles every admission shape for prompts of these lengths (default: every width up to max_prompt_len) and
    the decode program, without touching a slot: a server answers its first requests, and a benchmark times its
    run, without compiling."""
    if any(r is not None for r in self._in_slot):
      raise RuntimeError("warm_up runs before any request takes a slot")
    if self._device_slots is None:
      self._device_slots = self._empty_slots()
    widths = sorted({sampler.bucket_width(n, 8) for n in prompt_lengths} or
                    [w for w in (8 << i for i in range(24)) if w <= self.max_prompt_width])
    for group in sorted({size for n in range(1, self.slots + 1) for size in self._group_sizes(n)}):
      rows = np.full(group, self.slots, np.int32)  # Every row out of range: dropped, nothing admitted.
      settings, ones = self._settings([Request((sampler.PAD_ID,), 1)] * group), np.ones(group, np.int32)
      with jax.set_mesh(self.mesh):
        for width in widths:
          self._device_slots = self._admit(self.params, self._device_slots, rows, np.zeros((group, width), np.int32),
                                           ones, settings)
        if self.share_prompts:
          self._device_slots = self._fork(self._device_slots, rows, 0 * ones, ones, settings)
    with jax.set_mesh(self.mesh):
      keep = jax.device_put(np.zeros(self.slots, bool), self._per_row)
      self._device_slots = self._decode(self.params, self._device_slots, keep, False)[0]
      for width in self._decode_widths()[1:]:
        self._device_slots = self._decode_rows(self.params, self._device_slots, np.arange(width, dtype=np.int32),
                                               keep, False)[0]

  # The loop.
  def step(self) -> list[Completion]:
    """Admits waiting requests into free slots, runs up to steps_per_call decode steps, returns what ended."""
    ended = self._drop_cancelled()
    if self._device_slots is None:
      self._device_slots = self._empty_slots()
    self._admit_waiting()
    keep = np.asarray([r is not None for r in self._in_slot])
    if not keep.any():
      return ended
    with self._lock:
      stop_early = bool(self._waiting) and self.admission == "continuous"
    busy = np.flatnonzero(keep)
    width = self._decode_width(len(busy)) if not stop_early else self.slots
    with jax.set_mesh(self.mesh):
      if width == self.slots:
        self._device_slots, tokens, logits, emitted, _ = self._decode(
            self.params, self._device_slots, jax.device_put(keep, self._per_row), stop_early)
      else:  # Few busy slots and none waiting: decode just those (padded with free ones to a power of two).
        rows = np.concatenate([busy, np.flatnonzero(~keep)[:width - len(busy)]]).astype(np.int32)
        self._device_slots, part_tokens, part_logits, part_emitted, _ = self._decode_rows(
            self.params, self._device_slots, rows, jax.device_put(keep, self._per_row), False)
        part = jax.device_get((part_tokens, part_logits, part_emitted))
        tokens, logits, emitted = (np.zeros((self.slots,) + x.shape[1:], x.dtype) for x in part)
        for full, x in zip((tokens, logits, emitted), part):
          full[rows] = x
      live = self._device_slots["live"]
    tokens, logits, emitted, live = jax.device_get((tokens, logits, emitted, live))
    for slot, running in enumerate(self._in_slot):
      if running is None or not emitted[slot]:
        continue
      new_tokens, new_logits = tokens[slot, :emitted[slot]], logits[slot, :emitted[slot]]
      running.tokens.extend(new_tokens.tolist())
      running.logits.extend(new_logits.tolist())
      self.generated_tokens += int(emitted[slot])
      if running.on_tokens:
        running.on_tokens(running.request_id, new_tokens, new_logits if self.num_candidates else None)
      if not live[slot]:
        stopped = running.tokens[-1] in self.eos_ids + running.request.stop_token_ids
        ended.append(self._finish(slot, "stop" if stopped else "length"))
    return ended

  def _finish(self, slot: int, reason: str) -> Completion:
    running = self._in_slot[slot]
    with self._lock:
      self._in_slot[slot] = None
    return Completion(running.request_id, np.asarray(running.tokens, np.int32), reason,
                      np.asarray(running.logits, np.float32) if self.num_candidates else None,
                      len(running.request.prompt))

  def _drop_cancelled(self) -> list[Completion]:
    with self._lock:
      cancelled, self._cancelled = self._cancelled, set()
      waiting = [r for r in self._waiting if r.request_id in cancelled]
      self._waiting = collections.deque(r for r in self._waiting if r.request_id not in cancelled)
    out = [Completion(r.request_id, np.zeros(0, np.int32), "cancelled", None, len(r.request.prompt))
           for r in waiting]
    for slot, running in enumerate(self._in_slot):
      if running is not None and running.request_id in cancelled:
        out.append(self._finish(slot, "cancelled"))
    return out

  def _admit_waiting(self) -> None:
    free = [slot for slot, r in enumerate(self._in_slot) if r is None]
    if not free or (self.admission == "static" and len(free) < self.slots):
      return
    with self._lock:
      taken = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
      for slot, running in zip(free, taken):
        self._in_slot[slot] = running
    if not taken:
      return
    # A prompt a slot already holds (or one admitted just before it here) is copied from that slot: n samples of a
    # prompt cost one prefill. A slot's prompt part stays intact while it decodes; `holder` lists only slots that
    # are not being refilled now.
    assigned = dict(zip(free, taken))
    holder = {} if not self.share_prompts else {
        r.request.prompt: slot for slot, r in enumerate(self._in_slot) if r is not None and slot not in assigned}
    fresh, forks = [], []
    for slot, running in assigned.items():
      prompt = running.request.prompt
      if prompt in holder:
        forks.append((slot, running))
      else:
        fresh.append((slot, running))
        if self.share_prompts:
          holder[prompt] = slot
    self._prefill_into([slot for slot, _ in fresh], [r.request for _, r in fresh])
    for start, group in self._groups(len(forks)):
      chunk = forks[start:start + group]
      with jax.set_mesh(self.mesh):
        self._device_slots = self._fork(
            self._device_slots, np.asarray([slot for slot, _ in chunk], np.int32),
            np.asarray([holder[r.request.prompt] for _, r in chunk], np.int32),
            np.asarray([len(r.request.prompt) for _, r in chunk], np.int32),
            self._settings([r.request for _, r in chunk]))
    self.prefilled_prompts += len(fresh)
    self.shared_prompts += len(forks)

  def _prefill_into(self, free: Sequence[int], requests: Sequence[Request]) -> None:
    # Prefill costs what its padded tokens cost: requests sorted by prompt length go in power-of-two groups (5 =
    # 4 + 1), each left-padded to its own bucketed width, so no row is padding and widths stay tight; few shapes.
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
    for start, group in self._groups(len(requests)):
      chunk = [requests[i] for i in order[start:start + group]]
      tokens, lengths = sampler.left_pad([r.prompt for r in chunk],
                                         sampler.bucket_width(max(len(r.prompt) for r in chunk), 8))
      rows = np.asarray([free[i] for i in order[start:start + group]], np.int32)
      with jax.set_mesh(self.mesh):
        self._device_slots = self._admit(self.params, self._device_slots, rows, tokens, lengths,
                                         self._settings(chunk))

  def _groups(self, admitted: int):
    """(start, size) of each power-of-two group of `admitted` requests (_group_sizes)."""
    start = 0
    for group in self._group_sizes(admitted):
      yield start, group
      start += group

  def _decode_widths(self) -> list[int]:
    """The batch widths the decode program runs at: every slot, and powers of two below half of them (a multiple of
    the mesh's batch shards) for the tail."""
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    return [self.slots] + [w for w in (1 << i for i in range(self.slots.bit_length()))
                           if w % shards == 0 and w <= self.slots // 2]

  def _decode_width(self, busy: int) -> int:
    return min(w for w in self._decode_widths() if w >= busy)

  def _group_sizes(self, admitted: int) -> list[int]:
    """Powers of two summing to `admitted`, largest first (at most the largest power of two <= slots)."""
    largest = 1 << (self.slots.bit_length() - 1)
    sizes = [largest] * (admitted // largest)
    rest = admitted % largest
    return sizes + [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]

  def _settings(self, requests: Sequence[Request]) -> dict:
    column = lambda get, dtype: np.asarray([get(r) for r in requests], dtype)
    stop_ids = np.full((len(requests), MAX_STOP_IDS + len(self.eos_ids)), -1, np.int32)
    for i, r in enumerate(requests):
      ids = self.eos_ids + tuple(r.stop_token_ids)
      stop_ids[i, :len(ids)] = ids
    settings = dict(temperature=column(lambda r: r.temperature, np.float32), top_k=column(lambda r: r.top_k, np.int32),
                    top_p=column(lambda r: r.top_p, np.float32), min_p=column(lambda r: r.min_p, np.float32),
                    max_new=column(lambda r: r.max_new_tokens, np.int32), stop_ids=stop_ids,
                    seed=column(lambda r: r.seed, np.int32), sample_id=column(lambda r: r.sample_id, np.int32))
    if self.num_candidates:
      settings["rows"] = request_arrays([r.length or LengthRequest() for r in requests])
    else:
      settings["rows"] = {}
    return settings

  def _empty_program(self):
    """A function params -> the device state of `slots` free slots (every field [B, ...]; the models' state from a
    dummy prefill)."""
    dummy = [Request((sampler.PAD_ID,), 1)] * self.slots
    settings = self._settings(dummy)
    tokens, lengths = sampler.left_pad([r.prompt for r in dummy], 8)

    def empty_slots(params):
      state, logits = self.models.start(params, tokens, lengths, self.cache_len)
      return {"state": _per_row_caches(state), "logits": logits, "prompt_logits": logits,
              "prompt_end": jnp.zeros(self.slots, jnp.int32), "positions": jnp.zeros(self.slots, jnp.int32),
              "generated": jnp.zeros(self.slots, jnp.int32), "live": jnp.zeros(self.slots, bool), **settings}
    return empty_slots

  def _empty_slots(self) -> dict:
    with jax.set_mesh(self.mesh):
      return jax.jit(self._empty_program())(self.params)

  def lower(self):
    """The decode program lowered without running it (self.params may be ShapeDtypeStructs): what
    experiments/compile_check.py compiles for a TPU topology (--steps=decode)."""
    with jax.set_mesh(self.mesh):
      slots = jax.eval_shape(self._empty_program(), self.params)
      return self._decode.lower(self.params, slots, jax.ShapeDtypeStruct((self.slots,), bool, sharding=self._per_row),
                                False)
