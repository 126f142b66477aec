"""The chat templates a recipe's ``chat_template:`` may name: the names mergekit ships.

Each template is written here from its format's published description (not from mergekit's
files), with explicit ``{%- -%}`` whitespace control so that it renders the same with and
without transformers' ``trim_blocks``/``lstrip_blocks``. ``tests/test_chat_templates.py``
renders one conversation with these and with mergekit 0.1.5's templates through
transformers' ``apply_chat_template`` and compares the strings.

- ``alpaca``: Stanford Alpaca's prompt: an optional preamble (here the last system message),
  then ``### Instruction:`` / ``### Input:`` / ``### Response:`` sections separated by a blank
  line; the generation prompt is ``### Response:\\n``. The ``user_context`` role is an
  ``### Input:`` section, as in mergekit.
- ``chatml``: OpenAI's ChatML, as in the transformers documentation:
  ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` per message.
- ``exaone``: LG AI Research's EXAONE 3.0 format: ``[|ROLE|]CONTENT``, a user turn ends with
  ``\\n``, other turns with ``[|endofturn|]\\n``; an empty system turn opens a conversation
  that has none. mergekit's file leaks its indentation into the output; this one does not.
- ``llama3``: Meta's Llama 3 instruct format: ``BOS`` then, per message,
  ``<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>`` with the content
  trimmed, no newline between turns. mergekit's file adds a ``\\n`` after every ``<|eot_id|>``.
- ``mistral``: Mistral's ``[INST]`` format: ``BOS [INST] USER [/INST] ASSISTANT EOS...``, an
  optional system message put before the first user message with a blank line, user and
  assistant alternating (anything else is refused with ``raise_exception``).
"""

from __future__ import annotations

ALPACA = (
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{%- set sections = namespace(text=[]) -%}"
    "{%- if systems -%}{%- set sections.text = [systems[-1]['content'] | trim] -%}{%- endif -%}"
    "{%- set heads = {'user': '### Instruction:', 'user_context': '### Input:', "
    "'assistant': '### Response:'} -%}"
    "{%- for message in messages if message['role'] in heads -%}"
    "{%- set sections.text = sections.text + "
    "[heads[message['role']] + '\\n' + (message['content'] | trim)] -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
    "{%- set sections.text = sections.text + ['### Response:\\n'] -%}"
    "{%- endif -%}"
    "{{- sections.text | join('\\n\\n') -}}"
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

EXAONE = (
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "{{- '[|system|][|endofturn|]\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '[|' ~ message['role'] ~ '|]' ~ message['content'] -}}"
    "{{- '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
)

LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim -}}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

MISTRAL = (
    "{%- set turns = messages -%}"
    "{%- set system = none -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- set expected = 'user' if loop.index0 is even else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('mistral chat template: after an optional system message, roles "
    "must alternate user, assistant, user, ...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set text = message['content'] -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set text = system ~ '\\n\\n' ~ text -%}"
    "{%- endif -%}"
    "{{- ' [INST] ' ~ text ~ ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' ~ message['content'] ~ eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN_TEMPLATES = {
    "alpaca": ALPACA,
    "chatml": CHATML,
    "exaone": EXAONE,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
}
"""``chat_template:`` names and their Jinja text (mergekit 0.1.5 ships the same names)."""
