"""Reproduce the paper's ablation figures: a small sweep of trainer runs, then a table and a PNG per figure.

  python -m experiments.reproduce --figure=5a   # target types: discounted vs raw / log / normalised length
  python -m experiments.reproduce --figure=5b   # shuffled vs prompt-grouped batches
  python -m experiments.reproduce --figure=6    # the gamma trade-off: MRE and MAE vs gamma
  python -m experiments.reproduce --figure=3c   # MRE vs samples per prompt (128 prompts)
  python -m experiments.reproduce --figure=5a --data=data/rollouts --vocab_size=151936 --preset=qwen2.5-0.5b

The runs go through experiments/sweep.py (one workdir per point under --out_dir, default runs/reproduce/<figure>;
rerunning resumes and skips finished points) on experiments/configs/reproduce.py: a tiny LenVM on a synthetic world
with 16 completions per prompt, about a minute per run on 2 CPU cores. --data points the runs at real rollouts (an
ArrayRecord directory from prepare_data or generate, with train/ and eval/ shards; several samples per prompt are
needed for the prompt-boundary columns) with loss.gamma=auto unless a figure sweeps it.

Each point is scored on the eval split: prompt-boundary MRE (docs/method.md §8: |L_hat - L_GT| / L_GT per prompt
group, L_GT the length of the mean return under the run's gamma; lenvm_jax/evaluation/length_eval.py) and MAE, the
same MRE against the plain mean length of each group, and the trainer's per-token length MRE and MAE (every state
of every held-out completion, rows cut at data.max_len). Figure 5a trains every target type with Huber loss at delta
1, as the reference does (for raw lengths that is close to L1). Writes <out_dir>/table.md, results.json and
figure_<figure>.png, and prints the table.

Every variant runs --seeds init seeds (default 3, same data): the table gives each metric's mean and [min, max] over
them, and a line per metric says which variants' ranges lie apart from the best one's and which overlap it
(lenvm_jax/evaluation/seed_spread.py), so a conclusion can say only what the seeds support.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags, logging

from experiments import cli
from lenvm_jax import sweep_spec
from lenvm_jax.data import arrayrecord, pipeline, prompt_groups
from lenvm_jax.decoding.predict import Predictor
from lenvm_jax.evaluation import length_eval, seed_spread
from lenvm_jax.value.targets import relative_length_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "reproduce.py")


@dataclasses.dataclass(frozen=True)
class Figure:
  title: str
  axis: str  # The swept config field.
  values: tuple[str, ...]
  label: str  # How the table and the plot name the axis.
  fixed: tuple[str, ...] = ()  # Overrides every point shares.


FIGURES = {
    "5a": Figure("Fig. 5a: regression target", "config.loss.target_type",
                 ("discounted", "raw_length", "log_length", "normalized_length"), "target",
                 ("config.loss.kind=huber", "config.loss.huber_delta=1.0")),
    "5b": Figure("Fig. 5b: batching", "config.data.batching", ("shuffled", "grouped"), "batching"),
    "6": Figure("Fig. 6: gamma trade-off", "config.loss.gamma", ("0.9", "0.95", "0.98", "0.995"), "gamma"),
    "3c": Figure("Fig. 3c: samples per prompt", "config.data.samples_per_prompt", ("1", "2", "4", "8", "16"),
                 "samples per prompt", ("config.data.max_prompts=128",)),
}

_FIGURE = flags.DEFINE_enum("figure", None, list(FIGURES), "Which figure to reproduce.")
flags.mark_flags_as_required(["figure"])
_DATA = flags.DEFINE_string("data", None, "ArrayRecord rollouts directory (train/, eval/); default: synthetic.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Model vocabulary for --data (the tokenizer's size, padded).")
_PRESET = cli.preset_flag(None, "Model preset for the runs (default: the config's, tiny).")
_OUT = flags.DEFINE_string("out_dir", None, "Sweep directory (default runs/reproduce/<figure>).")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps per run (0 = the config's, 300).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs trained at the same time.")
_BATCH = cli.batch_size_flag(64, "Sequences per forward pass when scoring prompts.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Runs per variant, with init seeds 0 .. seeds - 1 (same data); the table "
                              "shows each metric's mean and [min, max] over them (1: one run, no spread).")


def sweep_specs(figure: Figure, data: str | None, vocab_size: int, steps: int, seeds: int = 1) -> list[str]:
  """--sweep arguments: the figure's axis, its fixed overrides, and those of --data / --steps / --seeds."""
  specs = [f"{figure.axis}={','.join(figure.values)}", *figure.fixed]
  if seeds > 1:
    specs.append(f"config.seed={','.join(str(s) for s in range(seeds))}")
  if data:
    specs += ["config.data.source=arrayrecord", f"config.data.train_path={os.path.join(data, 'train')}",
              f"config.data.eval_path={os.path.join(data, 'eval')}", f"config.model.vocab_size={vocab_size}"]
    if figure.axis != "config.loss.gamma":
      specs.append("config.loss.gamma=auto")
  if steps:
    specs.append(f"config.train.steps={steps}")
  return specs


