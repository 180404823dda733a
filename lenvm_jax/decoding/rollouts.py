"""Rollouts: prompts x samples from a policy -> ArrayRecord trajectory shards that training reads directly.

Output layout is prepare_data's (lenvm_jax/data/arrayrecord.py): <dir>/<split>-NNNNN-of-NNNNN.array_record plus
stats.json, and generation.json with the settings. Each record is a Trajectory (prompt id, generator name,
finished = an EOS id was sampled, else the completion was cut at max_new_tokens) with meta {"sample": j, and the
sampling settings}, plus the decoded `text` when a tokenizer is given. A prompt with an answer (lenvm_jax/data/
answers.py) adds "answer" and "correct" (its checker on the decoded completion) to the meta; that needs a tokenizer.

Resume: the (prompt, sample) -> shard assignment depends only on the prompt list and the settings, each sample's
random stream only on its row id (prompt index x num_samples + sample; lenvm_jax/decoding/sampler.py), and shards are
written atomically. A rerun skips shards that exist and regenerates the others identically; a rerun with other
settings, or into a directory that holds another import, is refused (data/output_dir.py) unless `overwrite`.
"""

import json
import os
from typing import Callable, Sequence

import grain

from lenvm_jax.data import arrayrecord, output_dir as output_dir_lib, stats
from lenvm_jax.data.prompt_groups import SPLITS, split_groups
from lenvm_jax.data.prompts import Prompt
from lenvm_jax.data.records import Trajectory
from lenvm_jax.data.tokenizer import Tokenizer
from lenvm_jax.decoding.generation import Sampler

SETTINGS_FILE = "generation.json"


def check_settings(output_dir: str, settings: dict, overwrite: bool = False) -> None:
  """Records the settings of this output directory, or refuses to mix in samples drawn with other settings (or
  into another import); `overwrite` replaces that import."""
  output_dir_lib.claim(output_dir, SETTINGS_FILE, settings, overwrite=overwrite)


def plan(prompts: Sequence[Prompt], num_samples: int, shard_size: int, eval_fraction: float
         ) -> dict[str, list[list[tuple[int, int]]]]:
  """split -> shards -> (prompt index, sample index) items. A prompt without a split is split by its prompt id
  (prompt_groups.split_groups, unseeded: the same prompt id always lands on the same side)."""
  drawn = split_groups({p.prompt_id for p in prompts if not p.split}, eval_fraction)
  items = {split: [] for split in SPLITS}
  for index, prompt in enumerate(prompts):
    split = prompt.split or drawn[prompt.prompt_id]
    items[split].extend((index, sample) for sample in range(num_samples))
  return {split: [chunk[i:i + shard_size] for i in range(0, len(chunk), shard_size)] for split, chunk in
          items.items()}


def generate_rollouts(sampler: Sampler, prompts: Sequence[Prompt], output_dir: str, *, num_samples: int,
                      generator: str, settings: dict, shard_size: int = 4096, eval_fraction: float = 0.1,
                      tokenizer: Tokenizer | None = None,
                      on_progress: Callable[[int, int, int], None] | None = None, overwrite: bool = False) -> dict:
  """Writes the shards that do not exist yet and stats.json; returns the stats.

  settings (policy, sampling, ...) go to generation.json and, with the sampling settings, into every record's meta.
  on_progress(samples done, samples total, tokens generated in this run) is called every batch_size samples.
  overwrite: replace another import (or rollouts with other settings) in output_dir instead of refusing.
  """
  if num_samples <= 0 or shard_size <= 0:
    raise ValueError(f"num_samples and shard_size must be positive, got {num_samples}, {shard_size}")
  if not prompts:
    raise ValueError("no prompts")
  if tokenizer is None and any(p.answer is not None for p in prompts):
    raise ValueError("prompts with answers are scored on the decoded completion: pass a tokenizer (--tokenizer)")
  check_settings(output_dir, {**settings, "generator": generator, "num_samples": num_samples,
                              "shard_size": shard_size, "eval_fraction": eval_fraction, "num_prompts": len(prompts)},
                 overwrite)
  sampling = sampler.sampling.to_dict()
  shards = plan(prompts, num_samples, shard_size, eval_fraction)
  total = len(prompts) * num_samples
  done, tokens, reported = 0, 0, -1
  for split, chunks in shards.items():
    for index, items in enumerate(chunks):
      path = arrayrecord.shard_path(output_dir, split, index, len(chunks))
      if os.path.exists(path):  # Finished by an earlier run.
        done += len(items)
        continue
      # The whole shard at once: the engine refills a slot as soon as its row ends (no batch waits for its
      # longest row), and each row's stream depends only on its row id.
      def heard(sample):
        nonlocal done, tokens, reported
        done, tokens = done + 1, tokens + len(sample.completion_ids)
        if on_progress and (done % sampler.batch_size == 0 or done == total):
          on_progress(done, total, tokens)
          reported = done

      samples = sampler.generate([prompts[p].prompt_ids.tolist() for p, _ in items],
                                 row_ids=[p * num_samples + s for p, s in items], on_sample=heard)
      records = []
      for (prompt_index, sample_index), sample in zip(items, samples):
        prompt = prompts[prompt_index]
        trajectory = Trajectory(prompt.prompt_ids, sample.completion_ids, sample.finished, prompt.prompt_id,
                                generator)
        text = tokenizer.decode(sample.completion_ids.tolist()) if tokenizer else None
        meta = {"sample": sample_index, **sampling}
        if prompt.answer is not None:
          meta.update(answer=prompt.answer.answer, correct=prompt.answer.is_correct(text))
        records.append(arrayrecord.encode(trajectory, text, meta))
      arrayrecord.write_shard(path, records)
  if on_progress and reported != done:  # The last shards existed (or all did): report the final count.
    on_progress(done, total, tokens)
  return write_stats(output_dir, {split: len(chunks) for split, chunks in shards.items()}, settings)


def read_records(source: arrayrecord.ArrayRecordTrajectories) -> list[dict]:
  """Every record of the shards as its JSON (with `text` and `meta`), which Trajectory decoding drops."""
  raw = grain.sources.ArrayRecordDataSource(source.paths)
  return [json.loads(raw[i]) for i in range(len(raw))]


def record_metas(source) -> list[dict]:
  return [record.get("meta", {}) for record in read_records(source)] if len(source) else []


def write_stats(output_dir: str, shard_counts: dict[str, int], settings: dict) -> dict:
  """stats.json as prepare_data writes it, from the shards on disk (so a resumed run counts every shard)."""
  kept, scored = {}, {}
  for split, count in shard_counts.items():
    source = arrayrecord.ArrayRecordTrajectories(os.path.join(output_dir, f"{split}-*-of-{count:05d}.array_record")) \
        if count else []
    kept[split] = [source[i] for i in range(len(source))]
    correct = [meta["correct"] for meta in record_metas(source) if "correct" in meta]
    if correct:
      scored[split] = {"scored": len(correct), "correct": int(sum(correct)), "accuracy": sum(correct) / len(correct)}
  extras = {"answers": scored} if scored else {}
  return stats.write_stats(output_dir, kept, shard_counts, generation=settings, **extras)

