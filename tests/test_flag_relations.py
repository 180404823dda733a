"""Relations between the decoding tools' flags (issue 29): a generator and a LenVM of different vocabularies, EOS ids
outside the policy's vocabulary, a budget above the tokens a run may generate, flags of another mode. Each is one
`error:` line naming the culprit and exit 2, before any weight loads: the runs and model directories here have a
config but no weights, so a check that came after loading would fail with another message."""

import json

import pytest

from lenvm_jax import errors, sharding
from lenvm_jax.config import RunConfig
from lenvm_jax.decoding.eos import check_in_vocabulary
from lenvm_jax.decoding.generation import GuidedSampler
from lenvm_jax.decoding.guided_models import Pair, TransformerGenerator, TransformerScorer
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.decoding.sampler import SamplingConfig
from lenvm_jax.model_config import ModelConfig, preset_fields
from lenvm_jax.model.hf_config import hf_config_from_model_config
from lenvm_jax.value.targets import TargetKind
from tests.cli_server import CliServers
from tests.helpers import REPO, assert_one_error_line, tiny_model


def _run(tmp_path, name="run", vocab_size=64):
  """A run directory with a config and no weights (a checkpoints/ folder without steps)."""
  run = tmp_path / name
  (run / "checkpoints").mkdir(parents=True)
  config = RunConfig.default("tiny").to_dict()
  config["model"]["vocab_size"] = vocab_size
  (run / "config.json").write_text(json.dumps(config))
  return str(run)


def _hf_dir(tmp_path, name, vocab_size, **extra):
  """A Hugging Face model directory with a config.json and no weights."""
  directory = tmp_path / name
  directory.mkdir()
  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": vocab_size})
  (directory / "config.json").write_text(json.dumps(hf_config_from_model_config(config, **extra)))
  return str(directory)


# ------------------------------------------------------------------------------------------------ the library


def test_eos_ids_outside_the_vocabulary_name_their_source():
  check_in_vocabulary((0, 63), 64, "--eos_ids")
  with pytest.raises(errors.UserError, match=r"EOS ids 64, -1 outside the policy's vocabulary \[0, 64\) "
                                             r"\(--eos_ids=64,-1\)"):
    check_in_vocabulary((64, -1, 3), 64, "--eos_ids=64,-1")


@pytest.fixture(scope="module")
def tiny_models():
  """Two tiny models of different vocabularies (graphdef, params)."""
  out = {}
  for vocab in (64, 96):
    out[vocab] = tiny_model(vocab, dtype="float32")
  return out


def test_samplers_refuse_an_eos_the_model_cannot_emit_and_a_lenvm_of_another_vocabulary(tiny_models):
  mesh = sharding.make_mesh(1, 1, 1)
  graphdef, params = tiny_models[64]
  with pytest.raises(errors.UserError, match=r"EOS id 64 outside the policy's vocabulary \[0, 64\)"):
    Sampler(graphdef, params, SamplingConfig(max_new_tokens=4, eos_ids=(1, 64)), mesh, batch_size=1)
  Sampler(graphdef, params, SamplingConfig(max_new_tokens=4, eos_ids=(63,)), mesh, batch_size=1)
  kind = TargetKind("discounted", 0.997, 1024.0)
  other_graphdef, other_params = tiny_models[96]
  pair = Pair(TransformerGenerator(graphdef, 64), TransformerScorer(other_graphdef, kind))
  sampling = SamplingConfig(max_new_tokens=4, eos_ids=(1,))
  with pytest.raises(errors.UserError, match=r"vocabulary \(64 tokens\) differs from the LenVM's \(96\)"):
    GuidedSampler(pair, (params, other_params), sampling, mesh, num_candidates=3, batch_size=1)
  with pytest.raises(errors.UserError, match="EOS id 64 outside the generator's vocabulary"):
    GuidedSampler(Pair(TransformerGenerator(graphdef, 64), TransformerScorer(graphdef, kind)), (params, params),
                  SamplingConfig(max_new_tokens=4, eos_ids=(64,)), mesh, num_candidates=3, batch_size=1)
  GuidedSampler(Pair(TransformerGenerator(graphdef, 64), TransformerScorer(graphdef, kind)), (params, params),
                sampling, mesh, num_candidates=3, batch_size=1)


def test_a_length_the_decode_cannot_reach_is_refused_before_decoding(tiny_models):
  """Equal To / At Least beyond max_new_tokens would be cut and scored as if asked for; At Most beyond it is met."""
  from lenvm_jax.decoding.guided import LengthRequest
  from lenvm_jax.decoding.guided_models import SharedTrunk
  graphdef, params = tiny_models[64]
  kind = TargetKind("discounted", 0.997, 1024.0)
  sampler = GuidedSampler(SharedTrunk(graphdef, kind, 64), params, SamplingConfig(max_new_tokens=4, eos_ids=(1,)),
                          sharding.make_mesh(1, 1, 1), num_candidates=3, batch_size=2)
  for rule in ("equal_to", "at_least", "eq_soft"):
    with pytest.raises(ValueError, match=f"request 1: {rule} 5 tokens cannot be met within max_new_tokens = 4"):
      sampler.generate([[3, 4], [3, 5]], [LengthRequest(rule, 4), LengthRequest(rule, 5)])
  samples = sampler.generate([[3, 4], [3, 5]], [LengthRequest("equal_to", 4), LengthRequest("at_most", 50)])
  assert all(len(s.completion_ids) <= 4 for s in samples)


