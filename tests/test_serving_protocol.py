"""custom_params -> LengthRequest exactly as the reference reads them (aliases, routing, modes), and the text a client
sees as tokens arrive (stop strings, held-back tails). No server: lenvm_jax/serving/protocol.py and text.py alone."""

import pytest

from lenvm_jax.decoding.guided import LengthRequest
from lenvm_jax.serving.protocol import Limits, RequestError, length_request, parse_generation
from lenvm_jax.serving.text import StopText


@pytest.mark.parametrize("constraint, rule", [
    ("eq", "equal_to"), ("==", "equal_to"), ("equals", "equal_to"), (" EQ ", "equal_to"), (None, "equal_to"),
    ("le", "at_most"), ("<=", "at_most"), ("<", "at_most"), ("less_equal", "at_most"),
    ("ge", "at_least"), (">=", "at_least"), ("gte", "at_least"), ("greater_equal", "at_least"),
    ("eq_soft", "eq_soft"), ("soft", "eq_soft"), ("equal_soft", "eq_soft")])
@pytest.mark.parametrize("key", ["value_constraint", "constraint", "cmp", "op"])
def test_constraint_aliases(constraint, rule, key):
  params = {"target_length": 50} if constraint is None else {key: constraint, "target_length": 50}
  assert length_request(params, "default", 100) == LengthRequest.following("default", rule, 50)


def test_targets_modes_and_options_map_onto_the_request():
  got = length_request({"op": "le", "target_length": 30.0, "length_mode": "remaining", "length_gamma": 0.99,
                        "entropy_threshold": 0.5, "value_min": 0.1, "length_rules": "reference"}, "default", 10)
  assert got == LengthRequest.following("reference", "at_most", 30, target_mode="remaining", gamma=0.99,
                                        value_entropy_threshold=0.5, value_min=0.1)
  budget = length_request({"value_constraint": "ge", "target_length": 8, "target_length_mode": "budget"}, "paper", 8)
  assert (budget.rule, budget.target_mode, budget.selection, budget.target_offset) == ("at_least", "total", "paper", 1)
  direct = length_request({"value_constraint": "eq", "target_value": 0.25}, "default", 4)
  assert direct.target_value == 0.25 and direct.target == 0
  # The server's convention unless the request names one.
  assert length_request({"target_length": 5}, "reference", 10).target_offset == 0


def test_without_a_target_scale_and_mode_are_expectation_guidance():
  assert length_request({"value_scale": -2.0, "value_mode": "centered_exp"}, "default", 10) == \
      LengthRequest("expectation", value_mode="centered_exp", scale=-2.0)
  assert length_request({"scale": 3, "mode": "LENGTH_MUL", "gamma": 0.9}, "default", 10) == \
      LengthRequest("expectation", value_mode="length_mul", scale=3.0, gamma=0.9)
  assert length_request({"value_mode": "linear"}, "default", 10).scale == 1.0  # The reference's default scale.
  assert length_request({"value_scale": 0.5}, "default", 10).value_mode == "mul"  # ... and mode.
  assert length_request(None, "default", 10) is None and length_request({}, "default", 10) is None
  only_threshold = length_request({"value_entropy_threshold": 1.0}, "default", 10)
  assert only_threshold.rule == "none" and only_threshold.value_entropy_threshold == 1.0


@pytest.mark.parametrize("params, field", [
    ({"value_constraint": "about", "target_length": 5}, "custom_params.value_constraint"),
    ({"cmp": "eq", "target_length": 0}, "custom_params.target_length"),
    ({"cmp": "eq", "target_length": 2.5}, "custom_params.target_length"),
    ({"cmp": "eq", "target_length": "ten"}, "custom_params.target_length"),
    ({"cmp": "ge", "target_length": 11}, "custom_params.target_length"),  # Above max_tokens = 10.
    ({"value_constraint": "le"}, "custom_params.target_length"),
    ({"target_value": 1.0}, "custom_params.target_value"),
    ({"target_length": 5, "length_mode": "later"}, "custom_params.length_mode"),
    ({"target_length": 5, "gamma": 1.0}, "custom_params.gamma"),
    ({"mode": "wild"}, "custom_params.mode"),
    ({"value_scale": float("inf")}, "custom_params.value_scale"),
    ({"target_length": 5, "length_rules": "mine"}, "custom_params.length_rules"),
    ([1, 2], "custom_params"),
])
def test_bad_custom_params_name_the_field(params, field):
  with pytest.raises(RequestError) as error:
    length_request(params, "default", 10)
  assert error.value.field == field and str(error.value).startswith(field) and error.value.status == 400


def test_at_most_may_ask_beyond_max_tokens():
  assert length_request({"op": "le", "target_length": 500}, "default", 10).target == 500


class _Chars:
  """A one-character-per-token tokenizer: id i is chr(ord('a') + i); id 25 ('z') is EOS."""
  eos_id = 25

  def encode(self, text):
    return [ord(c) - ord("a") for c in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i) for i in ids)

  def prompt_ids(self, messages):
    return self.encode("".join(m["content"] for m in messages))


def test_generation_fields_and_single_token_stops_become_stop_ids():
  gen = parse_generation({"messages": [{"role": "user", "content": "abc"}], "n": 2, "stop": ["q", "xy"],
                          "top_k": -1, "seed": 3, "max_tokens": 7}, True, _Chars(), 26, Limits(max_n=4), "default")
  assert (gen.prompts, gen.n, gen.top_k, gen.seed, gen.max_tokens) == ([(0, 1, 2)], 2, 0, 3, 7)
  assert gen.stop == ("q", "xy") and gen.stop_token_ids == (16,)
  with pytest.raises(RequestError, match="^n: 3 prompts x n = 2"):
    parse_generation({"prompt": ["a", "b", [1]], "n": 2}, False, _Chars(), 26, Limits(max_n=4), "default")


def test_stop_text_holds_back_what_a_stop_string_may_claim():
  text = StopText(_Chars(), ("cde",), (25,))
  text.add([0, 1, 2])  # "abc": "c" may start "cde".
  assert text.new_text() == "ab"
  text.add([3])  # "abcd": "cd" too.
  assert text.new_text() == ""
  text.add([5])  # "abcdf": no stop string can start here any more.
  assert text.new_text() == "cdf" and not text.stopped
  text.add([2, 3, 4, 6])  # "abcdfcdeg": stopped at "cde".
  assert text.stopped and text.text == "abcdf" and text.new_text() == ""
  done = StopText(_Chars(), (), (25,))
  done.add([7, 8, 25])  # EOS is no text.
  assert done.new_text(final=True) == "hi" and len(done.tokens) == 3
