"""Every import format goes import -> ArrayRecord -> grain -> training, with the same trainer."""

import json

import numpy as np
import pytest

from lenvm_jax.data import champ, reference_jsonl
from lenvm_jax.data.prepare import prepare
from lenvm_jax.data.tokenizer import load_tokenizer
from lenvm_jax.train import trainer
from tests.helpers import run_config
from tests.helpers import reference_line, write_lines


def _train_on(config, data_dir, vocab_size, workdir, max_len=128, max_prompt_len=0):
  config.model.vocab_size = vocab_size
  config.data.source = "arrayrecord"
  config.data.train_path = str(data_dir / "train")
  config.data.eval_path = str(data_dir / "eval")
  config.data.max_len = max_len
  config.data.max_prompt_len = max_prompt_len
  config.loss.gamma = "auto"
  config.train.steps = 2
  config.train.eval_every = 0
  config.mesh.data = 1
  final_eval = trainer.train_and_evaluate(run_config(config), str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
  assert np.isfinite(final_eval["loss"]) and final_eval["value_mse"] > 0


@pytest.mark.slow
def test_reference_jsonl_trains(tiny_config, tmp_path):
  from tests.helpers import chatml_tokenizer_dir
  (tmp_path / "tok").mkdir()
  tok = load_tokenizer(chatml_tokenizer_dir(tmp_path / "tok"))
  lines = [reference_line(i, completion="The answer is 42. " * (1 + i % 5), generator="g") for i in range(40)]
  path = write_lines(tmp_path / "gen.jsonl", lines)
  prepare(reference_jsonl.iter_reference_jsonl(path, tok, eval_fraction=0.25), str(tmp_path / "data"),
          vocab_size=tok.vocab_size, max_len=128)
  _train_on(tiny_config, tmp_path / "data", tok.vocab_size, tmp_path / "run")


@pytest.mark.slow
def test_tokenized_jsonl_trains(tiny_config, tmp_path):
  rng = np.random.default_rng(0)
  lines = [json.dumps({"prompt_ids": rng.integers(2, 50, 5).tolist(),
                       "completion_ids": rng.integers(2, 50, int(rng.integers(1, 30))).tolist() + [1],
                       "prompt_id": i % 10}) for i in range(60)]
  path = write_lines(tmp_path / "tok.jsonl", lines)
  prepare(reference_jsonl.iter_tokenized_jsonl(path, 64, 128, eval_fraction=0.3), str(tmp_path / "data"),
          vocab_size=64, max_len=128)
  _train_on(tiny_config, tmp_path / "data", 64, tmp_path / "run")


@pytest.mark.slow
def test_champ_trains(tiny_config, tmp_path):
  pytest.importorskip("champ_dataset")
  tok = load_tokenizer(champ.default_tokenizer_path())
  prepare(champ.iter_champ(tok, eval_fraction=0.5, max_problems=2, tag_generator=True), str(tmp_path / "data"),
          vocab_size=tok.vocab_size, max_len=8192)
  _train_on(tiny_config, tmp_path / "data", tok.vocab_size, tmp_path / "run", max_len=256, max_prompt_len=128)
