"""Length statistics and packing efficiency of a prepare_data output directory, before spending a training run on it.

  python -m experiments.data_stats DIR [--max_len=2048] [--packing=first_fit|best_fit] [--open_bins=32] \
      [--output_png=DIR/lengths.png]

Per split (train, eval) and per generator: finished completion-length p50/p90/p99, unfinished count and share,
suggested gamma (the train split's p99 rule, and what loss.gamma=auto_mre would pick), and the share of non-pad
tokens when the sequences (prompt + completion cut at max_len, as rows.trajectory_to_row does) are packed into rows
of max_len the way the pipeline packs them: train shuffled (data.seed), eval in stored order, unfinished dropped
unless --unfinished keeps them, --open_bins rows open at a time (the pipeline uses the per-host batch size). A sweep
over bin counts and both policies on the train split says what a better packer would buy. Prints a table and writes
DIR/data_stats.json and a histogram PNG of completion lengths per generator.
"""

import collections
import os
from typing import NamedTuple

import numpy as np
from absl import app, flags

from experiments import cli
from lenvm_jax import files
from lenvm_jax.data import arrayrecord, packing_stats, prompt_groups, rows, stats
from lenvm_jax.value import gamma as gamma_lib
from lenvm_jax.data.prompt_groups import SPLITS

_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "Training row length (data.max_len).")
_PACKING = flags.DEFINE_enum("packing", "first_fit", packing_stats.POLICIES, "Packing policy to report.")
_OPEN_BINS = flags.DEFINE_integer("open_bins", 32, "Rows packed at once (the pipeline: per-host train.batch_size).")
_UNFINISHED = flags.DEFINE_enum("unfinished", "drop", rows.UNFINISHED_POLICIES,
                                "data.unfinished: drop leaves unfinished completions out of the packing.")
_SEED = cli.seed_flag(0, "Shuffle seed of the train split's packing order (data.seed).")
_SWEEP_BINS = flags.DEFINE_list("sweep_bins", ["8", "16", "32", "64", "128", "256"],
                                "Bin counts of the train split's packing sweep (both policies); empty: no sweep.")
_OUTPUT_PNG = flags.DEFINE_string("output_png", None, "Histogram path; default DIR/lengths.png.")


class _Lengths:
  """Per-record generator, finished flag and lengths, noted while trajectory_stats reads the records once."""

  def __init__(self):
    self.generators, self.finished, self.prompt, self.completion = [], [], [], []
    self.prompt_groups = collections.defaultdict(list)  # For the auto_mre gamma.

  def note(self, trajectories):
    for t in trajectories:
      self.generators.append(prompt_groups.generator_of(t))
      self.finished.append(bool(t.finished))
      self.prompt.append(len(t.prompt_ids))
      self.completion.append(len(t.completion_ids))
      prompt_groups.add_to_groups(self.prompt_groups, t)
      yield t

  def arrays(self):
    return (np.asarray(self.generators, object), np.asarray(self.finished, bool),
            np.asarray(self.prompt, np.int64), np.asarray(self.completion, np.int64))


class SplitExtras(NamedTuple):
  """What split_stats measures besides the JSON summary."""
  finished_lengths: dict  # {generator: finished completion lengths}, for the histogram.
  packing_order: np.ndarray  # Record indices in the pipeline's order (unfinished dropped under "drop").
  sequence_lengths: np.ndarray  # Per record, prompt + completion cut at max_len.
  prompt_groups: dict  # prompt_groups.group_by_prompt of the split, for the auto_mre gamma.


def split_stats(source, *, max_len: int, policy: str, open_bins: int, keep_unfinished: bool,
                shuffle_seed: int | None, appended_eos: bool = False) -> tuple[dict, SplitExtras]:
  """(trajectory_stats with packing added per generator and overall, SplitExtras). appended_eos: each unfinished
  completion's row holds one more token, the EOS data.unfinished='append_eos' appends."""
  lengths = _Lengths()
  summary = stats.trajectory_stats(lengths.note(source[i] for i in range(len(source))))
  generators, finished, prompt, completion = lengths.arrays()
  order = (np.arange(len(prompt)) if shuffle_seed is None
           else np.random.default_rng(shuffle_seed).permutation(len(prompt)))
  packed = order[keep_unfinished | finished[order]]  # The pipeline's order, unfinished dropped under "drop".
  in_row = completion + (appended_eos & ~finished)  # Completion tokens as the row holds them.
  sequence = np.minimum(prompt + in_row, max_len)

  def packing(indices):
    result = packing_stats.pack(policy, sequence[indices], max_len, open_bins).as_dict()
    result["truncated"] = int(np.count_nonzero(prompt[indices] + in_row[indices] > max_len))
    return result

  summary["overall"]["packing"] = packing(packed)
  for name, generator in summary["generators"].items():
    generator["packing"] = packing(packed[generators[packed] == name])
  finished_lengths = {name: completion[(generators == name) & finished] for name in summary["generators"]}
  return summary, SplitExtras(finished_lengths, packed, sequence, dict(lengths.prompt_groups))


def packing_sweep(sequence_lengths, max_len: int, bin_counts) -> dict:
  return {policy: {str(bins): packing_stats.pack(policy, sequence_lengths, max_len, bins).efficiency
                   for bins in bin_counts} for policy in packing_stats.POLICIES}


