"""How well each scorer knows V(s_t + x) for every next token x, on synthetic data whose exact values are known.

For every non-terminal state s_t of held-out trajectories (cut at the run's data.max_len, as in training) and every
token x of the vocabulary, the squared error of each scorer's V(s_t + x) (decoding/next_values.py) against the
policy's exact value (SyntheticPolicy.next_state_values). Errors are split by what x is to the policy: EOS, a switch
token (sets a new mode: the value jumps), a filler (changes nothing), a token the policy never emits as a next token
(padding, mode tokens: no training signal reaches it), and the realised next tokens of the trajectories alone.
"""

import dataclasses

import numpy as np

from lenvm_jax.data.synthetic import EOS_ID, PAD_ID, SyntheticPolicy
from lenvm_jax.decoding import next_values

TOKEN_CLASSES = ("all", "emitted", "eos", "switch", "filler", "never_emitted")


def token_classes(policy: SyntheticPolicy) -> dict[str, np.ndarray]:
  """{class: [vocab] bool} over the policy's token ids."""
  ids = np.arange(policy.vocab_size)
  switch = (ids >= policy.switch_token(0)) & (ids < policy.first_filler)
  filler = ids >= policy.first_filler
  eos = ids == EOS_ID
  never = (ids == PAD_ID) | ((ids >= policy.mode_token(0)) & (ids < policy.switch_token(0)))
  return {"all": np.ones_like(eos), "emitted": eos | switch | filler, "eos": eos, "switch": switch, "filler": filler,
          "never_emitted": never}


def cut(trajectories, max_len: int):
  """The trajectories as a model of max_len-token rows sees them (completions cut), and each one's full length."""
  kept = [dataclasses.replace(t, completion_ids=t.completion_ids[:max(max_len - len(t.prompt_ids), 0)])
          for t in trajectories]
  return kept, [len(t.completion_ids) for t in trajectories]


def scorer_errors(values, exact, full_lengths, completions, classes) -> dict:
  """MSE per token class over non-terminal states (s_t with t < L), and at the realised next tokens.

  values / exact: per trajectory [states, vocab]; completions: the (cut) completion ids."""
  sums = dict.fromkeys(classes, 0.0)
  counts = dict.fromkeys(classes, 0)
  realised = []
  for v, e, full, completion in zip(values, exact, full_lengths, completions):
    states = min(len(v), full)  # s_L (EOS) is terminal: no next token follows it.
    sq = (v[:states] - e[:states]) ** 2
    for name, mask in classes.items():
      sums[name] += float(sq[:, mask].sum())
      counts[name] += int(states * mask.sum())
    taken = completion[:states]
    realised.append(sq[np.arange(len(taken)), taken])
  out = {name: sums[name] / max(counts[name], 1) for name in classes}
  out["realised"] = float(np.mean(np.concatenate(realised))) if realised else 0.0
  return out


def evaluate(predictor, policy: SyntheticPolicy, trajectories, scorers=("next_state", "candidate_head"),
             batch_size: int = 16) -> dict:
  """{scorer: {token class: MSE}} plus the number of states and (state, token) pairs scored."""
  gamma = predictor.kind.gamma
  kept, full_lengths = cut(trajectories, predictor.config.data.max_len)
  exact = [policy.next_state_values(t, gamma) for t in trajectories]
  classes = token_classes(policy)
  report = {"states": int(sum(min(len(t.completion_ids) + 1, full) for t, full in zip(kept, full_lengths))),
            "vocab_size": policy.vocab_size}
  for scorer in scorers:
    values = next_values.next_values(predictor, kept, None, scorer, batch_size)
    report[scorer] = scorer_errors(values, exact, full_lengths, [t.completion_ids for t in kept], classes)
  return report
