"""Frozen-trunk feature cache: the frozen bottom layers' output, computed once per training record, read back by every
step so that a step runs only the layers above it (train.feature_cache = "auto").

With train.trainable_layers = K of N layers (or train.freeze_trunk: all N), the embeddings and the bottom N - K layers
never change, so the residual stream entering layer N - K is a fixed function of a record's row tokens (a row's
positions restart at 0 and attention never crosses segments, so packing does not change it). The cache holds it per
record, [n, H] for a row of n tokens, and the pipeline packs it with the tokens (data/pipeline.WithFeatures); the
train step then runs layers [N - K, N) (model.hidden_states_from), so a step costs K layers instead of N.

Layout of a cache directory:
  features-<shard:05d>.npy  [tokens, H] of consecutive records (bfloat16 stored as its uint16 bits, or float32)
  index.npy                 [records, 3] int64: (shard, first row, length); length 0 = a record training never reads
  digests.npy               [records, 8] uint8: blake2b of each record's row tokens (all zero when not cached)
  cache.json                written last: the key (frozen weights' digest, model shape, layers, dtype) and sizes
A cache whose key or record digests differ from this run's (other weights, records or row settings) is refused with
a ConfigError that says what differs. Disk: hidden_size x 2 bytes per token in bfloat16 (x 4 in float32).
"""

import dataclasses
import hashlib
import json
import os
import threading
import time

import jax
import ml_dtypes
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from flax import nnx

from lenvm_jax import files, progress, sharding
from lenvm_jax.config import ConfigError, RunConfig
from lenvm_jax.data import pipeline, rows as rows_lib
from lenvm_jax.model import transformer

VERSION = 1
MANIFEST, INDEX, DIGESTS = "cache.json", "index.npy", "digests.npy"
# A build in progress: the chunks done so far (their shards are on disk) and their index rows. A build stopped by a
# kill or the end of a session goes on from its last whole chunk when started again with the same key and records.
PARTIAL, PARTIAL_INDEX = "partial.json", "partial_index.npy"
SHARD_BYTES = 256 << 20  # Features per shard file.
FIELD = "config.train.feature_cache_dir"
# Row lengths the cache computes at (each is one compile): powers of two from MIN_BUCKET, and data.max_len.
MIN_BUCKET = 64
# Model fields that do not change what the frozen layers compute.
_IGNORED_MODEL_FIELDS = ("init_from", "remat", "dropout_rate", "candidate_head", "attention")


def frozen_layers(run: RunConfig) -> int:
  """Decoder layers whose output is fixed for the whole run: N under freeze_trunk, N - K under trainable_layers."""
  if run.train.freeze_trunk:
    return run.model.num_layers
  return max(run.model.num_layers - run.train.trainable_layers, 0) if run.train.trainable_layers else 0


def directory(run: RunConfig, workdir: str) -> str:
  return run.train.feature_cache_dir or os.path.join(workdir, "feature_cache")


def _digest(array) -> bytes:
  return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=8).digest()


def record_digests(run: RunConfig, source) -> np.ndarray:
  """[records, 8] uint8: each record's row-token digest under the run's data settings; zeros for records training
  drops (data.unfinished='drop'), which the cache skips."""
  to_row = pipeline.row_maker(run, pad=False)
  out = np.zeros((len(source), 8), np.uint8)
  for i in range(len(source)):
    trajectory = source[i]
    if run.data.unfinished == "drop" and not trajectory.finished:
      continue
    out[i] = np.frombuffer(_digest(to_row(trajectory)[rows_lib.TOKENS]), np.uint8)
  return out


