"""Cut answers on the synthetic world: data.unfinished = drop | as_finished | censored against the exact value function.

  python -m experiments.censored_targets --workdir runs/censored_targets [--steps=600 --seeds=0,1 --cut_share=0.3]
      [--policies=drop,as_finished,censored,censored_bootstrap]

The synthetic generator's value function is known exactly (lenvm_jax/data/synthetic.py). Its training split is cut
at a budget chosen so that about --cut_share of the completions are longer (data.synthetic.train_budget: the long
ones get cut, as a generator's max_new_tokens cuts real rollouts); the eval split stays whole. One model per policy
and seed is trained with everything else equal (seeds, steps, gamma), and each is scored on the whole held-out
completions: exact_value_mse is its MSE against the exact V(s_t) (the gap to the exact value function), value_mse
its MSE against the realised returns (bayes_value_mse is the exact values' own, const_value_mse the best constant's),
gap_closed = (const - value_mse) / (const - bayes). Prints the policies side by side and writes
<workdir>/censored_targets.json; each run's files are under <workdir>/<policy>_seed<k> (a rerun into the same workdir
only re-evaluates the finished runs). censored_bootstrap is censored with loss.censored_bootstrap.
"""

import json
import os

import numpy as np
from absl import flags

from experiments import cli
from lenvm_jax.config import RunConfig
from lenvm_jax.data import pipeline
from lenvm_jax.train import trainer

POLICIES = ("drop", "as_finished", "censored", "censored_bootstrap")  # The last: censored + loss.censored_bootstrap.
_RUN = cli.run_flags("Output directory: one training run per policy and seed.", step=False)
_POLICIES = flags.DEFINE_list("policies", list(POLICIES[:3]), "data.unfinished policies to compare "
                               "(censored_bootstrap: censored with loss.censored_bootstrap).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (model init and data order); every policy runs each.")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps of every run.")
_CUT_SHARE = flags.DEFINE_float("cut_share", 0.3, "Share of training completions the budget cuts (the longest).")
_PRESET = cli.preset_flag()
_GAMMA = flags.DEFINE_float("gamma", 0.98, "loss.gamma, the same for every policy.")
_TRAIN_RECORDS = flags.DEFINE_integer("train_records", 20_000, "Synthetic training records.")
_EVAL_RECORDS = flags.DEFINE_integer("eval_records", 1024, "Synthetic held-out records (whole, never cut).")
_MAX_LEN = flags.DEFINE_integer("max_len", 64, "data.max_len (rows; longer sequences keep their true targets).")
_BATCH = cli.batch_size_flag(32, "train.batch_size (rows).")
_LR = flags.DEFINE_float("lr", 2e-3, "optim.lr.")

REPORTED = ("exact_value_mse", "value_mse", "gap_closed", "length_mae")


def base_run(preset: str, steps: int) -> RunConfig:
  config = RunConfig.default(preset).to_dict()
  config["loss"]["gamma"] = _GAMMA.value
  config["data"].update(max_len=_MAX_LEN.value)
  config["data"]["synthetic"].update(train_records=_TRAIN_RECORDS.value, eval_records=_EVAL_RECORDS.value)
  config["train"].update(steps=steps, batch_size=_BATCH.value, eval_every=0, log_every=max(steps // 4, 1),
                         eval_batch_size=64)
  config["optim"].update(lr=_LR.value, warmup_steps=min(50, steps // 10))
  config["checkpoint"].update(every_steps=steps, keep=1, async_save=False)
  return RunConfig.from_dict(config)


def budget_for(run: RunConfig, cut_share: float, sample: int = 4000) -> tuple[int, float]:
  """(budget, share of the training sample longer than it): the completion length that about cut_share exceed."""
  source = pipeline.load_source(run, "train")
  lengths = np.asarray([len(source[i].completion_ids) for i in range(min(sample, len(source)))])
  budget = int(np.quantile(lengths, 1.0 - cut_share))
  return budget, float(np.mean(lengths > budget))


def run_config(run: RunConfig, policy: str, seed: int, budget: int) -> RunConfig:
  config = run.to_dict()
  config["seed"] = seed
  config["data"].update(unfinished=policy.removesuffix("_bootstrap"), seed=seed)
  config["loss"]["censored_bootstrap"] = policy == "censored_bootstrap"
  config["data"]["synthetic"]["train_budget"] = budget
  return RunConfig.from_dict(config)


def scores(final_eval: dict) -> dict:
  out = {k: final_eval[k] for k in ("exact_value_mse", "value_mse", "bayes_value_mse", "const_value_mse",
                                    "length_mae")}
  out["gap_closed"] = (out["const_value_mse"] - out["value_mse"]) / (out["const_value_mse"] - out["bayes_value_mse"])
  return out


def format_table(results: dict, seeds) -> str:
  policies = list(results)
  lines = [f"{'':<26}" + "".join(f"{p:>19}" for p in policies)]
  for metric in REPORTED:
    for seed in seeds:
      lines.append(f"{metric + f' (seed {seed})':<26}"
                   + "".join(f"{results[p][str(seed)][metric]:19.5f}" for p in policies))
    if len(seeds) > 1:
      lines.append(f"{metric + ' (mean)':<26}" + "".join(
          f"{np.mean([results[p][str(s)][metric] for s in seeds]):19.5f}" for p in policies))
  return "\n".join(lines)


def main(argv):
  del argv
  seeds = cli.int_list("seeds", _SEEDS.value)
  for policy in _POLICIES.value:
    if policy not in POLICIES:
      raise cli.errors.UserError(f"--policies: {policy!r} is not one of {', '.join(POLICIES)}")
  run = base_run(_PRESET.value, _STEPS.value)
  budget, cut = budget_for(run, _CUT_SHARE.value)
  print(f"budget {budget} tokens: {cut:.1%} of the training completions are cut (sample of "
        f"{min(4000, _TRAIN_RECORDS.value)}); eval: {_EVAL_RECORDS.value} whole completions; gamma {_GAMMA.value}; "
        f"preset {_PRESET.value}, {_STEPS.value} steps of {_BATCH.value} rows")
  results: dict = {}
  for policy in _POLICIES.value:
    results[policy] = {}
    for seed in seeds:
      workdir = os.path.join(_RUN.workdir.value, f"{policy}_seed{seed}")
      results[policy][str(seed)] = scores(trainer.train_and_evaluate(run_config(run, policy, seed, budget), workdir))
  report = {"budget": budget, "cut_share": cut, "steps": _STEPS.value, "seeds": list(seeds), "results": results}
  with open(os.path.join(_RUN.workdir.value, "censored_targets.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  print(format_table(results, seeds))


if __name__ == "__main__":
  cli.run(main)
