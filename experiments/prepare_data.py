"""Import generator trajectories into validated ArrayRecord shards (train / eval) for training.

  python -m experiments.prepare_data --format=reference_jsonl --input=a.jsonl,b.jsonl --tokenizer=HF_DIR \
      --output_dir=data/run1 [--generator=NAME] [--eval_fraction=0.1] [--max_len=4096] [--on_bad_record=skip]
  python -m experiments.prepare_data --format=tokenized_jsonl --input=t.jsonl --vocab_size=32000 --output_dir=...
  python -m experiments.prepare_data --format=champ --output_dir=data/champ --max_len=8192 [--tokenizer=...]

--format=champ reads the installed champ-dataset package (lenvm_jax/data/champ.py), so it takes no --input (ignored
if given); its tokenizer defaults to the Mistral v1 SentencePiece model shipped in mistral-common.

Writes <output_dir>/{train,eval}-*.array_record and stats.json (lengths per generator), and prints the suggested
gamma (the p99 rule, lenvm_jax/value/gamma.py). A bad record stops the run with one line "error: <file>:<line>:
field ...: ..." and exit code 2, or, with --on_bad_record=skip, is skipped and counted in stats.json. The settings
go to import.json: rerunning the same command keeps the shards that already exist, while a directory that holds
another import (other inputs or flags, or a generate run) is refused unless --overwrite replaces it.

To add a format: a function(FLAGS) -> iterable of ImportedRecord | RecordError (see lenvm_jax/data/prepare.py),
registered in FORMATS.
"""

import functools
import itertools
import os

from absl import app, flags

from experiments import cli
from lenvm_jax.data import champ, output_dir as output_dir_lib, prepare as prepare_lib, reference_jsonl
from lenvm_jax.data.tokenizer import Tokenizer, load_tokenizer
from lenvm_jax.errors import UserError
from lenvm_jax.value import gamma as gamma_lib

FLAGS = flags.FLAGS


# Formats whose data comes with a natural tokenizer, used when --tokenizer is not given.
DEFAULT_TOKENIZERS = {"champ": champ.default_tokenizer_path}


def tokenizer_path() -> str | None:
  default = DEFAULT_TOKENIZERS.get(FLAGS.format)
  return FLAGS.tokenizer or (default() if default else None)


@functools.cache
def tokenizer() -> Tokenizer:
  """Loaded once: formats and the vocab_size default share it."""
  if not tokenizer_path():
    raise ValueError(f"--format={FLAGS.format} needs --tokenizer (HF tokenizer dir, tokenizer.json or "
                     "SentencePiece .model)")
  return load_tokenizer(tokenizer_path())


def vocab_size() -> int:
  if FLAGS.vocab_size:
    return FLAGS.vocab_size
  if tokenizer_path():
    return tokenizer().vocab_size
  raise ValueError("--vocab_size is needed (or --tokenizer, whose vocabulary size is the default)")


def input_files(flag_values) -> list[str]:
  missing = [path for path in flag_values.input if not os.path.isfile(path)]
  if missing:
    raise FileNotFoundError(f"--input: no such file: {missing[0]}")
  return flag_values.input


def reference_jsonl_records(flag_values):
  paths, text_tokenizer = input_files(flag_values), tokenizer()
  return itertools.chain.from_iterable(
      reference_jsonl.iter_reference_jsonl(path, text_tokenizer, eval_fraction=flag_values.eval_fraction,
                                           generator=flag_values.generator) for path in paths)


def tokenized_jsonl_records(flag_values):
  paths, vocab = input_files(flag_values), vocab_size()
  return itertools.chain.from_iterable(
      reference_jsonl.iter_tokenized_jsonl(path, vocab, flag_values.max_len,
                                           eval_fraction=flag_values.eval_fraction) for path in paths)


def champ_records(flag_values):
  return champ.iter_champ(tokenizer(), eval_fraction=flag_values.eval_fraction,
                          tag_generator=flag_values.champ_tag_generator)


FORMATS = {
    "reference_jsonl": reference_jsonl_records,
    "tokenized_jsonl": tokenized_jsonl_records,
    "champ": champ_records,
}

flags.DEFINE_enum("format", None, list(FORMATS), "Input format.")
flags.DEFINE_boolean("champ_tag_generator", True,
                     "champ: end each prompt's last turn with \"(The answer is written by <generator>.)\".")