def weights_key(run: RunConfig, params) -> dict:
  """What the frozen part computes from: its weights' digest (embedding + bottom layers), the model fields that shape
  them, the layer count and the stored dtype."""
  frozen = frozen_layers(run)
  h = hashlib.sha256()
  bottom = {"embedding": params["embedding"], "layers": jax.tree.map(lambda a: a[:frozen], params["layers"])}
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(bottom), key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    whole = leaf if getattr(leaf, "is_fully_addressable", True) else multihost_utils.process_allgather(leaf, tiled=True)
    h.update(np.asarray(jax.device_get(whole), np.float32).tobytes())
  model = {k: v for k, v in dataclasses.asdict(run.model).items() if k not in _IGNORED_MODEL_FIELDS}
  return {"version": VERSION, "weights": h.hexdigest(), "model": model, "frozen_layers": frozen,
          "dtype": run.train.feature_cache_dtype}


class FeatureReader:
  """Record i's cached features [n, H] as features[i], from the cache at `path`.

  The trainer builds the data iterator (whose prefetch threads start reading at once) before the weights that the
  cache is checked against exist, so reads wait until `attach()` says the cache is checked or built; `release()`
  (the run failed first) makes them raise instead. A copy pickled for a grain worker process before attach() waits
  for the cache's manifest on disk (workers end with the run). The memory maps are reopened in each process."""

  def __init__(self, path: str):
    self.path = path
    self._attached, self._ready = threading.Event(), False
    self._index = self._shards = self._dtype = None

  def attach(self):
    self._ready = True
    self._attached.set()

  def release(self):
    self._attached.set()

  def _open(self):
    if not self._ready:
      self._attached.wait()
      if not self._ready:
        raise RuntimeError(f"the feature cache at {self.path} was not made ready (the run stopped first)")
    manifest = read_manifest(self.path)
    while manifest is None and self._pickled:  # A worker process: the trainer writes the manifest last.
      time.sleep(0.2)
      manifest = read_manifest(self.path)
    self._dtype = ml_dtypes.bfloat16 if manifest["key"]["dtype"] == "bfloat16" else np.float32
    self._shards = [np.load(os.path.join(self.path, name), mmap_mode="r") for name in manifest["shards"]]
    self._index = np.load(os.path.join(self.path, INDEX))  # Last: other threads read once it is set.

  _pickled = False

  def __getitem__(self, i):
    if self._index is None:
      self._open()
    shard, start, length = (int(x) for x in self._index[i])
    return np.asarray(self._shards[shard][start:start + length]).view(self._dtype)

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])
    self._pickled = self._ready = True  # Waits for the manifest on disk instead of the event.


def read_manifest(path: str) -> dict | None:
  try:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def check(manifest: dict, key: dict, digests: np.ndarray, path: str):
  """Refuses a cache built for other weights, model, layers, dtype or records."""
  stored = manifest["key"]
  for name, what in (("version", "cache format differs"), ("frozen_layers", "number of frozen layers differs"),
                     ("dtype", "dtype differs"), ("model", "model shape differs"),
                     ("weights", "frozen weights (embedding and bottom layers) differ")):
    if stored.get(name) != key[name]:
      detail = "" if name == "weights" else f" ({stored.get(name)!r}, this run {key[name]!r})"
      raise ConfigError(f"{FIELD}: the feature cache at {path} is stale: its {what} from this run's{detail}; delete "
                        "it to rebuild, or give a new directory")
  cached = np.load(os.path.join(path, DIGESTS))
  if cached.shape != digests.shape or not np.array_equal(cached, digests):
    differ = (f"it holds {len(cached)} records, this run's split {len(digests)}" if cached.shape != digests.shape
              else f"record {int(np.flatnonzero(np.any(cached != digests, axis=1))[0])} differs")
    raise ConfigError(f"{FIELD}: the feature cache at {path} is stale: built from other records or row settings "
                      f"(data.max_len, max_prompt_len, unfinished, ...): {differ}; delete it to rebuild, or give a "
                      "new directory")


def _buckets(max_len: int) -> list[int]:
  sizes, size = [], MIN_BUCKET
  while size < max_len:
    sizes.append(size)
    size *= 2
  return sizes + [max_len]


