"""A TFDS builder for trajectory records (array_record file format; works without TensorFlow installed).

Build it from a prepare_data output directory, then read it anywhere with `tfds.data_source`:

  builder = LenvmTrajectories(data_dir=TFDS_DIR, source_dir=PREPARED_DIR); builder.download_and_prepare()
  tfds.data_source("lenvm_trajectories", split="train", data_dir=TFDS_DIR)

Training reads it with data.source="tfds", data.tfds_name="lenvm_trajectories", data.tfds_data_dir=TFDS_DIR.
"""

import numpy as np
import tensorflow_datasets as tfds

from lenvm_jax.data import arrayrecord
from lenvm_jax.data.records import Trajectory


class LenvmTrajectories(tfds.core.GeneratorBasedBuilder):
  """Prompt + sampled completion token ids, with finished flag, prompt id and generator name."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Trajectory schema of lenvm_jax/data/records.py."}

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self._source_dir = source_dir
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "prompt_ids": tfds.features.Sequence(np.int32),
        "completion_ids": tfds.features.Sequence(np.int32),
        "finished": np.bool_,
        "prompt_id": tfds.features.Text(),
        "generator": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the records come from a local prepare_data directory.
    if self._source_dir is None:
      raise ValueError("LenvmTrajectories needs source_dir (a prepare_data output directory) to be prepared")
    return {split: self._generate_examples(split) for split in ("train", "eval")}

  def _generate_examples(self, split):
    source = arrayrecord.ArrayRecordTrajectories(f"{self._source_dir}/{split}")
    for index in range(len(source)):
      t = source[index]
      yield index, {"prompt_ids": t.prompt_ids, "completion_ids": t.completion_ids, "finished": t.finished,
                    "prompt_id": t.prompt_id or "", "generator": t.generator or ""}


class TfdsTrajectories:
  """Random-access Trajectory view of a TFDS data source (as `tfds.data_source` returns it)."""

  def __init__(self, name: str, split: str, data_dir: str):
    self.name, self.split, self.data_dir = name, split, data_dir
    self._source = tfds.data_source(name, split=split, data_dir=data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Trajectory:
    r = self._source[index]
    text = lambda v: (v.decode("utf-8") if isinstance(v, bytes) else str(v)) or None
    return Trajectory(np.asarray(r["prompt_ids"], np.int32), np.asarray(r["completion_ids"], np.int32),
                      bool(r["finished"]), text(r["prompt_id"]), text(r["generator"]))

  def __getstate__(self):
    return {"name": self.name, "split": self.split, "data_dir": self.data_dir}

  def __setstate__(self, state):
    self.__init__(**state)
