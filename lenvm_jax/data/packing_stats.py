"""How much padding the training pipeline's packing leaves, simulated on sequence lengths alone (no tokens).

Mirrors grain's packers (grain 0.2.18, dataset/transformations/packing.py and packing_packed_batch.py):
`open_bins` rows of max_len are filled in arrival order; first_fit puts a sequence into the first row with room
(FirstFitPackIterDataset), best_fit into the fullest row with room, first on ties (BestFitPackIterDataset). When
a sequence fits in no row, grain emits *all* rows (every one holds something, or the sequence would have fit) and
the sequence starts a fresh set; at the end of the data the non-empty rows of the last set are emitted.
"""

import dataclasses

import numpy as np

POLICIES = ("first_fit", "best_fit")


@dataclasses.dataclass(frozen=True)
class Packing:
  sequences: int
  tokens: int  # Non-pad tokens: the sum of the lengths.
  rows: int
  max_len: int

  @property
  def efficiency(self) -> float:
    """Share of non-pad tokens in the emitted rows."""
    return self.tokens / (self.rows * self.max_len) if self.rows else 0.0

  def as_dict(self) -> dict:
    return {"sequences": self.sequences, "tokens": self.tokens, "rows": self.rows, "efficiency": self.efficiency}


def _first_fitting(used: np.ndarray, fits: np.ndarray) -> int:
  return int(np.argmax(fits))


def _best_fitting(used: np.ndarray, fits: np.ndarray) -> int:
  return int(np.argmax(np.where(fits, used, -1)))


def _pack(lengths, max_len: int, open_bins: int, choose) -> Packing:
  lengths = np.asarray(lengths, np.int64)
  if open_bins < 1:
    raise ValueError(f"open_bins must be >= 1, got {open_bins}")
  if len(lengths) and (lengths.min() < 1 or lengths.max() > max_len):
    raise ValueError(f"sequence lengths must lie in [1, max_len={max_len}] (cut them first), got "
                     f"[{lengths.min()}, {lengths.max()}]")
  used = np.zeros(open_bins, np.int64)
  rows = 0
  for length in lengths.tolist():
    fits = used + length <= max_len
    if not fits.any():
      rows += open_bins
      used[:] = 0
      fits[:] = True
    used[choose(used, fits)] += length
  rows += int(np.count_nonzero(used))
  return Packing(sequences=len(lengths), tokens=int(lengths.sum()), rows=rows, max_len=max_len)


def first_fit(lengths, max_len: int, open_bins: int) -> Packing:
  """grain.experimental.FirstFitPackIterDataset(num_packing_bins=open_bins) over sequences of these lengths."""
  return _pack(lengths, max_len, open_bins, _first_fitting)


def best_fit(lengths, max_len: int, open_bins: int) -> Packing:
  """grain.experimental.BestFitPackIterDataset(num_packing_bins=open_bins): the tightest row that has room."""
  return _pack(lengths, max_len, open_bins, _best_fitting)


def pack(policy: str, lengths, max_len: int, open_bins: int) -> Packing:
  if policy not in POLICIES:
    raise ValueError(f"packing policy must be one of {POLICIES}, got {policy!r}")
  return (first_fit if policy == "first_fit" else best_fit)(lengths, max_len, open_bins)
