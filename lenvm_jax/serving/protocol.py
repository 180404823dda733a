"""The OpenAI request schema -> decode-engine requests, and the responses back, as the LenVM reference server speaks it.

A request body is a parsed JSON object; every problem is a RequestError naming the field (an OpenAI-style 400), found
before anything reaches the engine. Chat messages go through the tokenizer's chat template; /v1/completions takes
text, token ids, or a list of either (each prompt gets n choices, index = prompt * n + sample). `stop` strings end a
completion where they first appear in the decoded text (the text stops before them); a stop string that is a single
token also stops the engine on that token.

`custom_params` is read as the reference reads it (its SGLang fork, lvm_guided_sampling.py), aliases included:
  value_constraint | constraint | cmp | op    eq (=, ==, equal, equals), ge (>, >=, gte, greater_equal),
                                             le (<, <=, lte, less_equal), eq_soft (soft, equal_soft)
  target_length / target_value               the target in tokens (EOS counted) or as u* = 1 - gamma ** n
  target_length_mode | length_mode           total (or budget): counts the whole answer; remaining: fixed remainder
  gamma | length_gamma                       gamma of the length <-> value conversions (default: the LenVM's own;
                                             the reference's default is 0.997)
  value_scale | scale, value_mode | mode     expectation guidance (mul, linear, exp, length_mul, value_bias) or the
                                             tilt p exp(scale u) (centered_exp), used when no target is given
  value_min, value_entropy_threshold | entropy_threshold
Routing as the reference's lvm_combined_guidance: a target makes it a hard rule (eq -> equal_to, le -> at_most,
ge -> at_least, eq_soft), else a scale or mode makes it expectation guidance, else none. `length_rules` (ours: a
name of guided.CONVENTIONS, default: the server's) says how the hard rules choose; "reference" is the reference's.
"""

import dataclasses
import math
import time
import uuid

from lenvm_jax.decoding.guided import CONVENTIONS, VALUE_MODES, LengthRequest

CONSTRAINTS = {"eq": "equal_to", "ge": "at_least", "le": "at_most", "eq_soft": "eq_soft"}
_CONSTRAINT_ALIASES = {**{a: "eq" for a in ("=", "==", "eq", "equal", "equals")},
                       **{a: "ge" for a in (">", ">=", "ge", "gte", "greater_equal")},
                       **{a: "le" for a in ("<", "<=", "le", "lte", "less_equal")},
                       **{a: "eq_soft" for a in ("eq_soft", "soft", "equal_soft")}}
_GUIDANCE_KEYS = ("value_scale", "scale", "value_mode", "mode", "target_value", "target_length", "value_constraint",
                  "constraint", "cmp", "op")
# Fields this server cannot honour, with the values that ask for nothing (other unknown fields are ignored, as the
# reference's SGLang server ignores them: a client written for it sends its own extras).
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "tools": (None, []),
                "functions": (None, []), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
                "repetition_penalty": (None, 1, 1.0), "logit_bias": (None, {}), "min_tokens": (None, 0),
                "ignore_eos": (None, False), "best_of": (None, 1), "suffix": (None, ""),
                "response_format": (None, {"type": "text"}), "regex": (None,), "json_schema": (None,), "ebnf": (None,)}


class RequestError(Exception):
  """A request the server refuses: `field` (a dotted path) and why; status 400 unless said otherwise."""

  def __init__(self, field: str | None, message: str, status: int = 400, kind: str = "invalid_request_error"):
    super().__init__(f"{field}: {message}" if field else message)
    self.field, self.status, self.kind = field, status, kind

  def body(self) -> dict:
    return {"error": {"message": str(self), "type": self.kind, "param": self.field, "code": self.status}}


@dataclasses.dataclass(frozen=True)
class Limits:
  max_body_bytes: int = 1 << 20
  max_prompt_tokens: int = 512
  max_new_tokens: int = 256
  max_n: int = 16
  max_stop: int = 4


@dataclasses.dataclass(frozen=True)
class Generation:
  """One parsed generation request: its prompts (token ids) and the settings every choice shares."""
  prompts: list[tuple[int, ...]]
  n: int
  max_tokens: int
  temperature: float
  top_p: float
  top_k: int
  min_p: float
  seed: int
  stop: tuple[str, ...]
  stop_token_ids: tuple[int, ...]
  stream: bool
  include_usage: bool
  length: LengthRequest | None
  sample_id: int = 0  # Choice j draws random stream sample_id + j of the seed (ours: matches offline rows).
  return_token_ids: bool = False  # Ours: each choice (and streamed chunk) also carries its generated ids.


def _number(body: dict, field: str, default, kind=float, low=None, high=None, where: str = ""):
  value = body.get(field)
  name = f"{where}{field}"
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RequestError(name, f"must be a number, got {value!r:.60}")
  if kind is int and value != int(value):
    raise RequestError(name, f"must be an integer, got {value!r}")
  if not math.isfinite(value):
    raise RequestError(name, f"must be finite, got {value!r}")
  value = kind(value)
  if (low is not None and value < low) or (high is not None and value > high):
    raise RequestError(name, f"must lie in [{low}, {high}], got {value!r}")
  return value


