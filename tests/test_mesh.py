"""The same training on different meshes of 8 fake CPU devices: same losses, parameters sharded by the rules."""

import json

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lenvm_jax.model import transformer
from lenvm_jax import sharding
from lenvm_jax import config as config_lib
from lenvm_jax.train import optimizer, state as state_lib, trainer
from tests.helpers import run_config

# Batch rows shard over data x fsdp (sharding.RULES): (2, 4, 1) already splits the batch 8 ways, one row per device,
# as (8, 1, 1) would (a fourth trainer compile that found nothing the others miss).
MESHES = [(2, 4, 1), (2, 2, 2), (1, 1, 1)]


def _losses(workdir):
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.mark.slow
def test_losses_agree_across_meshes(tiny_config, tmp_path, capfd, fresh_compiles):
  assert jax.device_count() == 8
  losses = {}
  for shape in MESHES:
    config = tiny_config
    config.train.steps = 4
    config.train.eval_every = 0
    config.loss.lm_weight, config.loss.lm_chunk = 0.5, 16  # The shared trunk's LM term in 3 chunks per row.
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
    workdir = tmp_path / "x".join(map(str, shape))
    trainer.train_and_evaluate(run_config(config), str(workdir))
    losses[shape] = _losses(workdir)
  reference = losses[(1, 1, 1)]
  assert sorted(reference) == [1, 2, 3, 4]
  for shape, got in losses.items():
    for step, loss in reference.items():
      assert got[step] == pytest.approx(loss, rel=2e-5), (shape, step)
  # XLA's SPMD partitioner logs (to fd 2) when it can only reshard by replicating a whole array on every device, as
  # it did for the embedding lookup from a table sharded over fsdp (transformer.LengthValueModel.embed).
  assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_parameters_are_sharded_as_the_rules_say(tiny_config):
  mesh = sharding.make_mesh(2, 2, 2)
  model_config = run_config(tiny_config).model
  with jax.set_mesh(mesh):
    _, abstract = transformer.abstract_model(model_config)
    tx = optimizer.make_optimizer(run_config(tiny_config), abstract.to_pure_dict())
    state, _ = state_lib.create_train_state(model_config, tx, mesh, seed=0)
  params = state.params
  attention = params["layers"]["attention"]  # Stacked decoder layers: a leading, replicated `layers` axis.
  expected = {
      "embedding": (params["embedding"], P("tensor", "fsdp")),
      "q": (attention["q"], P(None, "fsdp", "tensor", None)),
      "o": (attention["o"], P(None, "tensor", None, "fsdp")),
      "mlp.down": (params["layers"]["mlp"]["down"], P(None, "tensor", "fsdp")),
      "value_head.fc": (params["value_head"]["fc"], P("fsdp", "tensor")),
      "norm": (params["final_norm"]["scale"], P(None)),
  }
  for name, (array, spec) in expected.items():
    assert array.sharding.spec == spec, name
    shard = array.addressable_shards[0].data.shape
    divisors = [1 if s is None else mesh.shape[s] for s in spec]
    assert shard == tuple(d // k for d, k in zip(array.shape, divisors)), name
  # Adam moments shard like their parameters.
  mu = state.opt_state[1][0].mu
  assert mu["layers"]["attention"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
