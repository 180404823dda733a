"""Chat templates as transformers renders them: a tokenizer directory's template, compiled in a sandboxed Jinja
environment with the helpers HF templates call.

Used by the HF tokenizer (data/tokenizer.py) to render prompts, and to find the token a GGUF's template writes
after an assistant message.
"""

import datetime
import json
import os


def compile_template(source: str):
  """Sandboxed Jinja like transformers' apply_chat_template: trim/lstrip blocks, loop controls, raise_exception,
  tojson, strftime_now, and the {% generation %} block (it marks assistant text for training masks; rendering
  keeps its body as is)."""
  from jinja2 import TemplateError, nodes
  from jinja2.ext import Extension, loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class GenerationBlock(Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(format_string):
    return datetime.datetime.now().strftime(format_string)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


def read_template(directory: str, config: dict) -> str | None:
  """chat_template.jinja, else tokenizer_config's chat_template (a string, or a list of named templates)."""
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) else None