def plot_lengths(finished_lengths: dict, path: str, max_len: int) -> None:
  """One panel per split, one step histogram per generator, log-spaced bins on a log x axis."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, axes = plt.subplots(1, len(finished_lengths), figsize=(6 * len(finished_lengths), 4), squeeze=False)
  for ax, (split, by_generator) in zip(axes[0], finished_lengths.items()):
    longest = max([int(v.max()) for v in by_generator.values() if len(v)] + [2])
    bins = np.unique(np.geomspace(1, longest + 1, 60).astype(int))
    for name, values in sorted(by_generator.items()):
      if len(values):
        counts, _ = np.histogram(values, bins=bins)
        # Per unit of length: log-spaced bins hold unequal numbers of integers, raw counts would zigzag.
        ax.stairs(counts / np.diff(bins), bins, label=f"{name} (n={len(values)})")
    ax.axvline(max_len, color="gray", linestyle="--", label=f"row max_len={max_len}")
    ax.set_xscale("log")
    ax.set_xlabel("completion length (tokens, finished)")
    ax.set_ylabel("completions per token of length")
    ax.set_title(split)
    ax.legend(fontsize="small")
  fig.tight_layout()
  with files.atomic_path(path) as tmp:  # The format from the final name: the temporary one ends in .tmp.
    fig.savefig(tmp, format=os.path.splitext(path)[1].lstrip(".") or "png")
  plt.close(fig)


def format_table(result: dict) -> str:
  lines = []
  for split, summary in result["splits"].items():
    lines.append(f"{split}: {summary['overall']['records']} records")
    lines.append(f"  {'generator':<24} {'records':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'unfin':>7} {'packing':>8}")
    entries = [("(all)", summary["overall"], summary["overall"]["records"])]
    entries += [(name, g, g["count"] + g["unfinished"]) for name, g in summary["generators"].items()]
    for name, g, records in entries:
      percentiles = " ".join(f"{g[p]:7.0f}" if g["count"] else f"{'-':>7}" for p in ("p50", "p90", "p99"))
      lines.append(f"  {name:<24.24} {records:>8} {percentiles} {g['unfinished_fraction']:7.1%} "
                   f"{g['packing']['efficiency']:8.2%}")
    for policy, by_bins in summary.get("packing_sweep", {}).items():
      lines.append(f"  {policy} efficiency by open bins: "
                   + ", ".join(f"{bins}: {eff:.2%}" for bins, eff in by_bins.items()))
  gamma = result["suggested_gamma"]
  lines.append(f"suggested gamma (train p99): {gamma:.6f}" if gamma is not None else "suggested gamma: n/a")
  if result["auto_mre_gamma"] is not None:
    lines.append(f"gamma for prompt-boundary MRE (loss.gamma=auto_mre): {result['auto_mre_gamma']:.6f}")
  return "\n".join(lines)


def data_stats(directory: str, *, max_len: int, policy: str = "first_fit", open_bins: int = 32,
               unfinished: str = "drop", seed: int = 0, sweep_bins=(), output_png: str | None = None) -> dict:
  """Computes the stats of every split present, writes DIR/data_stats.json and the PNG; returns the JSON dict."""
  result = {"dir": directory, "max_len": max_len, "packing": policy, "open_bins": open_bins,
            "unfinished": unfinished, "seed": seed, "splits": {}, "auto_mre_gamma": None}
  finished_lengths = {}
  for split in SPLITS:
    try:
      source = arrayrecord.ArrayRecordTrajectories(os.path.join(directory, split))
    except FileNotFoundError:
      continue
    summary, extras = split_stats(
        source, max_len=max_len, policy=policy, open_bins=open_bins, keep_unfinished=unfinished != "drop",
        shuffle_seed=seed if split == "train" else None, appended_eos=unfinished == "append_eos")  # Training shuffles; eval_batches reads in order.
    finished_lengths[split] = extras.finished_lengths
    if split == "train" and sweep_bins:
      summary["packing_sweep"] = packing_sweep(extras.sequence_lengths[extras.packing_order], max_len, sweep_bins)
    result["splits"][split] = summary
    if split == "train" and extras.prompt_groups:
      result["auto_mre_gamma"] = gamma_lib.least_mre_gamma(extras.prompt_groups)[0]
  if not result["splits"]:
    raise FileNotFoundError(f"no {' or '.join(SPLITS)} ArrayRecord shards in {directory!r}")
  train = result["splits"].get("train", {}).get("overall", {})
  result["suggested_gamma"] = gamma_lib.p99_gamma(train["p99"]) if train.get("count") else None
  stats.write_json(os.path.join(directory, "data_stats.json"), result)
  plot_lengths(finished_lengths, output_png or os.path.join(directory, "lengths.png"), max_len)
  return result


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m experiments.data_stats DIR [--max_len=...] [--packing=...]")
  directory = argv[1]
  with cli.user_errors(OSError, ValueError):  # No shards in DIR, a bin count that is not a number.
    result = data_stats(directory, max_len=_MAX_LEN.value, policy=_PACKING.value, open_bins=_OPEN_BINS.value,
                        unfinished=_UNFINISHED.value, seed=_SEED.value,
                        sweep_bins=[int(b) for b in _SWEEP_BINS.value], output_png=_OUTPUT_PNG.value)
  print(format_table(result))
  print(f"wrote {os.path.join(directory, 'data_stats.json')} and "
        f"{_OUTPUT_PNG.value or os.path.join(directory, 'lengths.png')}")


if __name__ == "__main__":
  cli.run(main)