flags.DEFINE_list("input", None, "Input file(s), comma-separated.")
flags.DEFINE_string("output_dir", None, "Where the shards and stats.json go.")
flags.DEFINE_string("tokenizer", None, "HF tokenizer directory, tokenizer.json, or SentencePiece model.")
flags.DEFINE_string("generator", None, "Generator name for records whose meta_info has none.")
flags.DEFINE_float("eval_fraction", 0.1, "Share of prompts (not records) that go to the eval split.")
flags.DEFINE_integer("max_len", 4096, "Training row length; a prompt must be shorter.")
flags.DEFINE_integer("vocab_size", None, "Token ids must be below this; default: the tokenizer's vocabulary size.")
flags.DEFINE_integer("shard_size", 4096, "Records per ArrayRecord shard.")
flags.DEFINE_enum("on_bad_record", "error", prepare_lib.BAD_RECORD_POLICIES,
                  "error: stop at the first bad record; skip: skip and count it.")
flags.DEFINE_bool("overwrite", False, "Replace another import in --output_dir instead of refusing.")
flags.mark_flags_as_required(["format", "output_dir"])
flags.register_multi_flags_validator(["format", "input"], lambda f: f["format"] == "champ" or bool(f["input"]),
                                     "--input is required (except for --format=champ)")
flags.register_validator("eval_fraction", lambda value: 0.0 <= value < 1.0, "--eval_fraction must be in [0, 1)")


def summary(result: dict) -> str:
  records, shards = result["records"], result["shards"]
  lines = [", ".join(f"{split}: {records[split]} records in {shards[split]} shards" for split in records)]
  skipped = result["skipped"]
  if skipped["total"]:
    by_field = ", ".join(f"{field}={count}" for field, count in sorted(skipped["by_field"].items()))
    lines.append(f"skipped {skipped['total']} bad records ({by_field})")
  train = result["splits"].get("train", {}).get("overall")
  if train and train["count"]:
    lines.append(f"train: p99 completion length {train['p99']:.0f}, suggested gamma "
                 f"{gamma_lib.p99_gamma(train['p99']):.5f}, unfinished {train['unfinished_fraction']:.1%}")
  return "\n".join(lines)


def import_settings(flag_values) -> dict:
  """What makes an import: a rerun with the same settings resumes it, other settings are another import."""
  inputs = [{"path": os.path.abspath(path), "bytes": os.path.getsize(path), "mtime_ns": os.stat(path).st_mtime_ns}
            for path in (flag_values.input or []) if os.path.isfile(path)]
  return {"format": flag_values.format, "input": inputs, "tokenizer": tokenizer_path(),
          "generator": flag_values.generator, "eval_fraction": flag_values.eval_fraction,
          "max_len": flag_values.max_len, "vocab_size": flag_values.vocab_size, "shard_size": flag_values.shard_size,
          "on_bad_record": flag_values.on_bad_record, "champ_tag_generator": flag_values.champ_tag_generator}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  seen = {}
  for path in FLAGS.input or []:  # The same file twice would import every record twice, silently.
    if os.path.realpath(path) in seen:
      raise UserError.at("a file given twice", f"--input={path} (also as {seen[os.path.realpath(path)]})",
                         "give each input file once")
    seen[os.path.realpath(path)] = path
  with cli.user_errors(ValueError, OSError):  # A missing input file, tokenizer or vocabulary size.
    records = FORMATS[FLAGS.format](FLAGS)
    vocab = vocab_size()
  output_dir_lib.claim(FLAGS.output_dir, "import.json", import_settings(FLAGS), overwrite=FLAGS.overwrite)
  result = prepare_lib.prepare(records, FLAGS.output_dir, vocab_size=vocab, max_len=FLAGS.max_len,
                               shard_size=FLAGS.shard_size, on_bad_record=FLAGS.on_bad_record)
  print(summary(result))
  print(f"wrote {os.path.join(FLAGS.output_dir, 'stats.json')}")
  if not sum(result["records"].values()):
    raise UserError(f"no records imported from {', '.join(FLAGS.input or [FLAGS.format])}")


if __name__ == "__main__":
  cli.run(main)
