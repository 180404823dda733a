"""A synthetic generator whose exact value function is known, so training can be scored against Bayes-optimal.

The policy has a hidden *mode* m with its own stop probability hazards[m] per token. The prompt holds one mode
token (at a random place among filler tokens) that sets the first mode. Each completion token is EOS with
probability hazards[m]; otherwise, with probability switch_prob, a switch token that moves the policy to a
uniformly drawn mode (a token "after which more, or less, follows"); otherwise a filler token. The mode is a
function of the prefix (the last mode or switch token), so

  W(m) = E[gamma ** n | mode m] = h gamma + (1 - h) gamma ((1 - s) W(m) + s mean_k W(k)),   V = -(1 - W(m))

is a small linear system, and V(s_t) = E[G_t | prefix] is exact for every prefix (V = 0 once EOS is emitted).

Token ids: 0 padding (never emitted), 1 EOS, 2 .. 2+M-1 mode tokens, then M switch tokens, then filler tokens.
"""

import dataclasses

import numpy as np

from lenvm_jax.data.records import Trajectory

PAD_ID, EOS_ID = 0, 1


@dataclasses.dataclass(frozen=True)
class SyntheticPolicy:
  vocab_size: int = 64
  hazards: tuple[float, ...] = (0.01, 0.03, 0.08, 0.25)
  switch_prob: float = 0.04
  min_prompt_len: int = 4
  max_prompt_len: int = 12
  max_completion_len: int = 100_000  # A safety cap; reaching it has probability below 1e-400 at these hazards.

  def __post_init__(self):
    if self.vocab_size < self.first_filler + 2:
      raise ValueError(f"synthetic policy needs vocab_size >= {self.first_filler + 2}, got {self.vocab_size}")
    if not all(0.0 < h < 1.0 for h in self.hazards):
      raise ValueError(f"synthetic hazards must lie in (0, 1), got {self.hazards}")

  @property
  def num_modes(self) -> int:
    return len(self.hazards)

  @property
  def first_filler(self) -> int:
    return 2 + 2 * self.num_modes

  def mode_token(self, mode: int) -> int:
    return 2 + mode

  def switch_token(self, mode: int) -> int:
    return 2 + self.num_modes + mode

  def sample(self, rng: np.random.Generator) -> Trajectory:
    """A prompt and one completion, both drawn from `rng`."""
    return self.sample_completion(rng, *self.sample_prompt(rng))

  def sample_prompt(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """(mode, prompt tokens): fillers with the mode token at a random place."""
    mode = int(rng.integers(self.num_modes))
    prompt_len = int(rng.integers(self.min_prompt_len, self.max_prompt_len + 1))
    prompt = rng.integers(self.first_filler, self.vocab_size, size=prompt_len)
    prompt[rng.integers(prompt_len)] = self.mode_token(mode)
    return mode, prompt

  def sample_completion(self, rng: np.random.Generator, mode: int, prompt: np.ndarray) -> Trajectory:
    """One completion of `prompt`, whose mode token set `mode`."""
    completion = []
    for _ in range(self.max_completion_len):
      if rng.random() < self.hazards[mode]:
        completion.append(EOS_ID)
        break
      if rng.random() < self.switch_prob:
        mode = int(rng.integers(self.num_modes))
        completion.append(self.switch_token(mode))
      else:
        completion.append(int(rng.integers(self.first_filler, self.vocab_size)))
    finished = completion[-1] == EOS_ID
    return Trajectory(prompt.astype(np.int32), np.asarray(completion, np.int32), finished)

  def mode_values(self, gamma: float) -> np.ndarray:
    """V for a non-terminal state in each mode."""
    h = np.asarray(self.hazards, np.float64)
    s, m = self.switch_prob, self.num_modes
    # W = h g + (1 - h) g ((1 - s) W + s mean(W))  <=>  A W = h g.
    a = np.eye(m) - np.diag((1 - h) * gamma * (1 - s)) - ((1 - h) * gamma * s / m)[:, None] * np.ones((1, m))
    w = np.linalg.solve(a, h * gamma)
    return -(1.0 - w)

  def exact_values(self, trajectory: Trajectory, gamma: float) -> np.ndarray:
    """E[G_t | prefix] at s_0 .. s_L (len(completion_ids) + 1 values)."""
    per_mode = self.mode_values(gamma)
    mode_tokens = {self.mode_token(k): k for k in range(self.num_modes)}
    switch_tokens = {self.switch_token(k): k for k in range(self.num_modes)}
    mode = next(mode_tokens[t] for t in trajectory.prompt_ids.tolist() if t in mode_tokens)
    values = [per_mode[mode]]
    for token in trajectory.completion_ids.tolist():
      if token == EOS_ID:
        values.append(0.0)
        break
      mode = switch_tokens.get(token, mode)
      values.append(per_mode[mode])
    return np.asarray(values, np.float32)

  def next_state_values(self, trajectory: Trajectory, gamma: float) -> np.ndarray:
    """[L + 1, vocab_size] E[G | s_t + x] for t = 0 .. L and every token x: 0 for EOS, the new mode's value after a
    switch token, else the mode's value at s_t (tokens the policy never emits, such as padding and mode tokens,
    change nothing); what a scorer of candidate next tokens should return (decoding/synthetic_models.py)."""
    per_mode = self.mode_values(gamma)
    mode_tokens = {self.mode_token(k): k for k in range(self.num_modes)}
    mode = next(mode_tokens[t] for t in trajectory.prompt_ids.tolist() if t in mode_tokens)
    modes = [mode]
    for token in trajectory.completion_ids.tolist():
      if self.switch_token(0) <= token < self.first_filler:
        mode = token - self.switch_token(0)
      modes.append(mode)
    values = np.repeat(per_mode[np.asarray(modes)][:, None], self.vocab_size, axis=1)
    values[:, self.switch_token(0):self.first_filler] = per_mode[None, :]
    values[:, EOS_ID] = 0.0
    return values.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """A grain random-access source: record i is sampled from its own seed, so any split is reproducible.

  samples_per_prompt = N > 1: records come in groups of N completions of one prompt (records pN .. pN + N - 1
  answer prompt p, whose tokens are drawn from seed [seed, p], each completion from [seed, p, j]); their prompt_id is
  "synthetic-<seed>-<p>". N = 1: every record is its own prompt, drawn as before (no prompt_id).
  """
  policy: SyntheticPolicy
  num_records: int
  seed: int
  gamma: float | None  # None: records without exact values (before loss.gamma is resolved from their lengths).
  samples_per_prompt: int = 1
  # > 0: a completion longer than this many tokens is cut to them and unfinished, as a generator's max_new_tokens
  # would leave it (the long ones get cut); the exact values of the states it keeps stay known.
  budget: int = 0

  def __len__(self) -> int:
    return self.num_records

  def group_ids(self) -> np.ndarray:
    """[num_records] prompt index of every record, without drawing any (data/subsets.py reads it)."""
    return np.arange(self.num_records) // self.samples_per_prompt

  def __getitem__(self, index: int) -> Trajectory:
    index = int(index)
    if self.samples_per_prompt == 1:
      trajectory = self.policy.sample(np.random.default_rng([self.seed, index]))
    else:
      prompt, sample = divmod(index, self.samples_per_prompt)
      mode, prompt_ids = self.policy.sample_prompt(np.random.default_rng([self.seed, prompt]))
      trajectory = dataclasses.replace(
          self.policy.sample_completion(np.random.default_rng([self.seed, prompt, sample]), mode, prompt_ids),
          prompt_id=f"synthetic-{self.seed}-{prompt}")
    exact_values = None if self.gamma is None else self.policy.exact_values(trajectory, self.gamma)
    if self.budget and len(trajectory.completion_ids) > self.budget:
      trajectory = dataclasses.replace(trajectory, completion_ids=trajectory.completion_ids[:self.budget],
                                       finished=False)
      exact_values = None if exact_values is None else exact_values[:self.budget + 1]
    return dataclasses.replace(trajectory, exact_values=exact_values)
