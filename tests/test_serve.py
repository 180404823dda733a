"""The HTTP server (experiments/serve.py, lenvm_jax/serving/) live on localhost, driven by the `openai` client as the
reference's LIFEBench and trade-off scripts drive the reference server: chat completions, streaming, n > 1, every
length rule through extra_body.custom_params, concurrency equal to serving alone, 400 / 429 / 503, disconnects and
SIGTERM. One server process for the module (a tiny run trained with an LM head, a character tokenizer of its 64 ids);
the SIGTERM test runs last and ends it.

Over ~350 lines: one live server per module is shared by all its tests, so they stay in one file.
"""

import concurrent.futures
import http.client
import json
import math
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import REPO, assert_one_error_line, run_cli, run_config

openai = pytest.importorskip("openai")

# 64 tokens, one character each but EOS: id 1 is the tiny run's EOS (the synthetic data's), "</s>".
CHARS = "~abcdefghijklmnopqrstuvwxyz0123456789 .,:?!+-*=<>|/\nABCDEFGHIJK"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
MAX_TOKENS, SLOTS, MAX_WAITING = 96, 8, 8
MESSAGES = [{"role": "user", "content": "how long?"}]


def _tokenizer_dir(path):
  from tokenizers import Tokenizer, decoders, models
  vocab = {CHARS[0]: 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARS[1:])}}
  assert len(vocab) == 64
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
  tokenizer.decoder = decoders.Fuse()
  path.mkdir()
  tokenizer.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": TEMPLATE}))
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  from experiments.configs import tiny
  from lenvm_jax.train import trainer
  config = tiny.get_config()
  config.mesh.data = 1
  config.train.eval_every = 0
  config.train.steps = 4
  config.checkpoint.every_steps = 4
  config.loss.lm_weight = 1.0  # The shared trunk generates with its LM head.
  root = tmp_path_factory.mktemp("serve")
  trainer.train_and_evaluate(run_config(config), str(root / "run"))
  _tokenizer_dir(root / "tokenizer")
  url, process, log = _start(root, f"--workdir={root / 'run'}", f"--slots={SLOTS}", f"--max_waiting={MAX_WAITING}",
                             f"--max_new_tokens={MAX_TOKENS}", "--max_prompt_tokens=32", "--max_n=8", "--candidates=64",
                             "--max_body_bytes=20000")
  yield url, process, log, root
  if process.poll() is None:
    process.kill()
    process.wait()


