"""The HTTP server: a FastAPI app over one EngineRunner (docs/serving.md).

  POST /v1/chat/completions, /v1/completions   OpenAI schema (protocol.py); stream=true answers server-sent events
                                               ending with `data: [DONE]`
  POST /encode, /tree_value, /token_value, /candidate_value   the reference's value endpoints (values.py)
  POST /v1/length                              V(s_0) and the predicted length of prompts (ours)
  GET  /health, /v1/models, /metrics
Errors are OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}): 400 naming the field, 413 for a body
over the limit, 429 when the queue is full, 503 while draining. A client that disconnects has its sequences
cancelled, which frees their slots at the engine's next step.
"""

import asyncio
import json
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lenvm_jax.decoding.engine import Request as EngineRequest
from lenvm_jax.serving import protocol
from lenvm_jax.serving.metrics import ServerMetrics
from lenvm_jax.serving.protocol import Limits, RequestError
from lenvm_jax.serving.text import StopText

_POLL_S = 0.25  # How often a waiting handler checks that its client is still there.


class Server:
  """What the routes share: the engine runner, tokenizer, LenVM values, limits and metrics."""

  def __init__(self, runner, *, tokenizer, values, limits: Limits, model_name: str, length_rules: str = "default"):
    self.runner, self.tokenizer, self.values, self.limits = runner, tokenizer, values, limits
    self.model_name, self.length_rules = model_name, length_rules
    self.vocab_size = runner.engine.models.vocab_size
    self.metrics = ServerMetrics(lambda: runner.engine.stats, lambda: runner.outstanding)


async def _body(request: Request, limits: Limits):
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
    raise RequestError(None, f"the request body is over {limits.max_body_bytes} bytes", status=413)
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limits.max_body_bytes:
      raise RequestError(None, f"the request body is over {limits.max_body_bytes} bytes", status=413)
    chunks.append(chunk)
  try:
    return json.loads(b"".join(chunks) or b"null")
  except (ValueError, UnicodeDecodeError) as e:
    raise RequestError(None, f"the request body is not valid JSON: {e}") from None


class _Choices:
  """The choices of one generation request as their tokens arrive: text (stop strings cut), finish reasons."""

  def __init__(self, server: Server, gen: protocol.Generation, ids: list[int]):
    eos = server.runner.engine.eos_ids
    self.index = {request_id: i for i, request_id in enumerate(ids)}
    self.texts = [StopText(server.tokenizer, gen.stop, eos + gen.stop_token_ids) for _ in ids]
    self.finish: list[str | None] = [None] * len(ids)
    self.stop_strings = bool(gen.stop)
    self.runner = server.runner
    self._ids_sent = [0] * len(ids)

  def new_ids(self, i: int) -> list[int]:
    """Choice i's generated ids not yet streamed."""
    tokens = self.texts[i].tokens
    out, self._ids_sent[i] = tokens[self._ids_sent[i]:], len(tokens)
    return out

  def take(self, kind: str, request_id, payload) -> int | None:
    """Applies one queue item; the choice index it touched (None if nothing new)."""
    if kind == "error":
      raise RequestError(None, f"the engine failed: {payload}", status=500, kind="server_error")
    i = self.index[request_id]
    if self.finish[i] is not None:
      return None
    text = self.texts[i]
    if kind == "tokens":
      # With stop strings one token at a time, so the text and the usage end at the token that completes one.
      for ids in ([token] for token in payload) if self.stop_strings else [payload]:
        text.add(ids)
        if text.stopped:
          self.finish[i] = "stop"
          self.runner.cancel([request_id])
          break
    else:
      self.finish[i] = {"cancelled": "stop"}.get(payload.finish_reason, payload.finish_reason)
    return i

  @property
  def done(self) -> bool:
    return all(f is not None for f in self.finish)

  def unfinished(self) -> list[int]:
    return [request_id for request_id, i in self.index.items() if self.finish[i] is None]


class _CountRequests:
  """ASGI middleware: requests by endpoint and status (a plain ASGI wrapper, so streamed responses and client
  disconnects pass through untouched)."""

  def __init__(self, app, metrics: ServerMetrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    status = [500]

    async def send_status(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, send_status)
    finally:
      path = scope.get("path", "")
      self.metrics.requests.labels(path if path in ENDPOINTS else "other", str(status[0])).inc()


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/encode", "/tree_value", "/token_value", "/candidate_value",
             "/v1/length", "/health", "/v1/models", "/metrics")