def _first(params: dict, *names):
  """(name, value) of the first alias present (not None), as the reference reads them; (names[0], None) if none."""
  for name in names:
    if params.get(name) is not None:
      return name, params[name]
  return names[0], None


def length_request(params, convention: str, max_tokens: int) -> LengthRequest | None:
  """The LengthRequest that `custom_params` asks for (module docstring), or None (plain sampling)."""
  if params is None:
    return None
  if not isinstance(params, dict):
    raise RequestError("custom_params", "must be an object")
  where = "custom_params."
  convention = params.get("length_rules", convention)
  if convention not in CONVENTIONS:
    raise RequestError(f"{where}length_rules", f"must be one of {list(CONVENTIONS)}, got {convention!r:.40}")

  def floats(*names, low=None, high=None):
    name, value = _first(params, *names)
    return None if value is None else _number({name: value}, name, None, float, low, high, where)

  options = dict(gamma=floats("gamma", "length_gamma", low=1e-9, high=1 - 1e-9), value_min=floats("value_min"),
                 value_entropy_threshold=floats("value_entropy_threshold", "entropy_threshold", low=0.0))
  options = {k: v for k, v in options.items() if v is not None}  # Unset: LengthRequest's own defaults.
  if not any(params.get(k) is not None for k in _GUIDANCE_KEYS):
    return LengthRequest(**options) if options else None
  name, constraint = _first(params, "value_constraint", "constraint", "cmp", "op")
  name, mode_name = f"{where}{name}", _first(params, "target_length_mode", "length_mode")
  has_target = params.get("target_length") is not None or params.get("target_value") is not None
  if has_target:
    rule = _CONSTRAINT_ALIASES.get(str(constraint if constraint is not None else "eq").strip().lower())
    if rule is None:
      raise RequestError(name, f"must be one of eq, ge, le, eq_soft (or their aliases), got {constraint!r:.40}")
    mode = str(mode_name[1] or "total").strip().lower()
    if mode not in ("total", "budget", "remaining"):
      raise RequestError(f"{where}{mode_name[0]}", f"must be total (or budget) or remaining, got {mode!r:.40}")
    target = _number(params, "target_length", 0, float, 1, None, where)
    if target and target != int(target):
      raise RequestError(f"{where}target_length", f"must be a whole number of tokens, got {target!r}")
    target_value = floats("target_value", low=0.0, high=1 - 1e-12)
    if target_value is not None:
      target, options["target_value"] = 0, target_value
    elif rule != "le" and int(target) > max_tokens and mode != "remaining":
      raise RequestError(f"{where}target_length", f"{int(target)} is above max_tokens ({max_tokens}): the answer "
                         "would be cut before it; raise max_tokens")
    if mode == "remaining":
      options["target_mode"] = "remaining"
    return LengthRequest.following(convention, CONSTRAINTS[rule], int(target), **options)
  if constraint is not None:
    raise RequestError(f"{where}target_length", f"{name} needs a target: give target_length (or target_value)")
  mode_key, value_mode = _first(params, "value_mode", "mode")
  value_mode = str(value_mode or "mul").strip().lower()
  if value_mode not in VALUE_MODES:
    raise RequestError(f"{where}{mode_key}", f"must be one of {list(VALUE_MODES)}, got {value_mode!r:.40}")
  scale_key, scale = _first(params, "value_scale", "scale")
  scale = 1.0 if scale is None else _number({scale_key: scale}, scale_key, 1.0, float, where=where)
  return LengthRequest("expectation", value_mode=value_mode, scale=scale, **options)


def token_ids(value, field: str, vocab_size: int) -> tuple[int, ...]:
  if not value:
    raise RequestError(field, "must not be empty")
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
    raise RequestError(field, "token ids must be integers")
  bad = [i for i in value if not 0 <= i < vocab_size]
  if bad:
    raise RequestError(field, f"token ids must lie in [0, {vocab_size}), got {bad[:4]}")
  return tuple(value)


