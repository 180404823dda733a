"""Import path: tokenizers (HF dir, tokenizer.json, SentencePiece), reference and tokenized JSONL, the CLI."""

import json
import os
import pathlib

import numpy as np
import pytest

from lenvm_jax.data import prompt_groups, reference_jsonl
from lenvm_jax.data.arrayrecord import ArrayRecordTrajectories
from lenvm_jax.data.prepare import prepare
from lenvm_jax.data.records import RecordError
from lenvm_jax.data.tokenizer import load_tokenizer
from tests import helpers
from tests.helpers import CHATML, CHATML_SPECIALS, build_tokenizer_json, reference_line, write_lines


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf_tokenizer")
  build_tokenizer_json(directory / "tokenizer.json")
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": CHATML, "eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": None}))
  return directory


@pytest.fixture(scope="module")
def tok(hf_dir):
  return load_tokenizer(str(hf_dir))


def sentencepiece_model():
  import mistral_common
  path = pathlib.Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
  if not path.is_file():
    pytest.skip("mistral_common's tokenizer.model.v1 is not installed")
  return path


def test_chat_template_renders_generation_prompt_without_added_special_tokens(tok):
  messages = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "Hello there"}]
  expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
              "<|im_start|>assistant\n")
  ids = tok.prompt_ids(messages)
  assert tok.decode(ids) == expected
  assert ids == tok.encode(expected)
  assert ids[0] == tok.encode("<|im_start|>")[0] and len(tok.encode("<|im_start|>")) == 1  # Special token, 1 id.
  assert tok.eos_id == tok.encode("<|im_end|>")[0]
  assert tok.completion_ids("The answer") == tok.encode("The answer") + [tok.eos_id]
  assert tok.completion_ids("The answer", finished=False) == tok.encode("The answer")
  with pytest.raises(ValueError, match="must not start with the assistant"):
    tok.prompt_ids([{"role": "assistant", "content": "hi"}])


# Chat templates in the styles of widely used model families (written for this test): BOS from the config, system
# turns lifted out or defaulted, role checks through raise_exception, whitespace control, filters, a {% generation %}
# block. HF_SPECIALS are their special tokens.
HF_SPECIALS = CHATML_SPECIALS + ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                 "<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"]
TEMPLATES = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>",
               "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n"
               "    {%- set system_message = messages[0]['content'] | trim %}\n    {%- set messages = messages[1:] %}\n"
               "{%- else %}\n    {%- set system_message = '' %}\n{%- endif %}\n"
               "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}\n"
               "{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n"
               "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
               "{%- endif %}\n"),
    "gemma": ("<bos>", "<eos>",
              "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate') }}{% endif %}{% if message['role'] == 'assistant' %}"
              "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
              "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "qwen": (None, "<|im_end|>",
             "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + "
             "'<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>"
             "\\n' }}\n{%- endif %}\n{%- for message in messages %}\n    {%- if message.role == 'user' or "
             "(message.role == 'system' and not loop.first) or message.role == 'assistant' %}\n        {{- "
             "'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n    {%- endif %}\n"
             "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"),
    "generation_block": (None, "<|endoftext|>",
                         "{% for message in messages %}{% if message['role'] == 'assistant' %}{% generation %}"
                         "{{ message['content'] }}{% endgeneration %}{% else %}{{ message['role'] | upper }}: "
                         "{{ message['content'] | tojson }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
}


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_chat_templates_give_the_ids_of_transformers_apply_chat_template(tmp_path, family):
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer
  bos, eos, template = TEMPLATES[family]
  base = Tokenizer.from_file(str(build_tokenizer_json(tmp_path / "base.json")))
  base.add_special_tokens(HF_SPECIALS[len(CHATML_SPECIALS):])
  base.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": template, "bos_token": bos, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}))
  ours, theirs = load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  system = [{"role": "system", "content": "  Be brief. "}]
  turns = [{"role": "user", "content": "What is 6 x 7?"}, {"role": "assistant", "content": "42"},
           {"role": "user", "content": 'And "6 x 8"?'}]
  for messages in (turns, turns[:1]) if family == "gemma" else (system + turns, turns[:1]):
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)  # A BatchEncoding in v5.
    assert ours.prompt_ids(messages) == expected, ours.decode(ours.prompt_ids(messages))
  assert ours.eos_id == theirs.eos_token_id
  if family == "gemma":  # The template's own error reaches the user as a ValueError naming the template.
    with pytest.raises(ValueError, match="chat template: System role not supported"):
      ours.prompt_ids(system + turns)


