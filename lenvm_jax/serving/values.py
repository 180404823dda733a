"""The LenVM itself over HTTP: the reference server's value endpoints and a length endpoint of ours.

The reference returns the value head's raw output z (its clients read V = -sigmoid(z) and the remaining length
log(1 + V) / log(gamma)), so these do too, in the discounted convention (lenvm_jax/value/targets.py), computed with the
run's Predictor (lenvm_jax/decoding/predict.py) and decoding/next_values.py:
  /encode, /token_value    z after every token of each sequence (the state ending at that token);
  /tree_value, /candidate_value  z(prefix + c) for each listed 1-token candidate c (the next-state scorer);
  /v1/length (ours)        V(s_0) and the predicted completion length at each prompt's boundary.
Shapes as the reference's: /encode and /tree_value answer {"embedding": [...], "meta_info": {...}} for one sequence
and a list of those for several; /token_value and /candidate_value answer {"values": [[...], ...], "meta_info": ...}.
"""

import threading

import numpy as np

from lenvm_jax.data.records import Trajectory
from lenvm_jax.decoding.next_values import next_values
from lenvm_jax.serving.protocol import RequestError, token_ids

MAX_SEQUENCES = 64
MAX_CANDIDATES = 256
_Z_LIMIT = 1e4  # |z| beyond this is a value of exactly 0 or -1 in any float: JSON has no infinities.


def _z_from_value(values) -> np.ndarray:
  u = np.clip(-np.asarray(values, np.float64), 0.0, 1.0)
  with np.errstate(divide="ignore"):
    return np.clip(np.log(u) - np.log1p(-u), -_Z_LIMIT, _Z_LIMIT)


def _z_from_remaining(remaining, gamma: float) -> np.ndarray:
  """z from the exact remaining length n (u = 1 - gamma ** n, z = log u - log(1 - u)): keeps z where V is -1."""
  log_w = np.asarray(remaining, np.float64) * np.log(gamma)
  with np.errstate(divide="ignore"):
    return np.clip(np.log(-np.expm1(log_w)) - log_w, -_Z_LIMIT, _Z_LIMIT)


class ValueService:
  """The value endpoints' computations on one Predictor (one at a time: they share its compiled programs)."""

  def __init__(self, predictor, tokenizer, max_tokens: int):
    self.predictor = predictor
    self.tokenizer = tokenizer
    self.max_tokens = max_tokens
    self.gamma = float(predictor.kind.gamma)
    self._lock = threading.Lock()

  def sequences(self, body, field: str = "input_ids") -> tuple[list[tuple[int, ...]], bool]:
    """(sequences, single) from input_ids (ids or a list of them) or text (a string or a list of them)."""
    if not isinstance(body, dict):
      raise RequestError(None, "the request body must be a JSON object")
    vocab = self.predictor.config.model.vocab_size
    raw = body.get(field)
    if raw is None and field == "input_ids" and body.get("text") is not None:
      if self.tokenizer is None:
        raise RequestError("text", "this server has no tokenizer (start it with --tokenizer): send input_ids")
      texts = body["text"]
      single = isinstance(texts, str)
      texts = [texts] if single else texts
      if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError("text", "must be a string or a non-empty list of strings")
      raw = [self.tokenizer.encode(t) for t in texts]
    else:
      if not isinstance(raw, list) or not raw:
        raise RequestError(field, "must be token ids or a non-empty list of token-id lists")
      single = not isinstance(raw[0], list)
      raw = [raw] if single else raw
    if len(raw) > MAX_SEQUENCES:
      raise RequestError(field, f"at most {MAX_SEQUENCES} sequences per request, got {len(raw)}")
    out = []
    for i, ids in enumerate(raw):
      name = field if single else f"{field}[{i}]"
      if not isinstance(ids, list):
        raise RequestError(name, "must be a list of token ids")
      ids = token_ids(ids, name, vocab)
      if len(ids) > self.max_tokens:
        raise RequestError(name, f"{len(ids)} tokens, more than this server's limit of {self.max_tokens}")
      out.append(ids)
    return out, single

  def encode(self, sequences) -> list[list[float]]:
    """z after every token: the sequence as a 1-token prompt plus the rest, so every state is scored."""
    trajectories = [Trajectory(np.asarray(ids[:1], np.int32), np.asarray(ids[1:], np.int32)) for ids in sequences]
    with self._lock:
      predictions = self.predictor.predict(trajectories)
    return [_z_from_remaining(remaining, self.gamma).tolist() for _, remaining in predictions]

  def candidates(self, sequences, candidate_ids) -> list[list[float]]:
    """z(prefix + c) for each candidate list (one list per sequence)."""
    vocab = self.predictor.config.model.vocab_size
    if not isinstance(candidate_ids, list) or len(candidate_ids) != len(sequences):
      raise RequestError("candidate_ids", f"must be one list of candidate ids per sequence ({len(sequences)})")
    lists = []
    for i, ids in enumerate(candidate_ids):
      name = f"candidate_ids[{i}]"
      if not isinstance(ids, list) or len(ids) > MAX_CANDIDATES:
        raise RequestError(name, f"must be a list of at most {MAX_CANDIDATES} token ids")
      lists.append(token_ids(ids, name, vocab))
    out = []
    with self._lock:
      for prefix, ids in zip(sequences, lists):
        trajectory = Trajectory(np.asarray(prefix, np.int32), np.zeros(0, np.int32))
        width = max(8, 1 << (len(ids) - 1).bit_length())  # Few candidate counts, so few compiles.
        padded = list(ids) + [ids[-1]] * (width - len(ids))
        values = next_values(self.predictor, [trajectory], padded, scorer="next_state", batch_size=1, chunk=width)[0]
        out.append(_z_from_value(values[0, :len(ids)]).tolist())
    return out

  def lengths(self, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(V(s_0), predicted length) per prompt."""
    trajectories = [Trajectory(np.asarray(ids, np.int32), np.zeros(0, np.int32)) for ids in prompts]
    with self._lock:
      return self.predictor.predict_prompts(trajectories)
