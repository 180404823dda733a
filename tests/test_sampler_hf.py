"""Greedy decoding of imported tiny Hugging Face models equals `transformers` generate(do_sample=False), token for
token, for the Llama, Qwen2 and Qwen3 layouts; prompts of different lengths share one of our batches."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lenvm_jax import sharding  # noqa: E402
from lenvm_jax.decoding import policy as policy_lib  # noqa: E402
from lenvm_jax.decoding.generation import Sampler
from lenvm_jax.decoding.sampler import SamplingConfig  # noqa: E402
from tests import hf_models  # noqa: E402

PROMPTS = [[5, 17, 33, 60, 8, 91, 4], [12], [70, 71, 72], [40, 2, 41, 9, 13]]
MAX_NEW = 12
EOS_ID = 2  # hf_models saves eos_token_id=2.


def transformers_greedy(model, prompt):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=EOS_ID, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kind, tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_greedy_matches_transformers(tmp_path, kind, tied):
  directory = hf_models.save_tiny_hf_model(kind, tmp_path / kind, tie_embeddings=tied, seed=3)
  reference = hf_models.load_hf_model(directory)
  mesh = sharding.make_mesh(1, 1, 1)
  policy = policy_lib.load_policy(str(directory), mesh)
  assert policy.eos_ids == (EOS_ID,)  # Read from the HF directory.
  sampling = SamplingConfig(max_new_tokens=MAX_NEW, eos_ids=policy.eos_ids, temperature=0.0)
  samples = Sampler(policy.graphdef, policy.params, sampling, mesh, batch_size=4).generate(PROMPTS)
  for prompt, sample in zip(PROMPTS, samples):
    expected = transformers_greedy(reference, prompt)
    if EOS_ID in expected:  # transformers pads after EOS; our completions end at it.
      expected = expected[:expected.index(EOS_ID) + 1]
    assert sample.completion_ids.tolist() == expected, (kind, prompt)
    assert sample.finished == (expected[-1] == EOS_ID)