def eval_history(workdir: str) -> list[dict]:
  """The eval records of a run's metrics.jsonl, in step order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return sorted((r for r in records if r.get("split") == "eval"), key=lambda r: r["step"])


def prompt_boundary_scores(workdir: str, batch_size: int) -> dict:
  """Prompt-boundary MRE and MAE of a run's L_hat on its eval split, against L_GT and against the mean length."""
  predictor = Predictor(workdir)
  config = predictor.config
  source = pipeline.load_source(config, "eval")
  trajectories = [source[i] for i in range(len(source))]
  gamma = config.loss.gamma
  report = length_eval.prompt_boundary_report(predictor, trajectories, gamma, batch_size, config.data.max_prompt_len)
  groups = prompt_groups.boundary_groups(trajectories)
  predicted = np.asarray([g["predicted_length"] for g in report["groups"]])
  truth = np.asarray([g["true_length"] for g in report["groups"]])
  mean = np.asarray([np.mean(lengths) for lengths in groups.values()])
  scores = {"boundary_mre": report["mre"]["*"], "boundary_mae": float(np.mean(np.abs(predicted - truth))),
            "boundary_mre_vs_mean": float(np.mean(relative_length_error(predicted, mean))),
            "prompt_groups": report["prompt_groups"], "samples": len(trajectories), "gamma": gamma}
  # On synthetic data the exact value function's L_hat at s_0 shows what no model can beat: the MRE left by
  # estimating each L_GT from a few samples.
  exact = {}
  for t in trajectories:
    if t.exact_values is not None:
      exact.setdefault(prompt_groups.group_key(t), float(np.log1p(max(t.exact_values[0], -1 + 1e-7)) / np.log(gamma)))
  if len(exact) == len(groups):
    scores["exact_mre"] = float(np.mean(relative_length_error(np.asarray([exact[k] for k in groups]), truth)))
  return scores


def score(named_points, sweep_dir: str, figure: Figure, batch_size: int) -> list[dict]:
  rows = []
  for name, point in named_points:
    workdir = os.path.join(sweep_dir, name)
    history = eval_history(workdir)
    final = history[-1] if history else {}
    rows.append({"point": name, figure.label: point[figure.axis], "seed": point.get("config.seed", "0"),
                 **prompt_boundary_scores(workdir, batch_size),
                 "token_mre": final.get("length_mre", float("nan")),
                 "token_mae": final.get("length_mae", float("nan")),
                 "history": [{"step": r["step"], "token_mre": r["length_mre"], "token_mae": r["length_mae"]}
                             for r in history]})
  return rows


COLUMNS = (("boundary_mre", "prompt-boundary MRE"), ("boundary_mae", "prompt-boundary MAE"),
           ("boundary_mre_vs_mean", "MRE vs mean length"), ("token_mre", "per-token MRE"),
           ("token_mae", "per-token MAE"), ("exact_mre", "exact-V prompt-boundary MRE"))


def by_variant(rows: list[dict], figure: Figure) -> list[dict]:
  """One row per swept value: every metric's mean over seeds and its spread (<metric>_std / _min / _max)."""
  return seed_spread.by_variant(rows, figure.label, [key for key, _ in COLUMNS], ("token_mre", "token_mae"))


def format_table(variants: list[dict], figure: Figure) -> str:
  """The markdown table (mean [min, max] over seeds), then per metric which variants the seeds separate."""
  columns = [(key, title) for key, title in COLUMNS if any(key in v for v in variants)]
  header = [figure.label] + [title for _, title in columns]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for v in variants:
    lines.append("| " + " | ".join([str(v[figure.label])] + [seed_spread.format_cell(v, key) for key, _ in columns])
                 + " |")
  seeds = min(v["seeds"] for v in variants)
  lines.append("")
  lines.append(f"Cells: mean [min, max] over {seeds} init seeds." if seeds > 1 else
               "Cells: one run per variant (--seeds=1): no spread; differences may be run-to-run noise.")
  separated = seed_spread.format_separation(variants, figure.label,
                                            [(k, t) for k, t in columns if k != "exact_mre"])
  if separated:
    lines.append("Lower is better; the best mean's seed range against the others':")
    lines.append(separated)
  return "\n".join(lines)


def _range(rows: list[dict], key: str) -> list[list[float]]:
  """Asymmetric error bars from each variant's mean to its seeds' min and max."""
  return [[r[key] - r.get(key + "_min", r[key]) for r in rows], [r.get(key + "_max", r[key]) - r[key] for r in rows]]