def _batch_rows(run: RunConfig, mesh) -> int:
  """Rows per forward: the eval batch (already a multiple of the mesh's batch axes)."""
  divisor = mesh.shape["data"] * mesh.shape["fsdp"]
  return max(run.train.eval_batch_size // divisor, 1) * divisor


def _partial(path: str, plan: dict) -> dict | None:
  """The progress of a build stopped at `path`, if it was for the same weights, records and chunking."""
  try:
    with open(os.path.join(path, PARTIAL), encoding="utf-8") as f:
      progress_so_far = json.load(f)
  except FileNotFoundError:
    return None
  same = all(progress_so_far.get(name) == value for name, value in json.loads(json.dumps(plan)).items())
  if not same:
    logging.warning("feature cache: a stopped build at %s was for other weights, records or chunking: starting over",
                    path)
  return progress_so_far if same else None


def build(run: RunConfig, params, source, path: str, mesh, key: dict, digests: np.ndarray):
  """Computes the frozen layers' output for every record training reads and writes the cache at `path`."""
  if jax.process_count() > 1:
    raise ConfigError(f"{FIELD}: building the feature cache needs one process (this run has "
                      f"{jax.process_count()}); build it first by running the same config with one process and "
                      "this directory on a shared disk (--config.train.steps=1 will do), or set "
                      "config.train.feature_cache='off'")
  os.makedirs(path, exist_ok=True)
  start = time.perf_counter()
  frozen, hidden = key["frozen_layers"], run.model.hidden_size
  store = np.uint16 if key["dtype"] == "bfloat16" else np.float32
  cast = ml_dtypes.bfloat16 if key["dtype"] == "bfloat16" else np.float32
  graphdef, _ = transformer.abstract_model(run.model)
  rows_per_forward = _batch_rows(run, mesh)
  batch_sh = sharding.batch_shardings(mesh, {"x": np.zeros((1, 1))}, leading=0)["x"]

  @jax.jit
  def forward(params, tokens, positions, segment_ids):
    return nnx.merge(graphdef, params).layer_input(tokens, positions, segment_ids, frozen)

  to_row = pipeline.row_maker(run, pad=False)
  kept = [i for i in range(len(source)) if digests[i].any()]
  index = np.zeros((len(source), 3), np.int64)
  per_shard = max(SHARD_BYTES // (hidden * np.dtype(store).itemsize), run.data.max_len)
  shards, buffer, filled, total = [], [], 0, 0
  # Records are sorted by length within a chunk, so a forward pads little; a chunk's features stay in memory.
  chunk = rows_per_forward * max(SHARD_BYTES // 2 // (rows_per_forward * run.data.max_len * hidden * 4), 1)
  plan = {"key": key, "records": hashlib.sha256(digests.tobytes()).hexdigest(), "chunk": chunk,
          "per_shard": per_shard}
  done = _partial(path, plan)
  if done:
    shards, total = done["shards"], done["tokens"]
    index = np.load(os.path.join(path, PARTIAL_INDEX))
    logging.info("feature cache: going on from %d of %d records built before", done["records_done"], len(kept))

  def flush():
    nonlocal buffer, filled
    if not buffer:
      return
    name = f"features-{len(shards):05d}.npy"
    with files.atomic_path(os.path.join(path, name)) as temporary:
      with open(temporary, "wb") as f:
        np.save(f, np.concatenate(buffer))
    shards.append(name)
    buffer, filled = [], 0

  # The build runs the frozen layers over every record once (minutes to an hour on a CPU): a progress line.
  start_at = done["records_done"] if done else 0
  line = progress.ProgressLine("feature cache", len(kept), line_every_s=30, start=start_at)
  for first in range(start_at, len(kept), chunk):
    ids = kept[first:first + chunk]
    tokens_of = {i: to_row(source[i])[rows_lib.TOKENS] for i in ids}
    features = {}
    by_length = sorted(ids, key=lambda i: len(tokens_of[i]))
    for b in range(0, len(by_length), rows_per_forward):
      group = by_length[b:b + rows_per_forward]
      length = next(size for size in _buckets(run.data.max_len) if size >= len(tokens_of[group[-1]]))
      tokens = np.zeros((rows_per_forward, length), np.int32)
      segments = np.zeros((rows_per_forward, length), np.int32)
      for r, i in enumerate(group):
        n = len(tokens_of[i])
        tokens[r, :n], segments[r, :n] = tokens_of[i], 1
      positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
      out = forward(params, *(jax.device_put(a, batch_sh) for a in (tokens, positions, segments)))
      out = np.asarray(jax.device_get(out), np.float32).astype(cast).view(store)
      for r, i in enumerate(group):
        features[i] = out[r, :len(tokens_of[i])]
      line.update(first + b + len(group))
    for i in ids:
      if filled + len(features[i]) > per_shard:
        flush()
      index[i] = (len(shards), filled, len(features[i]))
      buffer.append(features[i])
      filled += len(features[i])
      total += len(features[i])
    flush()  # A chunk ends its shard, so the chunks done are whole files on disk.
    with files.atomic_path(os.path.join(path, PARTIAL_INDEX)) as temporary:
      with open(temporary, "wb") as f:
        np.save(f, index)
    files.write_atomic(os.path.join(path, PARTIAL), json.dumps(
        {**plan, "records_done": first + len(ids), "shards": shards, "tokens": total}))
  with files.atomic_path(os.path.join(path, INDEX)) as temporary:
    with open(temporary, "wb") as f:
      np.save(f, index)
  with files.atomic_path(os.path.join(path, DIGESTS)) as temporary:
    with open(temporary, "wb") as f:
      np.save(f, digests)
  size = total * hidden * np.dtype(store).itemsize
  files.write_atomic(os.path.join(path, MANIFEST), json.dumps(
      {"key": key, "records": len(source), "cached_records": len(kept), "tokens": total, "bytes": size,
       "hidden_size": hidden, "shards": shards}, indent=1))
  for name in (PARTIAL, PARTIAL_INDEX):
    if os.path.exists(os.path.join(path, name)):
      os.remove(os.path.join(path, name))
  logging.info("feature cache: %d records, %d tokens, %.1f MB at %s (%d frozen layers, %s) in %.1f s", len(kept),
               total, size / 1e6, path, frozen, key["dtype"], time.perf_counter() - start)


class FeatureCache:
  """The trainer's handle: `reader` goes into the data pipeline at once; `ready(params, mesh)` checks the cache at
  the run's directory against the weights (building it when absent) and attaches the reader."""

  def __init__(self, run: RunConfig, workdir: str, source):
    self.run, self.source = run, source
    self.path = directory(run, workdir)
    self.reader = FeatureReader(self.path)

  def ready(self, params, mesh) -> str:
    key = weights_key(self.run, params)
    digests = record_digests(self.run, self.source)
    manifest = read_manifest(self.path)
    if manifest is None:
      build(self.run, params, self.source, self.path, mesh, key, digests)
    else:
      check(manifest, key, digests, self.path)
      logging.info("feature cache: reusing %s (%d records, %.1f MB)", self.path, manifest["cached_records"],
                   manifest["bytes"] / 1e6)
    self.reader.attach()
    return self.path


def for_run(run: RunConfig, workdir: str, source) -> FeatureCache | None:
  """The run's feature cache, or None when train.feature_cache is off or no layer is frozen."""
  if run.train.feature_cache == "off":
    return None
  if not frozen_layers(run):
    logging.info("train.feature_cache='auto': no frozen layers (train.trainable_layers / freeze_trunk), no cache")
    return None
  if run.model.dropout_rate > 0:
    raise ConfigError(f"config.train.feature_cache: 'auto' caches the frozen layers' output, but "
                      f"model.dropout_rate={run.model.dropout_rate} draws new dropout masks in them every step; set "
                      "model.dropout_rate=0 or train.feature_cache='off'")
  return FeatureCache(run, workdir, source)
