"""An OpenAI-compatible HTTP server for length-controlled generation with a run's LenVM (docs/serving.md).

  python -m experiments.serve --workdir=runs/lm_and_value --tokenizer=HF_DIR [--host=127.0.0.1] [--port=8000]
  python -m experiments.serve --workdir=runs/lenvm --policy=M.gguf [--slots=16] [--candidates=9]
  python -m experiments.serve --policy=M.gguf      (plain generation through the engine: no LenVM, no length rules)

The run's model generates and scores on one trunk (a run trained with loss.lm_weight > 0), or --policy (a run
workdir, a Hugging Face directory or a .gguf, lenvm_jax/decoding/policy.py) generates and the run's LenVM scores
(guided_models.Pair; same token ids). One decode engine (lenvm_jax/decoding/engine.py) serves every request with
continuous batching; clients pick the length rule per request with `custom_params`, as for the reference server.
The tokenizer (chat template, text prompts, stop strings): --tokenizer, else the policy's own files (HF directory,
.gguf), else the run's model.init_from; without one, only token-id prompts are served.
EOS ids: --eos_ids, else the policy's, else the tokenizer's, else the run's (its config.json's record, else its data;
decoding/eos.py).
SIGTERM (or Ctrl-C): stop admitting (503), finish what is in flight, exit 0; a second signal exits at once.
"""

import os
import threading
import time

from absl import app, flags, logging

from experiments import cli
from lenvm_jax import sharding
from lenvm_jax.run import config_history
from lenvm_jax.data import pipeline
from lenvm_jax.data.tokenizer import load_tokenizer
from lenvm_jax.decoding import candidate_scoring, policy as policy_lib
from lenvm_jax.decoding.engine import Engine
from lenvm_jax.decoding.eos import check_in_vocabulary, generator_eos_ids
from lenvm_jax.decoding.guided import CONVENTIONS
from lenvm_jax.decoding.guided_models import Pair, TransformerGenerator, check_same_vocabulary
from lenvm_jax.decoding.predict import Predictor
from lenvm_jax.decoding.sampler import FILTER_STYLES
from lenvm_jax.serving.app import Server, create_app
from lenvm_jax.serving.protocol import Limits
from lenvm_jax.serving.runner import EngineRunner
from lenvm_jax.serving.values import ValueService

_RUN = cli.run_flags("The run whose LenVM scores (and, without --policy, generates); optional with --policy.",
                     required=False)