def _start(root, *flags):
  """`python -m experiments.serve` on a free port with the test tokenizer, once /health says ok: (url, process, log
  path). Its output goes to a file (a pipe nobody reads could fill and stall it)."""
  port = _free_port()
  log = root / f"server_{port}.log"
  with open(log, "w") as out:
    process = subprocess.Popen([sys.executable, "-m", "experiments.serve", f"--tokenizer={root / 'tokenizer'}",
                                f"--port={port}", *flags], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    try:
      if _get(url, "/health")["status"] == "ok":
        break
    except OSError:
      time.sleep(0.3)
  assert process.poll() is None, log.read_text()[-3000:]
  return url, process, log


def _get(url, path):
  with urllib.request.urlopen(url + path, timeout=30) as response:
    body = response.read().decode()
    return body if path == "/metrics" else json.loads(body)


def _post(url, path, body, raw: bytes | None = None):
  request = urllib.request.Request(url + path, data=raw if raw is not None else json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"null")


def _client(server):
  return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def _chat(client, **kwargs):
  kwargs.setdefault("messages", MESSAGES)
  return client.chat.completions.create(model="run", **kwargs)


def _prompt_tokens(messages) -> int:
  rendered = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
  return len(rendered)  # One token per character.


def test_chat_completion_usage_and_models(server):
  client = _client(server)
  reply = _chat(client, max_tokens=24, seed=5, temperature=1.0)
  choice = reply.choices[0]
  assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
  assert reply.usage.prompt_tokens == _prompt_tokens(MESSAGES)
  generated = reply.usage.completion_tokens  # EOS counted, not in the text.
  assert len(choice.message.content) == generated - (choice.finish_reason == "stop")
  assert (generated == 24) == (choice.finish_reason == "length")
  assert reply.usage.total_tokens == reply.usage.prompt_tokens + generated
  assert [m.id for m in client.models.list().data] == ["run"]
  again = _chat(client, max_tokens=24, seed=5, temperature=1.0)
  assert again.choices[0].message.content == choice.message.content  # A seed is a seed.


def test_streaming_sends_the_same_text_and_ends_with_done(server):
  client = _client(server)
  whole = _chat(client, max_tokens=40, seed=7)
  chunks = list(_chat(client, max_tokens=40, seed=7, stream=True, stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.choices[0].message.content
  assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
      [whole.choices[0].finish_reason]
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  request = urllib.request.Request(server[0] + "/v1/completions", data=json.dumps(
      {"prompt": "abc", "max_tokens": 5, "stream": True, "seed": 1}).encode(),
                                   headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=60) as response:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
  assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_n_choices_are_distinct_streams_of_one_seed(server):
  client = _client(server)
  reply = _chat(client, max_tokens=30, seed=11, n=4)
  assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
  texts = [c.message.content for c in reply.choices]
  assert len(set(texts)) > 1
  counted = sum(len(t) + (c.finish_reason == "stop") for t, c in zip(texts, reply.choices))
  assert reply.usage.completion_tokens == counted
  assert reply.usage.prompt_tokens == _prompt_tokens(MESSAGES)  # Once per prompt, whatever n.


def test_stop_strings_cut_the_text_and_the_count(server):
  client = _client(server)
  plain = _chat(client, max_tokens=60, seed=21, temperature=1.0)
  text = plain.choices[0].message.content
  assert len(text) >= 12, text
  two, one = text[8:10], text[5]  # A two-token stop string (decoded text), a one-token one (a stop id).
  for stop in (two, one):
    cut = text.index(stop)
    for stream in (False, True):
      reply = _chat(client, max_tokens=60, seed=21, temperature=1.0, stop=[stop, "never seen"], stream=stream,
                    **({"stream_options": {"include_usage": True}} if stream else {}))
      if stream:
        chunks = list(reply)
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        usage = chunks[-1].usage
      else:
        got, reason, usage = reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
      assert (got, reason) == (text[:cut], "stop"), stop
      assert usage.completion_tokens == cut + len(stop)  # Up to the token that completed the stop string.


def test_completions_take_text_token_ids_and_lists_of_them(server):
  client = _client(server)
  reply = client.completions.create(model="run", prompt=[[5, 6, 7], "abc"], max_tokens=6, n=2, seed=4)
  assert [c.index for c in reply.choices] == [0, 1, 2, 3]
  assert reply.usage.prompt_tokens == 6
  alone = client.completions.create(model="run", prompt="abc", max_tokens=6, n=2, seed=4)
  assert [c.text for c in reply.choices[2:]] == [c.text for c in alone.choices]
  ids = client.completions.create(model="run", prompt=[CHARS.index(c) + 1 for c in "abc"], max_tokens=6, n=2, seed=4)
  assert [c.text for c in ids.choices] == [c.text for c in alone.choices]
  # Ours: sample_id picks the random stream (choice j of n draws stream j), return_token_ids the generated ids.
  second = client.completions.create(model="run", prompt="abc", max_tokens=6, seed=4,
                                     extra_body={"sample_id": 1, "return_token_ids": True}).choices[0]
  assert second.text == alone.choices[1].text
  assert "".join(CHARS[i - 1] if i > 1 else CHARS[0] for i in second.token_ids if i != 1) == second.text
  streamed = client.completions.create(model="run", prompt="abc", max_tokens=6, seed=4, stream=True,
                                       extra_body={"sample_id": 1, "return_token_ids": True})
  assert sum((getattr(c.choices[0], "token_ids", None) or [] for c in streamed), []) == second.token_ids


def _lifebench(client, constraint, target, seed, n=1, **custom):
  """As the reference's LIFEBench runner sends a length instruction (token metric: target + 1 for the EOS)."""
  return _chat(client, max_tokens=MAX_TOKENS, seed=seed, n=n, temperature=1.0, top_p=1.0, extra_body={
      "top_k": -1, "min_p": 0.0, "custom_params": {"value_constraint": constraint, "target_length": target + 1,
                                                   "target_length_mode": "total", **custom}})


@pytest.mark.parametrize("target", [6, 20, 48])
def test_every_rule_through_custom_params(server, target):
  client = _client(server)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    replies = {(rule, seed): pool.submit(_lifebench, client, rule, target, seed)
               for rule in ("eq", "le", "ge", "==", "<=", ">=") for seed in range(3)}
    replies = {key: future.result() for key, future in replies.items()}
  for (rule, _), reply in replies.items():
    text, tokens = reply.choices[0].message.content, reply.usage.completion_tokens
    if rule in ("eq", "=="):
      assert (len(text), tokens, reply.choices[0].finish_reason) == (target, target + 1, "stop"), reply
    elif rule in ("le", "<="):
      assert 1 <= len(text) <= target and reply.choices[0].finish_reason == "stop", reply
    else:
      assert len(text) >= target and reply.choices[0].finish_reason == "stop", reply


def test_soft_rules_tilts_and_the_reference_rules_run(server):
  client = _client(server)
  soft = _lifebench(client, "eq_soft", 20, 0, gamma=0.95)
  assert soft.choices[0].finish_reason in ("stop", "length")
  reference = _lifebench(client, "ge", 20, 0, length_rules="reference")  # The reference's `ge`: EOS at T + 2.
  assert len(reference.choices[0].message.content) == 21
  lengths = {}
  for scale in (-20.0, 20.0):
    replies = [_chat(client, max_tokens=MAX_TOKENS, seed=s, extra_body={"custom_params": {
        "value_scale": scale, "value_mode": "centered_exp", "value_entropy_threshold": 0.0}}) for s in range(3)]
    lengths[scale] = sum(r.usage.completion_tokens for r in replies)
  assert lengths[-20.0] < lengths[20.0], lengths
  for mode in ("mul", "linear", "exp", "length_mul", "value_bias"):
    assert _chat(client, max_tokens=8, seed=1, extra_body={"custom_params": {"scale": 0.5, "mode": mode}}).usage


def test_concurrent_requests_equal_each_served_alone(server):
  client = _client(server)
  lengths = [4 + (7 * i) % 40 for i in range(32)]  # Mixed: 4 .. 43 tokens; every fourth with a length rule.
  settings = [dict(max_tokens=n, seed=100 + i, temperature=0.7 + (i % 3) * 0.3,
                   messages=[{"role": "user", "content": "q" * (1 + i % 9)}],
                   extra_body={"custom_params": {"value_constraint": "eq", "target_length": 2 + i % (n - 1)}}
                   if i % 4 == 0 else {"top_k": 10 * (i % 3)}) for i, n in enumerate(lengths)]
  answer = lambda kwargs: (lambda r: (r.choices[0].message.content, r.choices[0].finish_reason,
                                      r.usage.completion_tokens))(_chat(client, **kwargs))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    together = list(pool.map(answer, settings))
  alone = [answer(kwargs) for kwargs in settings]
  assert together == alone
  assert len({t for t, _, _ in together}) > 16


def test_value_endpoints_agree_with_each_other(server):
  url = server[0]
  ids = [5, 9, 14, 3, 22, 7]
  status, encoded = _post(url, "/encode", {"input_ids": [ids]})
  assert status == 200 and len(encoded[0]["embedding"]) == len(ids)
  status, single = _post(url, "/encode", {"input_ids": ids})
  assert status == 200 and single["embedding"] == encoded[0]["embedding"]
  status, token_values = _post(url, "/token_value", {"input_ids": [ids]})
  assert token_values["values"][0] == encoded[0]["embedding"]
  # z(prefix + c) scored as an alternative next token equals the full forward's z at c.
  status, tree = _post(url, "/tree_value", {"input_ids": [ids[:-1]], "candidate_ids": [[ids[-1], 1, 30]]})
  assert status == 200 and len(tree["embedding"]) == 3
  assert tree["embedding"][0] == pytest.approx(encoded[0]["embedding"][-1], abs=2e-3)
  status, candidates = _post(url, "/candidate_value", {"input_ids": [ids[:-1], ids[:2]],
                                                       "candidate_ids": [[ids[-1]], [ids[2]]]})
  assert candidates["values"][0][0] == pytest.approx(tree["embedding"][0], abs=1e-5)
  assert candidates["values"][1][0] == pytest.approx(encoded[0]["embedding"][2], abs=2e-3)
  status, length = _post(url, "/v1/length", {"prompt": [ids, ids[:3]]})
  gamma, first = length["gamma"], length["data"][0]
  assert first["value"] == pytest.approx(-1 / (1 + math.exp(-encoded[0]["embedding"][-1])), abs=1e-4)
  assert first["predicted_length"] == pytest.approx(math.log1p(first["value"]) / math.log(gamma), rel=1e-3)
  assert _post(url, "/v1/length", {"messages": MESSAGES})[1]["data"][0]["prompt_tokens"] == _prompt_tokens(MESSAGES)


@pytest.mark.parametrize("body, field", [
    ({"messages": MESSAGES, "top_p": 2.0}, "top_p"),
    ({"messages": MESSAGES, "max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    ({"messages": MESSAGES, "n": 9}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x" * 80}]}, "messages"),
    ({"messages": MESSAGES, "custom_params": {"value_constraint": "about", "target_length": 5}},
     "custom_params.value_constraint"),
    ({"messages": MESSAGES, "custom_params": {"op": "eq", "target_length": MAX_TOKENS + 1}},
     "custom_params.target_length"),
    ({"messages": MESSAGES, "custom_params": {"target_length": 5, "target_length_mode": "soon"}},
     "custom_params.target_length_mode"),
    ({"messages": MESSAGES, "custom_params": {"value_mode": "wild"}}, "custom_params.value_mode"),
    ({"messages": MESSAGES, "custom_params": {"target_length": 5, "gamma": 1.5}}, "custom_params.gamma"),
    ({"messages": MESSAGES, "temperature": 0, "custom_params": {"target_length": 5}}, "temperature"),
    ({"messages": MESSAGES, "stop": [""]}, "stop"),
    ({"messages": MESSAGES, "logprobs": True}, "logprobs"),
    ({"messages": MESSAGES, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": MESSAGES, "n": 2, "stop_token_ids": list(range(2, 12))}, "stop_token_ids"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field):
  status, reply = _post(server[0], "/v1/chat/completions", body)
  assert status == 400, reply
  assert reply["error"]["param"] == field and reply["error"]["message"].startswith(field), reply


def test_bad_bodies_and_other_requests_are_undisturbed(server):
  url = server[0]
  assert _post(url, "/v1/chat/completions", None, raw=b"{not json")[0] == 400
  assert _post(url, "/v1/completions", None, raw=json.dumps({"prompt": "x" * 30000}).encode())[0] == 413
  assert _post(url, "/v1/completions", {"prompt": [1, 2, 99]})[1]["error"]["param"] == "prompt"
  # Extras a client of the reference's SGLang server may send are ignored, as there.
  assert _post(url, "/v1/completions", {"prompt": "ab", "max_tokens": 2, "skip_special_tokens": True})[0] == 200
  assert _post(url, "/tree_value", {"input_ids": [[2, 3]], "candidate_ids": [[64]]})[1]["error"]["param"] == \
      "candidate_ids[0]"
  client = _client(server)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    good = pool.submit(_chat, client, max_tokens=30, seed=3)
    bad = [pool.submit(_post, url, "/v1/chat/completions", {"messages": MESSAGES, "top_k": "many"}) for _ in range(6)]
    assert all(b.result()[0] == 400 for b in bad)
    assert good.result().choices[0].message.content == _chat(client, max_tokens=30, seed=3).choices[0].message.content
  assert _get(url, "/health")["status"] == "ok"


def _open_stream(url, body) -> http.client.HTTPConnection:
  """A streaming request whose first event has arrived (it is admitted); the caller closes it."""
  host, port = url.removeprefix("http://").split(":")
  connection = http.client.HTTPConnection(host, int(port), timeout=60)
  connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
  response = connection.getresponse()
  assert response.status == 200
  response.fp.readline()
  return connection


def _generated_tokens(url) -> float:
  line = next(l for l in _get(url, "/metrics").splitlines() if l.startswith("lenvm_generated_tokens_total"))
  return float(line.split()[-1])


def _wait_idle(url, seconds=20.0):
  deadline = time.time() + seconds
  while time.time() < deadline:
    health = _get(url, "/health")
    if health["busy_slots"] == 0 and health["outstanding"] == 0:
      return health
    time.sleep(0.05)
  raise AssertionError(f"not idle: {health}")


def test_full_queue_answers_429_and_a_disconnect_frees_the_slots(server):
  url = server[0]
  long_request = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "n": 8, "seed": 1,
                  "custom_params": {"value_constraint": "eq", "target_length": MAX_TOKENS}}
  before = _generated_tokens(url)
  first, second = _open_stream(url, long_request), _open_stream(url, long_request)  # 16 = slots + max_waiting.
  status, reply = _post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4})
  assert status == 429 and reply["error"]["type"] == "rate_limit_exceeded", reply
  deadline = time.time() + 20
  while (health := _get(url, "/health"))["busy_slots"] < SLOTS and time.time() < deadline:
    time.sleep(0.01)  # Admitted at the engine's next step.
  assert health["busy_slots"] == SLOTS and health["outstanding"] == 2 * 8 == SLOTS + health["waiting"], health
  first.close()
  second.close()
  _wait_idle(url)
  assert _generated_tokens(url) - before < 2 * 8 * MAX_TOKENS  # Cancelled, not run to their end.
  # A non-streaming client that hangs up is cancelled too.
  host, port = url.removeprefix("http://").split(":")
  body = json.dumps(long_request).encode()
  with socket.create_connection((host, int(port))) as raw:
    raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.time() + 20
    while _get(url, "/health")["busy_slots"] == 0 and time.time() < deadline:
      time.sleep(0.02)
  before = _generated_tokens(url)
  _wait_idle(url)
  assert _generated_tokens(url) - before < 8 * MAX_TOKENS
  assert _post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4})[0] == 200