# ------------------------------------------------------------------------------------- the CLIs (subprocesses)

# Each tool call is a process of its own, forked from one server per tool (tests/cli_server.py) instead of paying
# python + jax imports per call.


@pytest.fixture(scope="module")
def clis(tmp_path_factory):
  servers = CliServers(tmp_path_factory.mktemp("cli_servers"))
  yield servers
  servers.close()


@pytest.mark.slow
def test_generate_refuses_eos_ids_outside_the_policy_vocabulary_before_loading(tmp_path, clis):
  policy = _run(tmp_path, vocab_size=64)
  out = tmp_path / "out"
  base = ("generate", f"--policy={policy}", "--prompts=x.jsonl", f"--output_dir={out}")
  assert_one_error_line(clis.run(*base, "--eos_ids=2,64"), "EOS id 64 outside the policy's vocabulary [0, 64)",
                  "--eos_ids=2,64")
  assert_one_error_line(clis.run(*base, "--eos_ids=two"), "--eos_ids=two: expected comma-separated integers")
  hf = _hf_dir(tmp_path, "hf", 64, eos_token_id=[2, 100])
  assert_one_error_line(clis.run("generate", f"--policy={hf}", "--prompts=x.jsonl", f"--output_dir={out}"),
                  "EOS id 100 outside", f"--policy={hf}, its eos_token_id")
  assert not out.exists()


@pytest.mark.slow
def test_evaluate_budget_refuses_another_vocabulary_a_foreign_eos_and_a_short_base_run(tmp_path, clis):
  lenvm = _run(tmp_path, vocab_size=64)
  base = ("evaluate_budget", f"--workdir={lenvm}", "--prompts=reasoning_gym:gsm_symbolic:8")
  assert_one_error_line(clis.run(*base, f"--policy={_hf_dir(tmp_path, 'wide', 128, eos_token_id=2)}"),
                  "the policy's vocabulary (128 tokens) differs from the LenVM's (64)", "--policy=", "--workdir=")
  assert_one_error_line(clis.run(*base, f"--policy={_hf_dir(tmp_path, 'eos', 64, eos_token_id=70)}"),
                  "EOS id 70 outside the policy's vocabulary", "its eos_token_id")
  assert_one_error_line(clis.run(*base, f"--policy={lenvm}", "--budgets=64,128", "--base_tokens=100"),
                  "--base_tokens=100 is below the largest budget 128")
  assert_one_error_line(clis.run(*base, f"--policy={lenvm}", "--candidates=65"),
                  "--candidates must lie in [1, 64] (the policy's vocabulary), got 65")
  assert not (tmp_path / "run" / "evaluate_budget").exists()


@pytest.mark.slow
def test_evaluate_refuses_eos_ids_outside_the_run_vocabulary_before_loading(tmp_path, clis):
  run = _run(tmp_path, vocab_size=64)
  assert_one_error_line(clis.run("evaluate", f"--workdir={run}", "--eos_ids=1,500"), "EOS id 500 outside", "--eos_ids=1,500")


@pytest.mark.slow
def test_evaluate_refuses_a_synthetic_generator_of_another_vocabulary_before_generating(tmp_path, clis):
  """--config of another vocabulary: the synthetic policy would emit ids the LenVM never saw (legacy_run: 64)."""
  import shutil
  run = tmp_path / "run"
  shutil.copytree(f"{REPO}/tests/fixtures/legacy_run", run)
  assert_one_error_line(clis.run("evaluate", f"--workdir={run}", "--config=experiments/configs/tiny.py",
                       "--config.model.vocab_size=96", "--prompts=4"),
                  "vocabulary (96 tokens) differs from the LenVM's (64)", "--config", "model.vocab_size")
  assert not (run / "evaluate").exists()


@pytest.mark.slow
def test_bench_guided_refuses_more_candidates_than_tokens_before_building_models(clis):
  assert_one_error_line(clis.run("bench_guided", "--preset=tiny", "--vocab_size=16", "--candidates=5,20"),
                  "--candidates=5,20: 20 candidates exceed the vocabulary of 16 tokens")
  assert_one_error_line(clis.run("bench_guided", "--preset=tiny", "--vocab_size=2"), "--vocab_size=2: must be at least 3")


@pytest.mark.slow
def test_predict_refuses_flags_of_another_mode(tmp_path, clis):
  run = _run(tmp_path)
  base = ("predict", f"--workdir={run}", "--input=x.jsonl", f"--output={tmp_path / 'p.jsonl'}")
  assert_one_error_line(clis.run(*base, "--token_ids=1,2"), "--token_ids has no effect with --mode=tokens")
  assert_one_error_line(clis.run(*base, "--mode=prompt_eval", "--samples_per_prompt=4"),
                  "--samples_per_prompt applies to --grouping=reference only")
  assert_one_error_line(clis.run(*base, "--mode=prompts", "--grouping=reference"), "--grouping has no effect")