def create_app(server: Server) -> FastAPI:
  app = FastAPI(title="lenvm_jax", docs_url=None, redoc_url=None)
  runner, metrics, limits = server.runner, server.metrics, server.limits

  @app.exception_handler(RequestError)
  async def request_error(request: Request, e: RequestError):
    del request
    return JSONResponse(e.body(), status_code=e.status)

  app.add_middleware(_CountRequests, metrics=metrics)

  async def generate(request: Request, chat: bool):
    start = time.perf_counter()
    endpoint = request.url.path
    body = await _body(request, limits)
    gen = protocol.parse_generation(body, chat, server.tokenizer, server.vocab_size, limits, server.length_rules)
    seed = gen.seed if isinstance(body, dict) and body.get("seed") is not None else secrets.randbelow(2**31)
    requests = [EngineRequest(prompt, gen.max_tokens, gen.temperature, gen.top_k, gen.top_p, gen.min_p, seed,
                              gen.sample_id + sample, gen.length, gen.stop_token_ids)
                for prompt in gen.prompts for sample in range(gen.n)]
    ids, queue = runner.submit_all(requests)
    metrics.prompt_tokens.inc(sum(map(len, gen.prompts)) * gen.n)
    choices = _Choices(server, gen, ids)
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    prompt_tokens = sum(map(len, gen.prompts))
    first = [True]

    checked = [time.perf_counter()]

    async def next_item():
      """The next queue item, or None once the client is gone (its sequences are cancelled)."""
      while True:
        if time.perf_counter() - checked[0] > _POLL_S:
          checked[0] = time.perf_counter()
          if await request.is_disconnected():
            return None
        try:
          item = await asyncio.wait_for(queue.get(), _POLL_S)
        except asyncio.TimeoutError:
          continue
        if first[0] and item[0] == "tokens":
          first[0] = False
          metrics.first_token.labels(endpoint).observe(time.perf_counter() - start)
        if item[0] == "tokens":
          metrics.count_tokens(len(item[2]))
        return item

    def usage():
      return protocol.usage(prompt_tokens, sum(len(t.tokens) for t in choices.texts))

    if not gen.stream:
      try:
        while not choices.done:
          item = await next_item()
          if item is None:
            return Response(status_code=499)
          choices.take(*item)
      finally:
        runner.cancel(choices.unfinished())
      metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
      ids = lambda t: t.tokens if gen.return_token_ids else None
      return JSONResponse(protocol.response(request_id, server.model_name, chat, [
          protocol.choice(i, t.new_text(final=True), choices.finish[i], chat, token_ids=ids(t))
          for i, t in enumerate(choices.texts)], usage()))

    def event(choice_list, usage_=None):
      chunk = protocol.response(request_id, server.model_name, chat, choice_list, usage_, chunk=True)
      return f"data: {json.dumps(chunk)}\n\n"

    async def stream():
      try:
        if chat:
          yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None} for i in range(len(ids))])
        while not choices.done:
          item = await next_item()
          if item is None:
            return
          i = choices.take(*item)
          if i is None:
            continue
          text = choices.texts[i].new_text(final=choices.finish[i] is not None)
          new_ids = choices.new_ids(i) if gen.return_token_ids else None
          if text or new_ids:
            yield event([protocol.choice(i, text, None, chat, delta=True, token_ids=new_ids)])
          if choices.finish[i] is not None:
            yield event([protocol.choice(i, "", choices.finish[i], chat, delta=True)])
        if gen.include_usage:
          yield event([], usage())
        yield "data: [DONE]\n\n"
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
      finally:
        runner.cancel(choices.unfinished())

    return StreamingResponse(stream(), media_type="text/event-stream")

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await generate(request, chat=True)

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await generate(request, chat=False)

  async def values_of(request: Request, candidates: bool):
    if server.values is None:
      raise RequestError(None, "this server has no LenVM", status=404)
    body = await _body(request, limits)
    sequences, single = server.values.sequences(body)
    if candidates:
      out = await asyncio.to_thread(server.values.candidates, sequences, body.get("candidate_ids"))
    else:
      out = await asyncio.to_thread(server.values.encode, sequences)
    meta = [{"prompt_tokens": len(ids), "gamma": server.values.gamma} for ids in sequences]
    return out, meta, single

  def embedding(out, meta, single):
    items = [{"embedding": z, "meta_info": m} for z, m in zip(out, meta)]
    return items[0] if single else items

  @app.api_route("/encode", methods=["POST", "PUT"])
  async def encode(request: Request):
    return embedding(*await values_of(request, candidates=False))

  @app.api_route("/tree_value", methods=["POST", "PUT"])
  async def tree_value(request: Request):
    out, meta, _ = await values_of(request, candidates=True)
    return embedding(out, meta, len(out) == 1)  # The reference answers one prefix as one object.

  @app.api_route("/token_value", methods=["POST", "PUT"])
  async def token_value(request: Request):
    out, meta, single = await values_of(request, candidates=False)
    return {"values": out, "meta_info": meta[0] if single else meta}

  @app.api_route("/candidate_value", methods=["POST", "PUT"])
  async def candidate_value(request: Request):
    out, meta, single = await values_of(request, candidates=True)
    return {"values": out, "meta_info": meta[0] if single else meta}

  @app.post("/v1/length")
  async def length(request: Request):
    if server.values is None:
      raise RequestError(None, "this server has no LenVM", status=404)
    body = await _body(request, limits)
    if not isinstance(body, dict):
      raise RequestError(None, "the request body must be a JSON object")
    chat = body.get("messages") is not None
    prompts = protocol.prompts_of(body, chat, server.tokenizer, server.vocab_size)
    longest = max(map(len, prompts))
    if longest > limits.max_prompt_tokens:
      raise RequestError("messages" if chat else "prompt", f"the prompt has {longest} tokens, more than this "
                         f"server's limit of {limits.max_prompt_tokens}")
    values, lengths = await asyncio.to_thread(server.values.lengths, prompts)
    return {"object": "list", "gamma": server.values.gamma, "data": [
        {"index": i, "prompt_tokens": len(p), "value": float(v), "predicted_length": float(n)}
        for i, (p, v, n) in enumerate(zip(prompts, values, lengths))]}

  @app.get("/health")
  async def health():
    stats = runner.engine.stats
    state = "draining" if runner.draining else ("error" if runner.error else "ok")
    return JSONResponse({"status": state, "slots": stats["slots"], "busy_slots": stats["busy_slots"],
                         "waiting": stats["waiting"], "outstanding": runner.outstanding},
                        status_code=200 if state == "ok" else 503)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                        "owned_by": "lenvm_jax", "max_model_len": limits.max_prompt_tokens
                                        + limits.max_new_tokens}]}

  @app.get("/metrics")
  async def prometheus():
    text, content_type = metrics.text()
    return Response(text, media_type=content_type)

  return app