def test_a_run_without_an_lm_head_needs_a_policy():
  result = run_cli("serve", f"--workdir={REPO / 'tests' / 'fixtures' / 'legacy_run'}", timeout=120)
  assert_one_error_line(result, "lm_weight", "--policy")


@pytest.mark.slow
def test_a_policy_generates_and_the_run_scores(server):
  """--policy: a separate generator (here the run itself as a policy workdir) paired with the run's LenVM."""
  root = server[3]
  url, process, _ = _start(root, f"--workdir={root / 'run'}", f"--policy={root / 'run'}", "--slots=4",
                           "--max_new_tokens=24", "--max_prompt_tokens=32", "--candidates=64")
  try:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    for constraint, check in (("eq", lambda n: n == 12), ("le", lambda n: 1 <= n <= 12), ("ge", lambda n: n >= 12)):
      reply = client.chat.completions.create(model="run", messages=MESSAGES, max_tokens=24, seed=0, extra_body={
          "top_k": -1, "custom_params": {"value_constraint": constraint, "target_length": 13}})
      assert check(len(reply.choices[0].message.content)), (constraint, reply)
    # The same weights generate as on the shared trunk: an unguided greedy answer is the module server's.
    greedy = dict(model="run", messages=MESSAGES, max_tokens=12, temperature=0)
    assert client.chat.completions.create(**greedy).choices[0].message.content == \
        _client(server).chat.completions.create(**greedy).choices[0].message.content
  finally:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