def test_a_chat_template_that_does_not_parse_is_named(tmp_path):
  build_tokenizer_json(tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m }}",
                                                              "eos_token": "<|im_end|>"}))
  with pytest.raises(ValueError, match=f"{tmp_path}: chat template does not parse"):
    load_tokenizer(str(tmp_path))


def test_tokenizer_json_alone_uses_plain_format_and_finds_eos(tmp_path):
  tok = load_tokenizer(str(build_tokenizer_json(tmp_path / "tokenizer.json")))
  assert tok.vocab_size == 300
  assert tok.eos_id == tok.encode("<|endoftext|>")[0]  # First known EOS name in the vocabulary.
  ids = tok.prompt_ids([{"role": "user", "content": "Hello there"}])
  assert tok.decode(ids) == "user: Hello there\nassistant:"
  bare = tmp_path / "bare"
  bare.mkdir()
  build_tokenizer_json(bare / "tokenizer.json", with_specials=False)
  with pytest.raises(ValueError, match="no EOS token"):
    load_tokenizer(str(bare / "tokenizer.json"))
  (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
  with pytest.raises(ValueError, match="not in the vocabulary"):
    load_tokenizer(str(bare))


def test_sentencepiece_default_is_mistral_v1_as_mistral_common_encodes_it():
  path = sentencepiece_model()
  from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
  from mistral_common.protocol.instruct.request import ChatCompletionRequest
  from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
  tok = load_tokenizer(str(path))
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (32000, 2, 1)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 6 x 7?"}]
  expected = MistralTokenizer.from_file(str(path)).encode_chat_completion(ChatCompletionRequest(messages=[
      SystemMessage(content="Be brief."), UserMessage(content="Hi there"), AssistantMessage(content="Hello."),
      UserMessage(content="What is 6 x 7?")])).tokens
  assert tok.prompt_ids(messages) == expected
  assert tok.completion_ids("42.") == tok.encode("42.") + [2]


@pytest.mark.parametrize("meta, finished", [
    ({}, True), ({"finish_reason": "stop"}, True), ({"finish_reason": {"type": "stop"}}, True),
    ({"finish_reason": "length"}, False), ({"finish_reason": {"type": "length"}}, False),
    ({"finish_reason": "max_tokens"}, False)])
def test_reference_completion_ends_with_eos_only_when_finished(tmp_path, tok, meta, finished):
  path = write_lines(tmp_path / "ref.jsonl", [reference_line(7, **meta)])
  (record,) = reference_jsonl.iter_reference_jsonl(path, tok, generator="gen-a")
  t = record.trajectory
  assert t.finished is finished
  assert t.completion_ids.tolist() == tok.encode("The answer is 42.") + ([tok.eos_id] if finished else [])
  assert t.prompt_ids.tolist() == tok.prompt_ids([
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "Hello there, how are you?"}])
  assert (t.prompt_id, t.generator, record.text, record.line) == ("7", "gen-a", "The answer is 42.", 1)
  assert record.meta["lenvm_idx"] == 7