def plot(rows: list[dict], figure: Figure, name: str, path: str):
  """The paper's layout: 5a / 5b bars per variant (5b also per-token MRE over training), 6 and 3c lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = [str(r[figure.label]) for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  if name in ("5a", "5b"):
    x = np.arange(len(rows))
    axes[0].bar(x, [r["boundary_mre"] for r in rows], yerr=_range(rows, "boundary_mre"), color="tab:blue")
    if all("exact_mre" in r for r in rows):
      axes[0].axhline(np.mean([r["exact_mre"] for r in rows]), color="k", ls="--", lw=1, label="exact V")
      axes[0].legend()
    axes[0].set(xticks=x, xticklabels=labels, ylabel="MRE", title="prompt-boundary MRE (L_GT)")
    if name == "5a":
      axes[1].bar(x, [r["token_mre"] for r in rows], yerr=_range(rows, "token_mre"), color="tab:orange")
      axes[1].set(xticks=x, xticklabels=labels, ylabel="MRE", title="per-token MRE")
    else:
      for r in rows:
        axes[1].plot([h["step"] for h in r["history"]], [h["token_mre"] for h in r["history"]], marker="o",
                     label=str(r[figure.label]))
      axes[1].set(xlabel="training step", ylabel="MRE", title="per-token MRE (eval, mean over seeds)")
      axes[1].legend()
    for ax in axes:
      ax.tick_params(axis="x", labelrotation=15)
  else:
    x = [float(label) for label in labels]
    for ax, (metric, title) in zip(axes, (("mre", "MRE"), ("mae", "MAE (tokens)"))):
      ax.errorbar(x, [r[f"boundary_{metric}"] for r in rows], _range(rows, f"boundary_{metric}"),
                  marker="o", label="prompt boundary")
      ax.errorbar(x, [r[f"token_{metric}"] for r in rows], _range(rows, f"token_{metric}"), marker="s",
                  label="per token")
      if metric == "mre" and all("exact_mre" in r for r in rows):
        ax.plot(x, [r["exact_mre"] for r in rows], ls="--", color="k", lw=1, label="prompt boundary, exact V")
      ax.set(xlabel=figure.label, ylabel=title, title=f"{title} vs {figure.label}")
      if name == "3c":
        ax.set_xscale("log", base=2)
      else:  # Even spacing in log horizon, -log(1 - gamma).
        ax.set_xscale("function", functions=(lambda g: -np.log(1 - np.minimum(g, 0.9999)),
                                             lambda h: 1 - np.exp(-h)))
      ax.set_xticks(x)
      ax.set_xticklabels(labels)
      ax.minorticks_off()
      ax.legend()
  fig.suptitle(figure.title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DATA.value and not _VOCAB.value:
    raise app.UsageError("--data needs --vocab_size (the model's vocabulary: the tokenizer's size)")
  if _DATA.value:  # Before any run starts: a directory of prepared splits.
    with cli.user_errors(FileNotFoundError):
      for split in ("train", "eval"):
        arrayrecord.split_paths(os.path.join(_DATA.value, split))
  name = _FIGURE.value
  figure = FIGURES[name]
  out_dir = os.path.abspath(_OUT.value or os.path.join("runs", "reproduce", name))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise cli.errors.UserError.at("the sweep directory is a file", f"--out_dir={out_dir}", "choose a directory path")
  specs = sweep_specs(figure, _DATA.value, _VOCAB.value, _STEPS.value, _SEEDS.value)
  config = CONFIG + (f":{_PRESET.value}" if _PRESET.value else "")
  command = [sys.executable, "-m", "experiments.sweep", f"--config={config}", f"--sweep_dir={out_dir}",
             f"--parallel={_PARALLEL.value}", "--table=eval/length_mre,eval/length_mae"]
  command += [f"--sweep={spec}" for spec in specs]
  print(f"reproduce {name}: {' '.join(command[1:])}", flush=True)
  if subprocess.run(command, cwd=REPO, check=False).returncode:
    print(f"error: the sweep did not finish every point (see {out_dir}/*/train.log)", file=sys.stderr)
    sys.exit(1)
  logging.set_verbosity(logging.WARNING)  # Checkpoint restores log every step at INFO.
  rows = score(sweep_spec.named_points(specs), out_dir, figure, _BATCH.value)
  variants = by_variant(rows, figure)
  table = format_table(variants, figure)
  with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
    f.write(f"{figure.title}\n\n{table}\n")
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"figure": name, "sweep": specs, "variants": variants, "runs": rows}, f, indent=1)
  png = os.path.join(out_dir, f"figure_{name}.png")
  plot(variants, figure, name, png)
  print(f"{figure.title} ({rows[0]['prompt_groups']} held-out prompt groups, {rows[0]['samples']} samples)")
  print(table)
  print(f"wrote {out_dir}/table.md, results.json and {os.path.basename(png)}")


if __name__ == "__main__":
  cli.run(main)
