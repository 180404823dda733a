"""Per-token length predictions of a trained LenVM.

  python -m experiments.predict --workdir runs/synthetic --input trajectories.jsonl --output predictions.jsonl

Each output line: {"values": [...], "remaining": [...]}: V and the predicted remaining length at every position from
the prompt's last token through the last completion token (len(completion_ids) + 1 entries).
"""

import json
import sys

from absl import app, flags

from lenvm_jax.data import jsonl
from lenvm_jax.data.records import RecordError
from lenvm_jax.infer.predict import Predictor

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (its config.json and latest checkpoint are used).")
_INPUT = flags.DEFINE_string("input", None, "Trajectory JSONL (schema in README).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the predictions JSONL.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  del argv
  predictor = Predictor(_WORKDIR.value)
  config = predictor.config
  try:
    # Prediction is not bound to the training row length: allow any prompt the model can take.
    records = jsonl.read_trajectories(_INPUT.value, config.model.vocab_size, max_len=1 << 30)
  except RecordError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  with open(_OUTPUT.value, "w", encoding="utf-8") as f:
    for values, remaining in predictor.predict(records, _BATCH.value):
      f.write(json.dumps({"values": [round(float(v), 7) for v in values],
                          "remaining": [round(float(r), 4) for r in remaining]}) + "\n")
  print(f"wrote {len(records)} predictions (checkpoint step {predictor.step}) to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
