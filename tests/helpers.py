"""What the tests share, imported from here: a test module never imports another test module or conftest.py
(pytest's own: its fixtures and the environment it sets before jax loads), tests/test_layers.py checks it.

  running a CLI       run_cli, assert_one_error_line, optimized_env, REPO
  a typed config      run_config
  a tiny model        tiny_model: the `tiny` preset's (graphdef, params), initialised under jit
  a trained run       train_command, logged, final_params, wait_for, leaves (the resume tests' 24-step run)
  a test tokenizer    build_tokenizer_json, chatml_tokenizer_dir, CHATML, reference_line, write_lines
  a tiny GGUF file    write_tiny_gguf and its vocabulary
  venvs               pinned_venv, libtpu_pin (the launcher and TPU-compile tests' own pythons)

Nothing heavy is imported at module level: conftest.py imports this module before jax is configured.
"""

import fcntl
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Tests compile hundreds of tiny programs and run most of them a few times, so compile time is what they spend: LLVM's
# optimizations off (a cold full run: 1068 s -> 831 s on 2 cores) and XLA:CPU's older fusion emitters (compiling
# test_train_step's split test: 21 s -> 9 s; alone, without -O0, they are slower). Tests that run many steps take
# both off (optimized_env).
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                          "--xla_cpu_use_fusion_emitters=false")


def optimized_env() -> dict:
  """The environment for a subprocess that runs many steps: XLA's full optimization, as users get it."""
  return dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(FAST_COMPILE_XLA_FLAGS, "").strip())


def one_device_env() -> dict:
  """The environment for a CLI whose test is not about sharding: one CPU device, as a user runs it (conftest's 8 fake
  devices split every step 8 ways: ~35 % more CPU in the trainer tests that measured it)."""
  return dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)


def run_cli(module: str, *args, timeout: int | None = 300, env: dict | None = None) -> subprocess.CompletedProcess:
  """`python -m experiments.<module> args...` from the repository root, its output captured (`env`: the whole
  environment, default this process's)."""
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_error_line(result: subprocess.CompletedProcess, *needles) -> str:
  """A user's mistake as the CLIs report it: exit 2, no traceback, stderr ending in one `error:` line that holds
  every needle. Returns that line."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), last
  for needle in needles:
    assert needle in last, (needle, last)
  return last


def run_config(config):
  """The typed RunConfig of an ml_collections config, as the entry points build it (lenvm_jax/config.py)."""
  from lenvm_jax.config import RunConfig
  return RunConfig.from_dict(config)


def tiny_model(vocab_size: int = 64, *, seed: int = 0, scale: float | None = None, **fields):
  """(graphdef, params pure dict) of the `tiny` preset with `fields` overriding it, initialised under jit (eager init
  is hundreds of small dispatches, seconds on a busy CPU). `scale`: every weight w -> w * scale + 0.01, so values
  spread and greedy choices are not near-ties."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from lenvm_jax.model.transformer import LengthValueModel  # pylint: disable=g-import-not-at-top
  from lenvm_jax.model_config import ModelConfig, preset_fields  # pylint: disable=g-import-not-at-top

  config = ModelConfig(**{**preset_fields("tiny"), "vocab_size": vocab_size, **fields})
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LengthValueModel(config, nnx.Rngs(seed))))

  def init():
    params = nnx.split(LengthValueModel(config, nnx.Rngs(seed)))[1].to_pure_dict()
    return params if scale is None else jax.tree.map(lambda p: p * scale + 0.01, params)

  return graphdef, jax.jit(init)()


# ----------------------------------------------------------------------------------------------------- a trained run

TRAIN_STEPS = 24


def train_command(workdir) -> list[str]:
  """The trainer on the tiny config for TRAIN_STEPS steps, checkpoints every 5 (async), 2 micro-batches of 8 rows
  over the 8 fake devices (inherited XLA_FLAGS): the run the resume and fault tests interrupt and compare."""
  return [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/tiny.py",
          "--workdir", str(workdir), f"--config.train.steps={TRAIN_STEPS}", "--config.checkpoint.every_steps=5",
          "--config.checkpoint.async_save=True", "--config.train.eval_every=0", "--config.train.accum_steps=2",
          "--config.train.batch_size=16"]


def logged(workdir, split="train") -> dict:
  """Last logged record per step (a resumed run re-logs the steps after its checkpoint)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return {r["step"]: r for r in records if r["split"] == split}


def final_params(workdir, step: int = TRAIN_STEPS):
  """The params of a run's checkpoint `step`, as orbax restores them (no model or mesh needed)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints", item_names=("state", "data_iter"))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  return state["params"]


def leaves(tree) -> list:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def wait_for(predicate, process, timeout=300):
  """Polls `predicate` while the subprocess `process` runs (it must not exit first)."""
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, "training exited before the test could interrupt it"
    assert time.time() < deadline, "timed out waiting for training progress"
    time.sleep(0.05)


