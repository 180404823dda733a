"""Export a trained run as a LenVM directory in the reference layout (Hugging Face causal LM + value head).

  python -m experiments.export_hf --workdir runs/synthetic --output exports/synthetic [--tokenizer HF_DIR]

The latest checkpoint becomes config.json + model.safetensors (float32; sharded with an index above
--max_shard_size_gb, 5 by default) + value_head.safetensors. Tokenizer and
generation_config files are copied from --tokenizer, else from the run's model.init_from directory; a run with
neither (e.g. synthetic data) gets none.
"""

import sys

from absl import app, flags

from lenvm_jax.decoding.predict import Predictor
from lenvm_jax.model import hf_export

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (its config.json and latest checkpoint are used).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the LenVM into.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "HF directory whose tokenizer files to include "
                                 "(default: the run's model.init_from).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_size_gb", hf_export.DEFAULT_MAX_SHARD_BYTES / 1e9,
                                   "Split the weights into safetensors shards of at most this size (+ index).")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    predictor = Predictor(_WORKDIR.value)
    model_config = predictor.config.model
    tokenizer_dir = _TOKENIZER.value or model_config.init_from
    written = hf_export.export(predictor.params, model_config, _OUTPUT.value, tokenizer_dir=tokenizer_dir,
                               max_shard_bytes=int(_MAX_SHARD_GB.value * 1e9))
  except (ValueError, OSError) as e:  # No checkpoint, or a model no HF class can hold: one clear line.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported checkpoint step {predictor.step} of {_WORKDIR.value} to {_OUTPUT.value}: {', '.join(written)}")


if __name__ == "__main__":
  app.run(main)
