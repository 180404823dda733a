"""Prompts with checkable answers: the final-answer rule, reasoning-gym problems as a prompt source, the prompt JSONL
`answer` field, and rollout records that keep the answer and a `correct` flag scored on the decoded completion."""

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from lenvm_jax import sharding
from lenvm_jax.data import answers, arrayrecord
from lenvm_jax.data.prompts import Prompt, load_prompts, read_prompt_jsonl
from lenvm_jax.data.records import RecordError
from lenvm_jax.data.tokenizer import load_tokenizer
from lenvm_jax.decoding import rollouts
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.decoding.sampler import SamplingConfig
from lenvm_jax.model_config import ModelConfig, preset_fields
from lenvm_jax.model.transformer import LengthValueModel
from tests.helpers import CHATML, build_tokenizer_json, chatml_tokenizer_dir

reasoning_gym = pytest.importorskip("reasoning_gym")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return load_tokenizer(chatml_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("completion, expected", [
    ("First 3 + 4 = 7, then 7 * 2 = 14.\nThe answer is 14.", "14"),
    ("Total: 1,250 apples", "1250"),
    ("It is -3.5 degrees", "-3.5"),
    ("I guess 5 <answer> 12 </answer> and later 99", "12"),
    ("no digits here", None),
])
def test_final_answer_is_the_answer_tag_else_the_last_number(completion, expected):
  assert answers.final_answer(completion) == expected


def test_matches_compares_numbers_numerically_and_text_exactly():
  assert answers.matches("288.0", "288") and not answers.matches("287", "288")
  assert answers.matches(" Paris ", "Paris") and not answers.matches("paris", "Paris")
  assert not answers.matches(None, "1")
  assert answers.Answer("42").is_correct("so 6 * 7 = 42") and not answers.Answer("42").is_correct("it is 41")


def test_reasoning_gym_problems_are_seeded_and_checked_by_the_task_scorer():
  first = answers.reasoning_gym_problems("gsm_symbolic", 3, seed=0)
  more = answers.reasoning_gym_problems("gsm_symbolic", 5, seed=0)
  other_seed = answers.reasoning_gym_problems("gsm_symbolic", 3, seed=1)
  assert [p.question for p in first] == [p.question for p in more[:3]]  # Problem i does not depend on N.
  assert [p.question for p in first] != [p.question for p in other_seed]
  assert [p.problem_id for p in first] == ["gsm_symbolic/0/0", "gsm_symbolic/0/1", "gsm_symbolic/0/2"]
  problem = first[0]
  right = f"Step one gives 3. Step two gives {problem.answer.answer}."
  assert problem.answer.is_correct(right)
  assert not problem.answer.is_correct(f"The result is {int(problem.answer.answer) + 1}.")
  assert not problem.answer.is_correct("I do not know.")


@pytest.mark.parametrize("spec, parsed", [
    ("reasoning_gym:gsm_symbolic", ("gsm_symbolic", 100, 0, {})),
    ("reasoning_gym:chain_sum:7", ("chain_sum", 7, 0, {})),
    ("reasoning_gym:chain_sum:7:3", ("chain_sum", 7, 3, {})),
    ("reasoning_gym:chain_sum:7:3:max_digits=1; max_terms=2", ("chain_sum", 7, 3, {"max_digits": 1, "max_terms": 2})),
    ("reasoning_gym:basic_arithmetic:2:0:operators=('+', '-');allow_negation=False;format_style=simple",
     ("basic_arithmetic", 2, 0, {"operators": ("+", "-"), "allow_negation": False, "format_style": "simple"}))])
def test_reasoning_gym_spec(spec, parsed):
  assert answers.parse_reasoning_gym_spec(spec) == parsed


def test_reasoning_gym_task_options_reach_the_task_and_name_the_problems():
  small = answers.reasoning_gym_problems("chain_sum", 20, 0, {"max_terms": 2, "max_digits": 1})
  assert all(re.search(r": \d [-+] \d =$", p.question) for p in small)  # "a op b =", one-digit terms.
  assert max(abs(int(p.answer.answer)) for p in small) <= 18
  assert small[0].problem_id == "chain_sum{max_digits=1;max_terms=2}/0/0"
  assert small[0].problem_id != answers.reasoning_gym_problems("chain_sum", 1, 0)[0].problem_id


def test_mixed_tasks_and_repeated_questions(tokenizer):
  mixed = load_prompts("reasoning_gym:chain_sum:3+leg_counting:2:5", tokenizer.vocab_size, tokenizer)
  assert [p.prompt_id for p in mixed] == ["chain_sum/0/0", "chain_sum/0/1", "chain_sum/0/2", "leg_counting/5/0",
                                          "leg_counting/5/1"]
  # "a +- b" with one-digit terms: 200 questions at most, so 150 draws repeat some; each is kept once, first id.
  spec = "reasoning_gym:chain_sum:150:0:max_terms=2;max_digits=1"
  prompts = load_prompts(spec, tokenizer.vocab_size, tokenizer)
  problems = answers.reasoning_gym_problems(*answers.parse_reasoning_gym_spec(spec))
  first_ids = {}
  for problem in problems:
    first_ids.setdefault(problem.question, problem.problem_id)
  assert len(prompts) == len(first_ids) < len(problems)
  assert [p.prompt_id for p in prompts] == list(first_ids.values())
  with pytest.raises(ValueError, match="repeat problem ids"):
    load_prompts("reasoning_gym:chain_sum:3+chain_sum:2", tokenizer.vocab_size, tokenizer)


@pytest.mark.parametrize("spec, message", [("reasoning_gym:", "TASK"), ("reasoning_gym:gsm_symbolic:x", "integers"),
                                           ("reasoning_gym:gsm_symbolic:0", "positive"),
                                           ("reasoning_gym:no_such_task:2", "no_such_task"),
                                           ("reasoning_gym:chain_sum:2:0:max_digits", "KEY=VALUE"),
                                           ("reasoning_gym:chain_sum:2:0:no_such_option=1", "no_such_option")])
def test_bad_reasoning_gym_specs_are_value_errors(spec, message, tokenizer):
  with pytest.raises(ValueError, match=message):
    load_prompts(spec, tokenizer.vocab_size, tokenizer)


def test_reasoning_gym_prompts_render_the_question_through_the_chat_template(tokenizer):
  prompts = load_prompts("reasoning_gym:gsm_symbolic:2:4", tokenizer.vocab_size, tokenizer)
  problems = answers.reasoning_gym_problems("gsm_symbolic", 2, seed=4)
  for prompt, problem in zip(prompts, problems):
    assert prompt.prompt_ids.tolist() == tokenizer.prompt_ids([{"role": "user", "content": problem.question}])
    assert prompt.prompt_id == problem.problem_id and prompt.split is None
    assert prompt.answer.answer == problem.answer.answer
  with pytest.raises(ValueError, match="tokenizer"):
    load_prompts("reasoning_gym:gsm_symbolic:2", 64)


def test_prompt_jsonl_answer_field(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt_ids": [3, 4], "answer": "12"}\n{"prompt_ids": [5], "answer": 7.5}\n{"prompt_ids": [6]}\n')
  with_text, with_number, without = read_prompt_jsonl(str(path), 64)
  assert with_text.answer.answer == "12" and with_number.answer.answer == "7.5" and without.answer is None
  path.write_text('{"prompt_ids": [3], "answer": [1]}\n')
  with pytest.raises(RecordError) as error:
    read_prompt_jsonl(str(path), 64)
  assert (error.value.line, error.value.field) == (1, "answer")


@pytest.mark.slow
def test_rollout_records_keep_the_answer_and_whether_the_completion_is_correct(tmp_path, tokenizer):
  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": tokenizer.vocab_size})
  model = LengthValueModel(config, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  mesh = sharding.make_mesh(1, 1, 1)
  sampler = Sampler(graphdef, jax.device_get(params.to_pure_dict()), SamplingConfig(max_new_tokens=6, eos_ids=(
      tokenizer.eos_id,), seed=3), mesh, batch_size=4)
  prompt_ids = np.asarray(tokenizer.prompt_ids([{"role": "user", "content": "Hello"}]), np.int32)
  # Checks that depend on the decoded text, so the flag must come from the completion itself.
  has_text = answers.Answer("any", check=lambda text: len(text) > 0)
  never = answers.Answer("none", check=lambda text: False)
  prompts = [Prompt(prompt_ids, "a", "train", answer=has_text), Prompt(prompt_ids, "b", "train", answer=never),
             Prompt(prompt_ids, "c", "eval")]
  result = rollouts.generate_rollouts(sampler, prompts, str(tmp_path), num_samples=2, generator="g", settings={},
                                      tokenizer=tokenizer)
  records = {}
  for split in ("train", "eval"):
    for raw in rollouts.read_records(arrayrecord.ArrayRecordTrajectories(str(tmp_path / split))):
      records.setdefault(raw["prompt_id"], []).append(raw)
  assert all(r["meta"]["answer"] == "any" and r["meta"]["correct"] == (len(r["text"]) > 0) for r in records["a"])
  assert all(r["meta"]["answer"] == "none" and r["meta"]["correct"] is False for r in records["b"])
  assert all("answer" not in r["meta"] and "correct" not in r["meta"] for r in records["c"])
  expected = sum(r["meta"]["correct"] for r in records["a"])
  assert result["answers"] == {"train": {"scored": 4, "correct": expected, "accuracy": expected / 4}}
  with pytest.raises(ValueError, match="tokenizer"):
    rollouts.generate_rollouts(sampler, prompts, str(tmp_path / "x"), num_samples=1, generator="g", settings={})


def test_budget_evaluation_counts_an_answer_only_when_it_ends_within_the_budget():
  from lenvm_jax.evaluation import budget as evaluate_budget
  from lenvm_jax.decoding.generation import GuidedSample
  sample = lambda n, finished: GuidedSample(np.arange(n), np.zeros(n), finished)
  prompts = [Prompt(np.asarray([1]), str(i), answer=answers.Answer("7")) for i in range(3)]
  samples = [sample(5, True), sample(12, True), sample(20, False)]
  texts = ["so 7", "so 7", "so 7"]  # All correct text; only the first ends within 10 tokens.
  assert evaluate_budget.score(samples, texts, prompts, budget=10) == {
      "accuracy": 1 / 3, "correct": 1, "ended": 1 / 3, "mean_length": (5 + 10 + 10) / 3}
  assert evaluate_budget.score(samples, ["so 6", "so 7", "so 7"], prompts, budget=16)["correct"] == 1
  split = evaluate_budget.held_out(prompts + [Prompt(np.asarray([1]), "x", "eval")], "eval", 0.5)
  assert split[-1].prompt_id == "x" and all(p in prompts for p in split[:-1])


@pytest.mark.slow
def test_evaluate_budget_command_end_to_end(tiny_config, tmp_path, tokenizer):
  """The budget command on a tiny run that is both generator and LenVM: one table row per budget and decoding
  (every At Most convention asked for), lengths cut at each budget, and the same numbers in report.json."""
  import os
  import subprocess
  import sys
  from lenvm_jax.train import trainer
  from tests.helpers import REPO, run_config

  tiny_config.model.vocab_size = tokenizer.vocab_size
  tiny_config.mesh.data = 1
  tiny_config.train.steps = 2
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(run_config(tiny_config), str(workdir))
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"hello {i}", "answer": "20", "split": "eval"}) + "\n"
                             for i in range(3)))
  args = [sys.executable, "-m", "experiments.evaluate_budget", f"--workdir={workdir}", f"--policy={workdir}",
          f"--tokenizer={os.path.dirname(tokenizer.path)}", f"--prompts={prompts}", "--budgets=6,3", "--betas=-4", "--base_tokens=8",
          "--at_most=paper,sample_fitting", "--batch_size=4", "--temperature=1.0"]
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((workdir / "evaluate_budget" / "report.json").read_text())
  assert report["problems"] == 3 and (workdir / "evaluate_budget" / "budget.png").stat().st_size > 0
  for budget in (3, 6):
    runs = report["budgets"][str(budget)]
    assert list(runs) == ["base (truncated)", "tilt beta -4", f"at_most {budget} (paper)",
                          f"at_most {budget} (sample_fitting)"]
    for run in runs.values():
      assert 0 < run["mean_length"] <= budget and 0 <= run["accuracy"] <= run["ended"] <= 1
  # The base run cut at 3 tokens is a prefix of the one cut at 6: it cannot end more often.
  assert report["budgets"]["3"]["base (truncated)"]["ended"] <= report["budgets"]["6"]["base (truncated)"]["ended"]
  assert report["unbounded_base"]["max_new_tokens"] == 8
  bad = subprocess.run(args[:-1] + ["--at_most=soonest"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: length rule convention")
