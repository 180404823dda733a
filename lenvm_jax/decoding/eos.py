"""Which token ids end a completion when a tool decodes with a run's model: one rule for evaluate, serve and benchmarks.

In order: ids the caller names (--eos_ids), the synthetic policy's fixed id when it generates, the caller's tokenizer
(--tokenizer), else the run's own (run/eos.py: recorded in its config.json at train time; a run from before the
record reads them from its data: the last tokens of its finished completions, the ids the LenVM was trained to value
0).
"""

from typing import Iterable, Sequence

from lenvm_jax.data.synthetic import EOS_ID as SYNTHETIC_EOS_ID
from lenvm_jax.errors import UserError
from lenvm_jax.run import eos as run_eos


def generator_eos_ids(generator: str, explicit: Sequence[int] = (), tokenizer_eos: int | None = None,
                      trajectories: Iterable = (), workdir: str | None = None) -> tuple[int, ...]:
  """EOS ids for `generator` ("synthetic": the synthetic policy; anything else: a model speaking the data's
  tokenizer), from the first source that names any: explicit ids, the tokenizer's, the run's at `workdir`
  (run_eos.run_eos_ids), else the data's finished completions among `trajectories`.
  """
  if explicit:
    return tuple(int(i) for i in explicit)
  if generator == "synthetic":
    return (SYNTHETIC_EOS_ID,)
  if tokenizer_eos is not None:
    return (int(tokenizer_eos),)
  found = (run_eos.run_eos_ids(workdir, trajectories) if workdir is not None else
           run_eos.eos_ids_of_data(trajectories() if callable(trajectories) else trajectories))
  if not found:
    raise ValueError("no EOS id: the data has no finished completion to read it from; pass --eos_ids (or "
                     "--tokenizer, whose EOS is used)")
  return found


def check_in_vocabulary(eos_ids: Sequence[int], vocab_size: int, source: str, model: str = "the policy") -> None:
  """Refuses EOS ids the model can never emit (`source` names where they came from: a flag, a tokenizer, a model
  file): with one, every completion runs to its token limit and is reported unfinished, without a word."""
  outside = [int(i) for i in eos_ids if not 0 <= int(i) < vocab_size]
  if outside:
    raise UserError.at(f"EOS id{'s' if len(outside) > 1 else ''} {', '.join(map(str, outside))} outside {model}'s "
                       f"vocabulary [0, {vocab_size})", source,
                       "give the ids of the policy's own end-of-sequence tokens (its tokenizer's)")
