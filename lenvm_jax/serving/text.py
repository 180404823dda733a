"""A completion's text as its tokens arrive: the decoded text so far, cut at the first stop string.

Why hold text back: a stop string may arrive split over tokens, so streamed text keeps back any tail that could still
start one (and a tail that decodes to an unfinished UTF-8 character, U+FFFD), and releases it once it cannot. The
tokens that end a completion (EOS, stop ids) are not text. Without a tokenizer (a server fed token ids only) the text
is empty and only the tokens count.
"""

_REPLACEMENT = "\ufffd"


class StopText:

  def __init__(self, tokenizer, stop: tuple[str, ...], end_ids: tuple[int, ...]):
    self._tokenizer = tokenizer
    self._stop = stop
    self._end_ids = set(end_ids)
    self.tokens: list[int] = []
    self.text = ""  # The text so far, cut at a stop string once one appears.
    self.stopped = False  # A stop string appeared.
    self._sent = 0

  def add(self, ids) -> None:
    """Appends generated ids (ids after a stop string are ignored)."""
    if self.stopped or self._tokenizer is None:
      self.tokens.extend(ids)
      return
    self.tokens.extend(ids)
    text_ids = self.tokens[:-1] if self.tokens and self.tokens[-1] in self._end_ids else self.tokens
    text = self._tokenizer.decode(text_ids)
    cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
    if cut >= 0:
      text, self.stopped = text[:cut], True
    self.text = text

  def new_text(self, final: bool = False) -> str:
    """Text not yet released: everything when final or stopped, else what no stop string can still claim."""
    end = len(self.text)
    if not (final or self.stopped):
      held = max((k for s in self._stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
      end -= held
      while end > self._sent and self.text[end - 1] == _REPLACEMENT:
        end -= 1
    out = self.text[self._sent:end]
    self._sent = max(self._sent, end)
    return out