_WORKDIR = _RUN.workdir
_POLICY = flags.DEFINE_string("policy", None, "Generator: a run workdir, Hugging Face directory or .gguf (default: the "
                              "run's own LM head on the shared trunk).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "HF tokenizer directory, tokenizer.json, SentencePiece model or "
                                 ".gguf: chat template, text prompts, stop strings, EOS.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 exposes the server to the network).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "The model id /v1/models reports (default: the workdir's name).")
_SLOTS = flags.DEFINE_integer("slots", 16, "Sequences decoded at once (the engine's slots).")
_MAX_WAITING = flags.DEFINE_integer("max_waiting", 64, "Sequences that may wait for a slot; beyond them 429.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", 512, "Longest prompt in tokens.")
_MAX_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Largest max_tokens a request may ask for (sizes the KV "
                                   "cache with --max_prompt_tokens).")
_MAX_N = flags.DEFINE_integer("max_n", 16, "Largest n (choices per prompt).")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body in bytes; beyond it 413.")
_CANDIDATES = flags.DEFINE_integer("candidates", 9, "Candidates per guided step (the most likely tokens surviving "
                                   "the filters) that the LenVM scores (0 = plain generation: the cheapest decode "
                                   "step, length rules are refused).")
_SCORER = flags.DEFINE_enum("scorer", "next_state", list(candidate_scoring.SCORERS), "How the LenVM values candidates.")
_FILTER = flags.DEFINE_enum("filter_style", "hf", list(FILTER_STYLES), "Top-k / top-p semantics (hf or reference).")
_RULES = flags.DEFINE_enum("length_rules", "default", list(CONVENTIONS), "How eq / le / ge choose unless a request "
                           "says (custom_params.length_rules); reference = the reference server's.")
_STEPS = flags.DEFINE_integer("steps_per_call", 8, "Decode steps per engine call (tokens stream in groups of this).")
_EOS = flags.DEFINE_list("eos_ids", None, "Token ids that end a completion.")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "warning", ["debug", "info", "warning", "error"], "uvicorn's log level.")


def _tokenizer_path() -> str | None:
  if _TOKENIZER.value:
    return _TOKENIZER.value
  if _POLICY.value and not policy_lib.is_run_workdir(_POLICY.value):
    return _POLICY.value
  if not _WORKDIR.value:
    return None
  init_from = config_history.read_config(_WORKDIR.value).model.init_from
  return init_from if init_from and os.path.exists(init_from) else None


def _models(predictor: Predictor | None, mesh):
  """(models, params, policy EOS ids, description): a Pair with --policy, else the run's shared trunk; with
  --candidates=0 only the generator; without a run (--policy alone) the policy generates plainly."""
  if predictor is None:
    policy = policy_lib.load_policy(_POLICY.value, mesh)
    return (TransformerGenerator(policy.graphdef, policy.model_config.vocab_size), policy.params, policy.eos_ids,
            f"{policy.description} (plain generation, no LenVM)")
  scorer_args = (_SCORER.value, predictor.graphdef, predictor.kind, predictor.config.model)
  plain = _CANDIDATES.value == 0
  if _POLICY.value:
    vocab = policy_lib.read_model_config(_POLICY.value).vocab_size
    check_same_vocabulary(vocab, predictor.config.model.vocab_size, f"--policy={_POLICY.value}",
                          f"--workdir={_WORKDIR.value}")
    policy = policy_lib.load_policy(_POLICY.value, mesh)
    generator = TransformerGenerator(policy.graphdef, vocab)
    if plain:
      return generator, policy.params, policy.eos_ids, policy.description
    models = Pair(generator, candidate_scoring.lenvm_scorer(*scorer_args))
    return models, (policy.params, predictor.params), policy.eos_ids, policy.description
  if predictor.config.loss.lm_weight <= 0:
    raise ValueError(f"--workdir={_WORKDIR.value}: the run was trained with loss.lm_weight = 0, so its LM head cannot "
                     "generate; give a --policy to generate with")
  if plain:
    return (TransformerGenerator(predictor.graphdef, predictor.config.model.vocab_size), predictor.params, (),
            f"run {_WORKDIR.value} (plain generation)")
  return candidate_scoring.shared_trunk(*scorer_args), predictor.params, (), f"run {_WORKDIR.value} (shared trunk)"


def _eos_ids(predictor, policy_eos, tokenizer) -> tuple[int, ...]:
  explicit = cli.int_list("eos_ids", _EOS.value)
  if explicit or policy_eos:
    return tuple(explicit or policy_eos)
  config = predictor.config
  synthetic = config.data.source == "synthetic" and not _POLICY.value
  trajectories = ()
  if not synthetic and tokenizer is None:
    source = pipeline.load_source(config, "eval")
    trajectories = [source[i] for i in range(min(256, len(source)))]
  return generator_eos_ids("synthetic" if synthetic else "shared", (), tokenizer.eos_id if tokenizer else None,
                           trajectories, workdir=_WORKDIR.value)


class _DrainingServer:
  """uvicorn's Server whose first SIGTERM / SIGINT drains: the runner stops admitting (503), and once nothing is in
  flight the server shuts down as usual (it waits for open responses) and the process exits 0."""

  def __new__(cls, config, runner):
    import uvicorn

    class Draining(uvicorn.Server):

      def handle_exit(self, sig, frame):
        del frame
        if runner.draining:  # A second signal: now.
          self.should_exit = self.force_exit = True
          return
        logging.warning("signal %d: draining %d sequences, then exiting", sig, runner.outstanding)
        runner.draining = True
        threading.Thread(target=self._exit_when_drained, daemon=True).start()

      def _exit_when_drained(self):
        while runner.outstanding:
          time.sleep(0.05)
        self.should_exit = True

    return Draining(config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import uvicorn

  if not _WORKDIR.value and not _POLICY.value:
    raise app.UsageError("--workdir (a run: its LenVM, and its LM head unless --policy) or --policy (a generator "
                         "served without a LenVM) is required")
  if not _WORKDIR.value and _CANDIDATES.present and _CANDIDATES.value:
    raise app.UsageError(f"--candidates={_CANDIDATES.value}: length rules need a LenVM (--workdir)")
  explicit_eos = cli.int_list("eos_ids", _EOS.value)
  with cli.user_errors(ValueError, FileNotFoundError):
    vocab = (config_history.read_config(_WORKDIR.value).model if _WORKDIR.value else
             policy_lib.read_model_config(_POLICY.value)).vocab_size
    check_in_vocabulary(explicit_eos, vocab, f"--eos_ids={','.join(_EOS.value or ())}")
    tokenizer_path = _tokenizer_path()
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    mesh = sharding.make_mesh(1, 1, 1)  # The Predictor's: its params live on one device.
    predictor = cli.load_predictor(_RUN) if _WORKDIR.value else None
    models, params, policy_eos, description = _models(predictor, mesh)
    if predictor is None:  # No run to fall back on: the flag, the policy's own, else its tokenizer's.
      eos_ids = tuple(explicit_eos) or tuple(policy_eos) or ((tokenizer.eos_id,) if tokenizer else ())
    else:
      eos_ids = _eos_ids(predictor, policy_eos, tokenizer)
    check_in_vocabulary(eos_ids, models.vocab_size, "--eos_ids" if explicit_eos else "the EOS ids of the policy, "
                        "tokenizer or data (give --eos_ids)", "the generator")
    if tokenizer is not None and tokenizer.vocab_size > models.vocab_size:
      logging.warning("the tokenizer has %d tokens, the model %d rows", tokenizer.vocab_size, models.vocab_size)
    candidates = _CANDIDATES.value if predictor is not None else 0
    if not 0 <= candidates <= models.vocab_size:
      raise ValueError(f"--candidates must lie in [0, {models.vocab_size}], got {candidates}")
    engine = Engine(models, params, mesh, eos_ids=eos_ids, slots=_SLOTS.value, max_prompt_len=_MAX_PROMPT.value,
                    max_new_tokens=_MAX_TOKENS.value, num_candidates=candidates, filter_style=_FILTER.value,
                    steps_per_call=_STEPS.value)
  engine.warm_up()  # Compiles every admission shape and the decode program before the first client waits on them.
  runner = EngineRunner(engine, _MAX_WAITING.value)
  limits = Limits(max_body_bytes=_MAX_BODY.value, max_prompt_tokens=_MAX_PROMPT.value,
                  max_new_tokens=_MAX_TOKENS.value, max_n=_MAX_N.value)
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value or _POLICY.value))
  values = ValueService(predictor, tokenizer, _MAX_PROMPT.value + _MAX_TOKENS.value) if predictor else None
  server = Server(runner, tokenizer=tokenizer, limits=limits, model_name=name, length_rules=_RULES.value,
                  values=values)
  config = uvicorn.Config(create_app(server), host=_HOST.value, port=_PORT.value, log_level=_LOG_LEVEL.value,
                          timeout_graceful_shutdown=600)
  http = _DrainingServer(config, runner)
  runner.start()
  print(f"serving {description} as {name!r} on http://{_HOST.value}:{_PORT.value} ({_SLOTS.value} slots, EOS "
        f"{list(eos_ids)}, tokenizer {tokenizer_path or 'none'})", flush=True)
  try:
    http.run()
  finally:
    runner.stop()
  print("server stopped", flush=True)


if __name__ == "__main__":
  cli.run(main)