def prompts_of(body: dict, chat: bool, tokenizer, vocab_size: int) -> list[tuple[int, ...]]:
  """The prompts as token ids: chat messages through the chat template, or /v1/completions' prompt."""
  if chat:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
      raise RequestError("messages", "must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
      content = message.get("content") if isinstance(message, dict) else None
      if isinstance(content, list):  # OpenAI content parts: only text parts are understood.
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
          raise RequestError(f"messages[{i}].content", "only text content parts are supported")
        message = {**message, "content": "".join(p.get("text", "") for p in content)}
      if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") \
          or not isinstance(message.get("content"), str):
        raise RequestError(f"messages[{i}]", "needs role system, user or assistant and string content")
      messages[i] = {"role": message["role"], "content": message["content"]}
    if tokenizer is None:
      raise RequestError("messages", "this server has no tokenizer (start it with --tokenizer); send token ids to "
                         "/v1/completions instead")
    try:
      return [token_ids(tokenizer.prompt_ids(messages), "messages", vocab_size)]
    except ValueError as e:
      raise RequestError("messages", str(e)) from None
  prompt = body.get("prompt")
  if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt)):
    prompt = [prompt]
  if not isinstance(prompt, list) or not prompt:
    raise RequestError("prompt", "must be text, token ids, or a non-empty list of either")
  out = []
  for i, item in enumerate(prompt):
    field = f"prompt[{i}]" if len(prompt) > 1 else "prompt"
    if isinstance(item, str):
      if tokenizer is None:
        raise RequestError(field, "this server has no tokenizer (start it with --tokenizer): send token ids")
      out.append(token_ids(tokenizer.encode(item), field, vocab_size))
    elif isinstance(item, list):
      out.append(token_ids(item, field, vocab_size))
    else:
      raise RequestError(field, "must be text or a list of token ids")
  return out


def parse_generation(body, chat: bool, tokenizer, vocab_size: int, limits: Limits, convention: str) -> Generation:
  """The request body of /v1/chat/completions (chat) or /v1/completions as a Generation; RequestError if bad."""
  if not isinstance(body, dict):
    raise RequestError(None, "the request body must be a JSON object")
  for field, nothing in _UNSUPPORTED.items():
    if body.get(field) not in nothing:
      raise RequestError(field, f"is not supported by this server (leave it out or at {nothing[-1]!r})")
  prompts = prompts_of(body, chat, tokenizer, vocab_size)
  longest = max(map(len, prompts))
  if longest > limits.max_prompt_tokens:
    raise RequestError("messages" if chat else "prompt", f"the prompt has {longest} tokens, more than this server's "
                       f"limit of {limits.max_prompt_tokens}", kind="context_length_exceeded")
  max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = _number(body, max_field, min(16 if not chat else limits.max_new_tokens, limits.max_new_tokens), int,
                       1, limits.max_new_tokens)
  n = _number(body, "n", 1, int, 1, limits.max_n)
  if n * len(prompts) > limits.max_n:
    raise RequestError("n", f"{len(prompts)} prompts x n = {n} asks for more than this server's {limits.max_n} "
                       "completions per request")
  stop = body.get("stop")
  stop = [stop] if isinstance(stop, str) else (stop or [])
  if not isinstance(stop, list) or len(stop) > limits.max_stop or not all(isinstance(s, str) and s for s in stop):
    raise RequestError("stop", f"must be a non-empty string or a list of at most {limits.max_stop} of them")
  if stop and tokenizer is None:
    raise RequestError("stop", "this server has no tokenizer (start it with --tokenizer): use stop_token_ids")
  stop_ids = body.get("stop_token_ids") or []
  stop_ids = token_ids(stop_ids, "stop_token_ids", vocab_size) if stop_ids else ()
  if tokenizer is not None:  # A stop string that is one token stops the engine on that token too.
    stop_ids += tuple(ids[0] for ids in (tokenizer.encode(s) for s in stop) if len(ids) == 1)
  stream_options = body.get("stream_options") or {}
  if not isinstance(stream_options, dict):
    raise RequestError("stream_options", "must be an object")
  if not isinstance(body.get("stream", False), bool):
    raise RequestError("stream", "must be true or false")
  return Generation(
      prompts=prompts, n=n, max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, float, 0.0, 100.0),
      top_p=_number(body, "top_p", 1.0, float, 1e-9, 1.0), top_k=max(_number(body, "top_k", 0, int, -1), 0),
      min_p=_number(body, "min_p", 0.0, float, 0.0, 1.0 - 1e-9), seed=_number(body, "seed", 0, int, 0, 2**31 - 1),
      stop=tuple(stop), stop_token_ids=tuple(dict.fromkeys(stop_ids)), stream=body.get("stream", False),
      include_usage=bool(stream_options.get("include_usage")),
      sample_id=_number(body, "sample_id", 0, int, 0, 2**31 - 1 - limits.max_n),
      return_token_ids=bool(body.get("return_token_ids", False)),
      length=length_request(body.get("custom_params"), body.get("length_rules", convention), max_tokens))


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def choice(index: int, text: str, finish_reason: str | None, chat: bool, delta: bool = False,
           token_ids: list | None = None) -> dict:
  if not chat:
    out = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
  else:
    message = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
    out = {"index": index, "delta" if delta else "message": message, "logprobs": None, "finish_reason": finish_reason}
  if token_ids is not None:
    out["token_ids"] = token_ids
  return out


def response(request_id: str, model: str, chat: bool, choices: list, usage_: dict | None, chunk: bool = False) -> dict:
  kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
  out = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
  if usage_ is not None or not chunk:
    out["usage"] = usage_
  return out