# ------------------------------------------------------------------------------------------- the ChatML test tokenizer

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must not start with the assistant') }}"
          "{% endif %}"
          "{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tokenizer_json(path, with_specials=True):
  """A tiny byte-level BPE, trained offline; its post-processor adds <|endoftext|>, which encode() must not."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=CHATML_SPECIALS if with_specials else [],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(["Hello there, how are you?", "The answer is 42.", "You are a helpful assistant."],
                                trainer)
  if with_specials:
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.token_to_id("<|endoftext|>"))])
  tokenizer.save(str(path))
  return path


def chatml_tokenizer_dir(directory):
  """A tokenizer directory (the test BPE + the ChatML template, EOS <|im_end|>) for prompt and rollout tests."""
  build_tokenizer_json(directory / "tokenizer.json")
  (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
  return str(directory)


def reference_line(prompt_id=0, completion="The answer is 42.", finish_reason=None, **meta):
  meta_info = {"lenvm_idx": prompt_id, "answer_token_length": 5, **meta}
  if finish_reason is not None:
    meta_info["finish_reason"] = finish_reason
  return json.dumps({"conversations": [{"from": "system", "value": "You are a helpful assistant."},
                                       {"from": "human", "value": "Hello there, how are you?"},
                                       {"from": "gpt", "value": completion}], "meta_info": meta_info})


def write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


# ---------------------------------------------------------------------------------------------------- a tiny GGUF file

GGUF_SHAPE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
GGUF_CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_MERGES = ["h e", "l l", "he ll", "Ġ w", "o r", "2 0"]
GGUF_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def gguf_byte_tokens() -> list[str]:
  """The 256 single-byte tokens of a byte-level BPE vocabulary, spelled in GPT-2's printable alphabet."""
  from lenvm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return [tokenizer_lib._byte_alphabet()[b] for b in range(256)]  # pylint: disable=protected-access


def gguf_tiny_tokens() -> list[str]:
  return GGUF_CONTROL_TOKENS + gguf_byte_tokens() + [m.replace(" ", "") for m in GGUF_MERGES]


def write_tiny_gguf(path, arch="llama", *, tie=False, quant=None, seed=0, eos_id=2, pre="default",
                    tokenizer_model="gpt2", metadata=None, tensors=None):
  """A random tiny model of `arch` as llama.cpp's converter would store it (Llama q/k rows RoPE-interleaved);
  2-D weights in `quant` (e.g. Q8_0) if given. `metadata` {key: (writer method, value)} and `tensors`
  {gguf name: array or (raw bytes, type)} add or replace entries. Returns the HF-layout float32 tensors written."""
  import gguf  # pylint: disable=g-import-not-at-top  # Only the tests that write GGUF files need the package.
  import numpy as np  # pylint: disable=g-import-not-at-top

  from lenvm_jax.model import gguf_import, hf_layout  # pylint: disable=g-import-not-at-top
  from lenvm_jax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top

  config = ModelConfig(vocab_size=len(gguf_tiny_tokens()), tie_embeddings=tie, qkv_bias=arch == "qwen2",
                       qk_norm=arch == "qwen3", **GGUF_SHAPE)
  rng = np.random.default_rng(seed)
  hf = {}
  for m in hf_layout.trunk_mappings(config):  # Norm scales near 1, biases and weights around 0.
    noise = rng.standard_normal(m.hf_shape)
    hf[m.hf_name] = (1.0 + 0.1 * noise if "norm" in m.hf_name else 0.2 * noise).astype(np.float32)
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.num_layers)
  writer.add_context_length(256)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.mlp_dim)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(10000.0)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_tokenizer_model(tokenizer_model)
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(gguf_tiny_tokens())
  control = len(GGUF_CONTROL_TOKENS)
  writer.add_token_types([3] * control + [1] * (len(gguf_tiny_tokens()) - control))
  writer.add_token_merges(GGUF_MERGES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(eos_id)
  writer.add_chat_template(GGUF_CHATML)
  for key, (method, value) in (metadata or {}).items():
    getattr(writer, method)(key, value)
  stored = {}
  for hf_name, array in hf.items():
    name = gguf_import.gguf_tensor_name(hf_name)
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      array = gguf_import.permute_rope_rows(array, config.num_heads if ".attn_q." in name else config.num_kv_heads)
    stored[name] = array
  stored.update(tensors or {})
  for name, array in stored.items():
    if isinstance(array, tuple):
      writer.add_tensor(name, array[0], raw_dtype=array[1])
    elif quant is not None and array.ndim == 2:
      writer.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
    else:
      writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return hf


# ------------------------------------------------------------------------------------------------------------ venvs

def pinned_venv(name: str, pip_args: list[str], stamp_text: str, inherit_main_venv: bool = False) -> str:
  """The python of a venv at REPO/<name> (ignored by git), built once with `pip install <pip_args>` and reused while
  stamp_text (what it was built from) is unchanged. inherit_main_venv: it also sees the test venv's packages (a .pth
  file), so it only adds what pip_args name.

  pytest-xdist runs fixtures once per worker, so building holds an exclusive lock: without it two workers built the
  same venv at once and one failed ("Directory not empty: 'site-packages'").
  """
  venv = REPO / name
  python = venv / "bin" / "python"
  digest = hashlib.sha256(f"{stamp_text}|{inherit_main_venv}|{sys.prefix}".encode()).hexdigest()
  stamp = venv / "built-from.sha256"
  with open(REPO / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes; a second worker waits, then finds the stamp.
    if not (stamp.exists() and stamp.read_text() == digest and python.exists()):
      subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
      if inherit_main_venv:
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        pathlib.Path(site, "main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
      # --no-compile: byte-compiling every package took 19 of the launcher venv's 50 s; few modules are imported.
      subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", *pip_args], check=True, timeout=900)
      stamp.write_text(digest)
  return str(python)


def libtpu_pin() -> str:
  """The libtpu requirement of requirements-tpu.txt (the one place it is pinned)."""
  lines = (REPO / "requirements-tpu.txt").read_text().splitlines()
  return next(line.split("#")[0].strip() for line in lines if line.startswith("libtpu=="))
