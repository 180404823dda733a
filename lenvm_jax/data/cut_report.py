"""What a run's data settings cut or drop from a split, counted, so that no cut is silent.

Per record, as rows.trajectory_to_row builds it: a prompt longer than data.max_prompt_len is cut (data.prompt_cut:
tail | head | refuse); a sequence longer than data.max_len loses its last tokens from the row (the targets keep the
true lengths); an unfinished completion (no EOS) is dropped under data.unfinished='drop', else kept under its policy.
The trainer, evaluate_lengths and the predictors print `CutReport.line()` per split; the trainer also logs the
numbers to metrics.jsonl (split "data_<split>").

A split of more than `limit` records is counted on an evenly spread sample of `limit` of them and the counts scaled
(the line says so); data.prompt_cut='refuse' reads every prompt, so that no long prompt slips through.
"""

import dataclasses
import math

from lenvm_jax.config import ConfigError, DataConfig
from lenvm_jax.data import packing_stats

COUNT_LIMIT = 20_000


@dataclasses.dataclass
class CutReport:
  split: str
  records: int  # Records in the split.
  counted: int = 0  # Records read (all, or an even sample).
  prompts_cut: int = 0
  prompt_tokens_cut: int = 0
  rows_cut: int = 0  # Sequences longer than data.max_len.
  row_tokens_cut: int = 0
  unfinished: int = 0
  unfinished_tokens: int = 0
  dropped: int = 0  # Unfinished records left out (data.unfinished='drop').
  dropped_tokens: int = 0
  unfinished_policy: str = "drop"
  prompt_cut: str = "tail"
  row_lengths: list = dataclasses.field(default_factory=list, repr=False)  # Tokens of each counted kept record's row.

  @property
  def kept(self) -> int:
    """Records that become rows (all but the dropped ones), scaled to the split."""
    return self.records - self.scaled(self.dropped)

  def scaled(self, count: int) -> int:
    """A count over the sample, scaled to the whole split."""
    return round(count * self.records / max(self.counted, 1))

  def to_dict(self) -> dict:
    """The counts scaled to the whole split (numbers only: the metrics log takes them)."""
    names = ("prompts_cut", "prompt_tokens_cut", "rows_cut", "row_tokens_cut", "unfinished", "unfinished_tokens",
             "dropped", "dropped_tokens")
    return {"records": self.records, "counted": self.counted, **{k: self.scaled(getattr(self, k)) for k in names}}

  def line(self) -> str:
    d = self.to_dict()
    estimate = "" if self.counted == self.records else f" (estimated from {self.counted} records spread evenly)"
    kept = f"kept under data.unfinished={self.unfinished_policy}" if self.unfinished_policy != "drop" else "dropped"
    return (f"{self.split}: {d['records']} records; prompts cut (data.prompt_cut={self.prompt_cut}): "
            f"{d['prompts_cut']} records, {d['prompt_tokens_cut']} tokens; past data.max_len: {d['rows_cut']} "
            f"records, {d['row_tokens_cut']} tokens; unfinished (no EOS, {kept}): {d['unfinished']} records, "
            f"{d['unfinished_tokens']} tokens{estimate}")


def _indices(count: int, limit: int) -> range:
  stride = max(-(-count // limit), 1) if limit else 1
  return range(0, count, stride)


def check_prompts(source, data: DataConfig, split: str):
  """data.prompt_cut='refuse': a ConfigError naming the first record whose prompt is longer than max_prompt_len."""
  if data.prompt_cut != "refuse" or not data.max_prompt_len:
    return
  for index in range(len(source)):
    trajectory = source[index]
    if len(trajectory.prompt_ids) > data.max_prompt_len:
      name = f" (prompt_id {trajectory.prompt_id!r})" if trajectory.prompt_id is not None else ""
      raise ConfigError(f"config.data.max_prompt_len: {split} record {index}{name} has a "
                        f"{len(trajectory.prompt_ids)}-token prompt, longer than data.max_prompt_len="
                        f"{data.max_prompt_len} and data.prompt_cut='refuse'; raise data.max_prompt_len or set "
                        "data.prompt_cut='tail' (keep the last tokens) or 'head' (the first)")


def count(source, data: DataConfig, split: str, limit: int = COUNT_LIMIT) -> CutReport:
  """The split's cuts under `data`'s settings (a sample of `limit` records when it is larger; 0 = all)."""
  check_prompts(source, data, split)
  report = CutReport(split, len(source), unfinished_policy=data.unfinished, prompt_cut=data.prompt_cut)
  for index in _indices(len(source), limit):
    trajectory = source[index]
    report.counted += 1
    prompt = len(trajectory.prompt_ids)
    completion = len(trajectory.completion_ids)
    if not trajectory.finished:
      report.unfinished += 1
      report.unfinished_tokens += completion
      if data.unfinished == "drop":
        report.dropped += 1
        report.dropped_tokens += prompt + completion
        continue
      completion += data.unfinished == "append_eos"
    if data.max_prompt_len and prompt > data.max_prompt_len:
      report.prompts_cut += 1
      report.prompt_tokens_cut += prompt - data.max_prompt_len
      prompt = data.max_prompt_len
    if prompt + completion > data.max_len:
      report.rows_cut += 1
      report.row_tokens_cut += prompt + completion - data.max_len
    report.row_lengths.append(min(prompt + completion, data.max_len))
  return report


def records_per_row(report: CutReport, data: DataConfig, open_bins: int) -> float:
  """Records in a training row: 1 unpacked; packed, as the pipeline's packer (data.packing, open_bins rows open)
  fits the counted records' rows in their order (lenvm_jax/data/packing_stats.py)."""
  if data.packing == "none" or not report.row_lengths:
    return 1.0
  packed = packing_stats.pack(data.packing, report.row_lengths, data.max_len, data.packing_bins or open_bins)
  return packed.sequences / max(packed.rows, 1)


def steps_for_epochs(epochs: float, report: CutReport, data: DataConfig, batch_size: int, open_bins: int) -> int:
  """train.epochs as steps: an epoch is one pass over the training records that become rows (dropped ones do not
  count), batch_size rows a step holding records_per_row records each; rounded up, at least 1."""
  per_step = batch_size * records_per_row(report, data, open_bins)
  return max(math.ceil(epochs * report.kept / per_step), 1)