def test_prepare_round_trip_returns_exactly_the_tokens(tmp_path, tok):
  lines = [reference_line(i, completion="The answer is 42." * (i + 1), generator="meta-gen" if i % 2 else None)
           for i in range(6)]
  path = write_lines(tmp_path / "ref.jsonl", lines)
  expected = [r.trajectory for r in reference_jsonl.iter_reference_jsonl(path, tok, generator="flag-gen")]
  out = tmp_path / "out"
  records = reference_jsonl.iter_reference_jsonl(path, tok, generator="flag-gen", split_of=lambda key: "train")
  result = prepare(records, str(out), vocab_size=tok.vocab_size, max_len=256)
  assert result["records"] == {"train": 6, "eval": 0}
  back = ArrayRecordTrajectories(str(out / "train"))
  assert len(back) == 6
  for i, want in enumerate(expected):
    got = back[i]
    np.testing.assert_array_equal(got.prompt_ids, want.prompt_ids)
    np.testing.assert_array_equal(got.completion_ids, want.completion_ids)
    assert (got.finished, got.prompt_id, got.generator) == (True, str(i), "meta-gen" if i % 2 else "flag-gen")


def test_all_completions_of_a_prompt_land_in_one_split(tmp_path, tok):
  lines = [reference_line(prompt, completion=f"answer {k}") for k in range(3) for prompt in range(60)]
  path = write_lines(tmp_path / "ref.jsonl", lines)
  splits = {}
  for record in reference_jsonl.iter_reference_jsonl(path, tok, eval_fraction=0.3):
    splits.setdefault(record.trajectory.prompt_id, set()).add(record.split)
  assert all(len(s) == 1 for s in splits.values())
  eval_prompts = sum(s == {"eval"} for s in splits.values())
  assert 5 <= eval_prompts <= 35
  assert prompt_groups.hash_split("17", 0.3) == prompt_groups.hash_split("17", 0.3)


BAD_REFERENCE_LINES = [
    ("{not json", "<json>"),
    ("[1, 2]", "<record>"),
    (json.dumps({"meta_info": {}}), "conversations"),
    (json.dumps({"conversations": "hi"}), "conversations"),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}),
     "conversations[1].from"),
    (json.dumps({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}), "conversations[0].value"),
    (json.dumps({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}),
     "conversations[0].value"),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}]}), "conversations"),
    (json.dumps({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}),
     "conversations"),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}),
     "conversations[-1].value"),
    (json.dumps({"conversations": [{"from": "gpt", "value": "a"}]}), "conversations"),
    (json.dumps({"conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}),
     "conversations"),  # The chat template's raise_exception.
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                 "meta_info": []}), "meta_info"),
    (reference_line(finish_reason=3), "meta_info.finish_reason"),
    (reference_line(prompt_id=[1]), "meta_info.lenvm_idx"),
]


def test_every_bad_reference_record_names_file_line_and_field(tmp_path, tok):
  good = reference_line(0)
  lines = [good] + [line for line, _ in BAD_REFERENCE_LINES]
  path = write_lines(tmp_path / "bad.jsonl", lines)
  items = list(reference_jsonl.iter_reference_jsonl(path, tok))
  assert not isinstance(items[0], RecordError)
  for item, (line_number, (_, field)) in zip(items[1:], enumerate(BAD_REFERENCE_LINES, start=2)):
    assert isinstance(item, RecordError), (line_number, item)
    assert (item.source, item.line, item.field) == (path, line_number, field)
    assert str(item).startswith(f"{path}:{line_number}: field {field!r}: ")
  assert len(items) == len(lines)

  # A prompt that leaves no room under max_len is caught by prepare's validation.
  long_path = write_lines(tmp_path / "long.jsonl", [reference_line(0, completion="ok")])
  with pytest.raises(RecordError, match=r"long\.jsonl:1: field 'prompt_ids'"):
    prepare(reference_jsonl.iter_reference_jsonl(long_path, tok), str(tmp_path / "long"),
            vocab_size=tok.vocab_size, max_len=8)

  # Skip mode keeps the good record and counts the bad ones by field.
  result = prepare(reference_jsonl.iter_reference_jsonl(path, tok, split_of=lambda key: "train"),
                   str(tmp_path / "skip"), vocab_size=tok.vocab_size, max_len=256, on_bad_record="skip")
  stats = json.loads((tmp_path / "skip" / "stats.json").read_text())
  assert stats == json.loads(json.dumps(result))
  assert stats["records"]["train"] == 1
  want = {}
  for _, field in BAD_REFERENCE_LINES:
    want[field] = want.get(field, 0) + 1
  assert stats["skipped"] == {"total": len(BAD_REFERENCE_LINES), "by_field": want}


