"""Length predictions of a trained LenVM.

  python -m experiments.predict --workdir runs/synthetic --input trajectories.jsonl --output predictions.jsonl
  python -m experiments.predict --mode=prompts --workdir ... --input prompts.jsonl --output boundary.jsonl
  python -m experiments.predict --mode=prompt_eval --workdir ... --input samples.jsonl --output report.json
  python -m experiments.predict --mode=next_values --token_ids=all --scorer=candidate_head --workdir ... \
      --input trajectories.jsonl --output next_values.jsonl

--mode=tokens (default): each output line {"values": [...], "remaining": [...]}: V and the predicted remaining
length at every position from the prompt's last token through the last completion token (len(completion_ids) + 1
entries).
--mode=prompts: input lines {"prompt_ids": [...]} (optional prompt_id, generator); each output line
{"prompt_id", "generator", "value", "predicted_length"}: V(s_0) and L_hat = log(1 + V) / log(gamma).
--mode=prompt_eval: input trajectories with several sampled completions per prompt (grouped by prompt_id, else by
prompt tokens, and generator); writes a JSON report of prompt-boundary MRE (docs/method.md §8), overall ("*") and per
generator, with every group's L_GT and L_hat.
--mode=next_values: each output line {"token_ids": [...], "values": [[...], ...]}: for every position from the
prompt's last token through the last completion token (s_0 .. s_L), the values V(s_t + x) of the listed next tokens
x (--token_ids: ID,ID,... or all, for vocabularies up to 4,096 tokens), by --scorer: next_state (x run through the
trunk after the prefix; any run) or candidate_head (read off s_t's hidden state; a run with a candidate head).
Raw model values: guided decoding sets an EOS candidate to 0 itself.
"""

import json

from absl import flags

from experiments import cli
from lenvm_jax import files
from lenvm_jax.errors import UserError
from lenvm_jax.evaluation import prompt_boundary
from lenvm_jax.data import jsonl, prompts
from lenvm_jax.evaluation import length_eval
from lenvm_jax.decoding import candidate_scoring, next_values

_RUN = cli.run_flags("Training workdir (its config and checkpoints).")
_INPUT = flags.DEFINE_string("input", None, "Trajectory JSONL (schema in README), or prompts for --mode=prompts.")
_OUTPUT = cli.output_flag("Where to write the predictions (JSONL) or report (JSON).", required=True)
_MODE = flags.DEFINE_enum("mode", "tokens", ["tokens", "prompts", "prompt_eval", "next_values"],
                          "What to predict (see above).")
_BATCH = cli.batch_size_flag(16)
_GROUPING = flags.DEFINE_enum("grouping", "finished", ["finished", "reference"],
                              "--mode=prompt_eval groups: finished completions per prompt, or the reference's rule "
                              "(every sample, a cut one with its token count; prompts with exactly "
                              "--samples_per_prompt samples; lenvm_jax/data/prompt_groups.py).")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 0, "--grouping=reference: samples a prompt must have (0 = the "
                                "most common count).")
_TOKEN_IDS = flags.DEFINE_string("token_ids", "all", "--mode=next_values: the next tokens x to value, 'all' "
                                 f"(vocabularies up to {next_values.MAX_ALL_TOKENS}) or ID,ID,...")
_SCORER = flags.DEFINE_enum("scorer", "next_state", list(candidate_scoring.SCORERS),
                            "--mode=next_values: how V(s_t + x) is computed (see above).")
flags.mark_flags_as_required(["input"])


def main(argv):
  del argv
  cli.check_output_file(_OUTPUT.value, "--output")
  # A flag of another mode would be ignored without a word: the user meant something this run does not do.
  for flag, modes in ((_TOKEN_IDS, ("next_values",)), (_SCORER, ("next_values",)), (_GROUPING, ("prompt_eval",)),
                      (_SAMPLES, ("prompt_eval",))):
    if flag.present and _MODE.value not in modes:
      raise UserError.at(f"--{flag.name} has no effect with --mode={_MODE.value}", f"--{flag.name}",
                         f"use it with --mode={modes[0]}, or leave it out")
  if _SAMPLES.present and _GROUPING.value != "reference":
    raise UserError.at("--samples_per_prompt applies to --grouping=reference only", "--samples_per_prompt",
                       "add --grouping=reference, or leave it out")
  predictor = cli.load_predictor(_RUN)
  config = predictor.config
  max_prompt_len = config.data.max_prompt_len
  if _MODE.value == "next_values":
    with cli.user_errors(ValueError):  # Token ids outside the vocabulary; a candidate scorer without a head.
      token_ids = next_values.parse_token_ids(_TOKEN_IDS.value, config.model.vocab_size)
      candidate_scoring.check_scorer(_SCORER.value, config.model)
  if _MODE.value == "prompts":
    records = [p.as_trajectory()
               for p in prompts.read_prompt_jsonl(_INPUT.value, config.model.vocab_size, name_by_line=False)]
  else:
    # Prediction is not bound to the training row length: allow any prompt the model can take.
    records = jsonl.read_trajectories(_INPUT.value, config.model.vocab_size, max_len=1 << 30)
  lines = []  # The output is written whole at the end (files.write_report): never half, never from 0 records.
  if _MODE.value == "tokens":
    for values, remaining in predictor.predict(records, _BATCH.value):
      lines.append(json.dumps({"values": [round(float(v), 7) for v in values],
                               "remaining": [round(float(r), 4) for r in remaining]}) + "\n")
    done = f"wrote {len(records)} predictions (checkpoint step {predictor.step}) to {_OUTPUT.value}"
  elif _MODE.value == "prompts":
    values, lengths = predictor.predict_prompts(records, _BATCH.value, max_prompt_len)
    for record, value, length in zip(records, values, lengths):
      lines.append(json.dumps({"prompt_id": record.prompt_id, "generator": record.generator,
                               "value": round(float(value), 7), "predicted_length": round(float(length), 3)}) + "\n")
    done = f"wrote {len(records)} prompt-boundary predictions (checkpoint step {predictor.step}) to {_OUTPUT.value}"
  elif _MODE.value == "next_values":
    ids = list(range(config.model.vocab_size)) if token_ids is None else token_ids
    for values in next_values.next_values(predictor, records, ids, _SCORER.value, _BATCH.value):
      lines.append(json.dumps({"token_ids": ids, "values": [[round(float(v), 7) for v in row] for row in values]})
                   + "\n")
    done = (f"wrote V(s_t + x) of {len(ids)} tokens by the {_SCORER.value} scorer for {len(records)} trajectories "
            f"(checkpoint step {predictor.step}) to {_OUTPUT.value}")
  else:
    try:
      report = length_eval.prompt_boundary_report(predictor, records, config.loss.gamma, _BATCH.value,
                                                  max_prompt_len, _GROUPING.value, _SAMPLES.value)
    except ValueError as e:  # Too few samples per prompt group to measure an MRE.
      raise UserError(f"{_INPUT.value}: {e}") from None
    lines.append(json.dumps({"checkpoint_step": predictor.step, **report}, indent=1))
    mre = ", ".join(f"{prompt_boundary.scope_label(k)}: {v:.2%}" for k, v in report["mre"].items())
    done = f"prompt-boundary MRE over {report['prompt_groups']} prompt groups ({mre}); report in {_OUTPUT.value}"
  files.write_report(_OUTPUT.value, "".join(lines), items=len(records), what="records",
                     where=f"--input={_INPUT.value}")
  print(done)

if __name__ == "__main__":
  cli.run(main)
