"""A chat template given instead of the model file's: llama.cpp's ``--chat-template NAME|JINJA`` and
``--chat-template-file FILE`` (a model without one, a base model, or one whose template is broken).

Names are the common families' templates, written as their model cards' Jinja renders them (llama.cpp's built-in
names). Any other value is Jinja text, rendered in :mod:`.chat`'s sandbox as a model file's template is.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..capped import read_capped, size_text
from ..errors import InvalidArgument
from . import chat

TEMPLATE_FILE_LIMIT = 1 << 20  # bytes: templates are a few KiB

_CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
           "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
_LLAMA3 = ("{%- for message in messages %}{%- if loop.first %}{{- bos_token }}{%- endif %}{{- '<|start_header_id|>' + "
           "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
           "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Gemma has no system turn: the system text opens the first user turn, as Gemma's own template does
_GEMMA = ("{{- bos_token }}{%- set first = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == "
          "'system' else '' %}{%- for message in messages if message['role'] != 'system' %}{%- set role = 'model' if "
          "message['role'] == 'assistant' else message['role'] %}{{- '<start_of_turn>' + role + '\\n' + (first if "
          "loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}")
_PHI3 = ("{%- for message in messages %}{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}")
# name -> (Jinja text, its turn markers: the model's special tokens it needs, the end of a turn last)
BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (_CHATML, ("<|im_start|>", "<|im_end|>")),
    "llama3": (_LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": (_GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "phi3": (_PHI3, ("<|user|>", "<|assistant|>", "<|end|>")),
}
SAMPLE = [{"role": "user", "content": "Hi"}]


def template_from(value: str | None = None, file: str | Path | None = None) -> str | None:
    """The Jinja text ``--chat-template VALUE`` (a built-in name or Jinja) or ``--chat-template-file FILE`` gives;
    None for neither (the model's own). It must render a plain conversation, or this says why."""
    if value is not None and file is not None:
        raise InvalidArgument("--chat-template and --chat-template-file both give the template; give one")
    if file is not None:
        try:  # bounded (`/dev/zero` was read until the OOM killer came; templates are a few KiB)
            data = read_capped(file, TEMPLATE_FILE_LIMIT)
            if data is None:
                raise InvalidArgument(f"--chat-template-file {file}: over {size_text(TEMPLATE_FILE_LIMIT)}, not a "
                                      f"chat template; give the file that holds one")
            text = data.decode("utf-8")
        except OSError as e:
            raise InvalidArgument(f"--chat-template-file {file}: {e.strerror or e}; give a file that holds a Jinja "
                                  f"chat template") from None
        except UnicodeDecodeError:
            raise InvalidArgument(f"--chat-template-file {file}: not UTF-8 text; give a Jinja chat template") from None
        where = f"--chat-template-file {file}"
    elif value is None:
        return None
    elif value.strip().lower() in BUILTIN:
        return BUILTIN[value.strip().lower()][0]
    elif "{{" in value or "{%" in value:
        text, where = value, "--chat-template"
    else:
        raise InvalidArgument(f"--chat-template {value}: not a template name ({', '.join(BUILTIN)}) nor Jinja text; "
                              f"give one of those names, the template's text, or --chat-template-file FILE")
    if not text.strip():
        raise InvalidArgument(f"{where}: the template is empty")
    return check_renders(text, where)


def check_renders(text: str, where: str, fix: str = "") -> str:
    """``text`` when it renders a plain conversation with its messages' text, else the reason (``fix``: what the
    user can do, after it)."""
    try:
        out = chat.render(text, SAMPLE, bos_token="", eos_token="")
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: it does not render a plain conversation: {e}{fix}") from None
    if "Hi" not in out:
        raise InvalidArgument(f"{where}: it renders a conversation without the messages' text; a chat template "
                              f"writes each message's content (message['content']){fix}")
    return text


def check_markers(template: str, engine, model: str) -> None:
    """Warn when a built-in template's turn markers are not special tokens of the model (they would be read as
    plain text it never saw), or its end of turn does not end a generation (answers would run on)."""
    name = next((n for n, (text, _) in BUILTIN.items() if text == template), None)
    if name is None:
        return
    specials = engine.control_tokens()
    markers = BUILTIN[name][1]
    missing = [m for m in markers if m not in specials]
    if missing:
        warnings.warn(f"the {name} chat template's markers {', '.join(missing)} are not special tokens of {model}: "
                      f"it reads them as plain text; give the template of its family", stacklevel=4)
    elif specials[markers[-1]] not in engine.eos_tokens:
        warnings.warn(f"{markers[-1]} (the {name} template's end of turn) does not end a generation of {model}: "
                      f"answers may run past their turn; give the template of its family", stacklevel=4)


def model_template(given: str | None, engine, model: str) -> str | None:
    """The template a model renders with: ``given`` (from :func:`template_from`, checked against the model's
    tokens) or the file's own."""
    if given is None:
        return engine.chat_template()
    check_markers(given, engine, model)
    return given