def test_tokenized_jsonl_importer_yields_errors_and_splits_by_prompt(tmp_path):
  lines = [json.dumps({"prompt_ids": [1, 2], "completion_ids": [3, 4], "prompt_id": p}) for p in ("a", "a", 5)]
  lines += [json.dumps({"prompt_ids": [1, 2], "completion_ids": [3]}), "{oops", json.dumps({"prompt_ids": [1]}),
            json.dumps({"prompt_ids": [1, 2], "completion_ids": [99]})]
  path = write_lines(tmp_path / "tok.jsonl", lines)
  items = list(reference_jsonl.iter_tokenized_jsonl(path, vocab_size=10, max_len=16, eval_fraction=0.5))
  assert [i.split for i in items[:2]] == [prompt_groups.hash_split("a", 0.5)] * 2
  assert items[2].split == prompt_groups.hash_split("5", 0.5)
  assert items[3].trajectory.prompt_id is None and items[3].split in ("train", "eval")
  assert [(e.line, e.field) for e in items[4:]] == [(5, "<json>"), (6, "completion_ids"), (7, "completion_ids")]
  empty = write_lines(tmp_path / "empty.jsonl", [""])
  (error,) = reference_jsonl.iter_tokenized_jsonl(empty, 10, 16)
  assert isinstance(error, RecordError) and error.field == "<file>"


def run_cli(*args):
  return helpers.run_cli("prepare_data", *args, timeout=120)


def test_cli_error_mode_exits_2_with_one_line(tmp_path, hf_dir):
  path = write_lines(tmp_path / "bad.jsonl", [reference_line(0), BAD_REFERENCE_LINES[4][0]])
  done = run_cli("--format=reference_jsonl", f"--input={path}", f"--tokenizer={hf_dir}",
                 f"--output_dir={tmp_path / 'out'}")
  assert done.returncode == 2, done.stderr
  assert f"error: {path}:2: field 'conversations[1].from': must be one of" in done.stderr
  assert "Traceback" not in done.stderr


def test_cli_rerun_keeps_shards_and_stats(tmp_path, hf_dir):
  lines = [reference_line(p, completion=f"answer {k}", finish_reason="length" if k == 2 else "stop")
           for k in range(3) for p in range(20)] + ["{broken"]
  path = write_lines(tmp_path / "ref.jsonl", lines)
  out = tmp_path / "out"
  args = ("--format=reference_jsonl", f"--input={path}", f"--tokenizer={hf_dir}", f"--output_dir={out}",
          "--eval_fraction=0.25", "--shard_size=16", "--on_bad_record=skip", "--generator=tiny")
  first = run_cli(*args)
  assert first.returncode == 0, first.stderr
  assert "skipped 1 bad records (<json>=1)" in first.stdout and "suggested gamma" in first.stdout
  shards = sorted(p for p in os.listdir(out) if p.endswith(".array_record"))
  assert len(shards) >= 3
  mtimes = {p: os.stat(out / p).st_mtime_ns for p in shards}
  stats = (out / "stats.json").read_text()
  second = run_cli(*args)
  assert second.returncode == 0, second.stderr
  assert {p: os.stat(out / p).st_mtime_ns for p in shards} == mtimes
  assert sorted(p for p in os.listdir(out) if p.endswith(".array_record")) == shards
  assert (out / "stats.json").read_text() == stats
  result = json.loads(stats)
  assert sum(result["records"].values()) == 60
  assert result["splits"]["train"]["generators"]["tiny"]["unfinished_fraction"] == pytest.approx(1 / 3)
