"""Export a trained run as a LenVM directory in the reference layout (Hugging Face causal LM + value head).

  python -m experiments.export_hf --workdir runs/synthetic --output exports/synthetic [--tokenizer HF_DIR] \
      [--step=latest|best|N] [--overwrite]

The checkpoint (--step; default the newest that restores intact) becomes config.json + model.safetensors (float32;
sharded with an index above --max_shard_size_gb, 5 by default) + value_head.safetensors. Tokenizer and
generation_config files are copied from --tokenizer, else from the run's model.init_from directory; a run with
neither (e.g. synthetic data) gets none. A non-empty --output is refused (its other files would sit beside the new
weights) unless --overwrite, which empties it first.
"""

from absl import app, flags

from experiments import cli
from lenvm_jax.data import output_dir, tokenizer as tokenizer_lib
from lenvm_jax.model import hf_export

_RUN = cli.run_flags("Training workdir (its config and checkpoints).")
_OUTPUT = cli.output_flag("Directory to write the LenVM into (new or empty).", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "HF directory whose tokenizer files to include "
                                 "(default: the run's model.init_from).")
_MAX_SHARD_GB = cli.max_shard_flag()
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Empty a non-empty --output before writing.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  output_dir.refuse_same_directory(_RUN.workdir.value, _OUTPUT.value, "--workdir", "--output", emptied=_OVERWRITE.value)
  replaced = hf_export.check_export_dir(_OUTPUT.value, _OVERWRITE.value)
  predictor = cli.load_predictor(_RUN)
  model_config = predictor.config.model
  if _TOKENIZER.value:  # Another model's tokenizer would pair ids with embedding rows the model does not have.
    try:
      size = tokenizer_lib.load_tokenizer(_TOKENIZER.value).vocab_size
    except (ValueError, OSError):
      size = None  # Tokenizer files this loader does not read are copied as they are.
    if size is not None and size > model_config.vocab_size:
      raise cli.errors.UserError.at(f"the tokenizer has {size} tokens, the model's vocabulary "
                                    f"{model_config.vocab_size}", f"--tokenizer={_TOKENIZER.value}",
                                    "give the tokenizer the run was trained with")
  hf_export.remove_entries(_OUTPUT.value, replaced)  # Only now: a failed load leaves the previous export as it was.
  with cli.user_errors(ValueError):  # A model that no HF class can hold.
    written = hf_export.export(predictor.params, model_config, _OUTPUT.value,
                               tokenizer_dir=_TOKENIZER.value or model_config.init_from,
                               max_shard_bytes=int(_MAX_SHARD_GB.value * 1e9))
  print(f"exported checkpoint step {predictor.step} of {_RUN.workdir.value} to {_OUTPUT.value}: {', '.join(written)}")


if __name__ == "__main__":
  cli.run(main)
