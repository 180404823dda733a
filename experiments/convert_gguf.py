"""Convert a llama.cpp GGUF file (Llama / Qwen2 / Qwen3) into a Hugging Face causal-LM directory.

  python -m experiments.convert_gguf --input SmolLM2-135M-Instruct.Q4_1.gguf --output models/smollm2

Writes config.json (bos / eos / pad ids included), model.safetensors (float32: the quantized weights dequantized,
llama.cpp's q/k row order undone; sharded with an index above --max_shard_size_gb), tokenizer.json,
tokenizer_config.json (chat template, special tokens) and generation_config.json (EOS ids, with the chat
template's end-of-turn token). No value_head.safetensors: the directory is a plain LM, so model.init_from on it
starts a fresh value head. The GGUF itself also works directly wherever an HF directory does; converting pays off
when a run is started many times or the files go to another tool. Bad input: one line "error: ..." and exit 2.

The output follows export_hf's rule: a new or empty directory, else refused unless --overwrite, which replaces its
contents once the GGUF has loaded (a training run directory is always refused).
"""

import json
import os

import jax
from absl import app, flags

from experiments import cli
from lenvm_jax import files, gguf_file, sharding
from lenvm_jax.data import output_dir as output_dir_lib, tokenizer as tokenizer_lib
from lenvm_jax.model import gguf_import, hf_config, hf_export, hf_layout

_INPUT = flags.DEFINE_string("input", None, "The .gguf file to convert.")
_OUTPUT = cli.output_flag("Directory to write the Hugging Face model into (created if needed).")
_MAX_SHARD_GB = cli.max_shard_flag()
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the contents of a non-empty --output.")
flags.mark_flags_as_required(["input", "output"])


def convert(input_path: str, output_dir: str, max_shard_bytes: int = hf_export.DEFAULT_MAX_SHARD_BYTES,
            overwrite: bool = False) -> list[str]:
  """Writes the HF directory; returns the file names written. Everything is checked before the first write; with
  `overwrite` a non-empty output is emptied once the GGUF has loaded (hf_export.check_export_dir)."""
  output_dir_lib.refuse_same_directory(input_path, output_dir, "--input", "--output", emptied=overwrite)
  replaced = hf_export.check_export_dir(output_dir, overwrite)
  model_config = gguf_import.load_model_config(input_path, dtype="float32")
  reader = gguf_file.read_gguf(input_path)
  tokenizer_lib.build_gguf_tokenizer(reader, input_path)  # An unsupported tokenizer fails here, before any weights.
  generation = tokenizer_lib.gguf_generation_config(input_path)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    params = gguf_import.load_params(input_path, model_config, mesh)

  hf_export.remove_entries(output_dir, replaced)
  os.makedirs(output_dir, exist_ok=True)
  ids = {name: value for name, value in generation.items() if name != "eos_token_id"}
  eos = generation["eos_token_id"]
  config = hf_config.hf_config_from_model_config(model_config, eos_token_id=eos[0] if len(eos) == 1 else eos, **ids)
  files.write_atomic(os.path.join(output_dir, "config.json"), json.dumps(config, indent=2, sort_keys=True))
  written = ["config.json"]
  written += hf_export.save_trunk(params, model_config, output_dir, max_shard_bytes)
  return written + tokenizer_lib.write_gguf_tokenizer_files(input_path, output_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.user_errors(ValueError, OSError):  # Missing file, not a GGUF, unsupported architecture / quantization.
    written = convert(_INPUT.value, _OUTPUT.value, max_shard_bytes=int(_MAX_SHARD_GB.value * 1e9),
                      overwrite=_OVERWRITE.value)
  print(f"converted {_INPUT.value} to {_OUTPUT.value}: {', '.join(written)}")


if __name__ == "__main__":
  cli.run(main)