@pytest.mark.slow
def test_a_policy_alone_serves_plain_generation(server):
  """--policy without --workdir: the generator through the engine, no LenVM: greedy answers equal the run's own,
  a length rule and the value endpoints are refused."""
  root = server[3]
  url, process, _ = _start(root, f"--policy={root / 'run'}", "--slots=2", "--max_new_tokens=12",
                           "--max_prompt_tokens=32", "--eos_ids=1")
  try:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    greedy = dict(model="run", messages=MESSAGES, max_tokens=12, temperature=0)
    assert client.chat.completions.create(**greedy).choices[0].message.content == \
        _client(server).chat.completions.create(**greedy).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="custom_params"):
      client.chat.completions.create(**greedy, extra_body={"custom_params": {"value_constraint": "le",
                                                                             "target_length": 4}})
    assert _post(url, "/v1/length", {"prompt": [3, 4, 5]})[0] >= 400
  finally:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_sigterm_drains_in_flight_requests_then_exits_0(server):
  """Last: it ends the module's server."""
  url, process, log, _ = server
  client = _client(server)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # Two rounds of full slots: ~200 decode steps in flight.
    in_flight = [pool.submit(_lifebench, client, "eq", MAX_TOKENS - 1, seed, n=SLOTS) for seed in (2, 3)]
    deadline = time.time() + 20
    while _get(url, "/health")["outstanding"] < 2 * SLOTS and time.time() < deadline:
      time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    status, reply = _post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4})
    assert status == 503 and "shutting down" in reply["error"]["message"], reply
    replies = [future.result() for future in in_flight]
  for reply in replies:
    assert reply.usage.completion_tokens == SLOTS * MAX_TOKENS
    assert {c.finish_reason for c in reply.choices} == {"stop"}
  assert process.wait(timeout=60) == 0
  assert "server stopped" in log.read_text()
