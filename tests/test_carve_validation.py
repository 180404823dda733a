import json

import grain
import numpy as np

from lenvm_jax.data import arrayrecord
from lenvm_jax.data import validation_split
from lenvm_jax.data.records import Trajectory


def _read(path):
  source = grain.sources.ArrayRecordDataSource(arrayrecord.split_paths(path))
  return [source[i] for i in range(len(source))]


def test_validation_split_keeps_problems_whole_and_copies_every_record(tmp_path):
  records = [arrayrecord.encode(Trajectory(np.array([1, 2], np.int32), np.arange(3 + i % 5, dtype=np.int32), True,
                                           f"P{i % 40}|setting {i % 3}", "g"), meta={"i": i}) for i in range(240)]
  (tmp_path / "in").mkdir()
  arrayrecord.write_shard(arrayrecord.shard_path(str(tmp_path / "in"), "train", 0, 2), records[:100])
  arrayrecord.write_shard(arrayrecord.shard_path(str(tmp_path / "in"), "train", 1, 2), records[100:])
  counts = validation_split.carve(str(tmp_path / "in"), str(tmp_path / "out"), 0.25, "|", seed=1)
  train, validation = _read(str(tmp_path / "out" / "train")), _read(str(tmp_path / "out" / "eval"))
  assert counts == {"train": len(train), "eval": len(validation)} == {"train": 180, "eval": 60}
  assert sorted(train + validation) == sorted(records)  # Byte for byte, none lost or repeated.
  problems = lambda rs: {json.loads(r)["prompt_id"].split("|")[0] for r in rs}
  assert len(problems(validation)) == 10 and not problems(train) & problems(validation)
  # Without a separator a group is the whole prompt_id: settings of one problem may then be split.
  validation_split.carve(str(tmp_path / "in"), str(tmp_path / "whole"), 0.25, "", seed=1)
  prompts = lambda rs: {json.loads(r)["prompt_id"] for r in rs}
  assert len(prompts(_read(str(tmp_path / "whole" / "eval")))) == 30

