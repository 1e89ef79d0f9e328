"""Built-in chat templates for base models that ship none (``model.chat_template``).

Each template is Jinja, as transformers renders it, with ``{% generation %}`` around
exactly the tokens the model must learn to produce: the assistant's answer and its
end-of-turn token. ``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)``
turns those markers into the loss mask, so the ids we train on are the ids the
tokenizer gives for the rendered conversation (no boundary drift between training
and inference). The template is saved with the adapter and used again by
evaluation and chat; the markers are ignored when rendering a prompt.

A tokenizer's own template is used as it is. When it has no markers (most shipped
templates have none) the mask is derived from prefix renderings instead, exactly and
checked row by row (see :class:`Resolved`), rather than swapping in another template:
the model then trains on exactly the text the template renders at inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from finetune.errors import ConfigError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    # Tokens the template writes as control tokens; the tokenizer must know each as one token.
    required_tokens: tuple[str, ...] = ()
    # What ends an assistant turn (generation stops there); None: the tokenizer's EOS.
    end_of_turn: str | None = None


# Llama-2-chat's format: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>
# A prompt ends with [/INST]: no separate generation prompt.
LLAMA2 = ChatTemplate(
    name="llama-2",
    jinja=(
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set system_message = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.index0 == 0 and system_message is not none -%}"
        "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
        "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{%- else -%}"
        "{% generation %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endgeneration %}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
)

# Stanford Alpaca's prompt format, with the input folded into the user turn. The user turn
# ends with the response header, so a prompt needs no separate generation prompt.
ALPACA = ChatTemplate(
    name="alpaca",
    jinja=(
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{%- set system_message = 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.' -%}"
        "{%- set loop_messages = messages -%}{%- endif -%}"
        "{{ bos_token + system_message + '\\n\\n' }}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '### Instruction:\\n' + message['content'].strip() + '\\n\\n### Response:\\n' }}"
        "{%- else -%}"
        "{% generation %}{{ message['content'].strip() + eos_token }}{% endgeneration %}"
        "{{ '\\n\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
)

# ChatML (<|im_start|>role\ncontent<|im_end|>), for tokenizers that have its two tokens.
CHATML = ChatTemplate(
    name="chatml",
    jinja=(
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{%- else -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    required_tokens=("<|im_start|>", "<|im_end|>"),
    end_of_turn="<|im_end|>",
)

BUILTIN: dict[str, ChatTemplate] = {t.name: t for t in (LLAMA2, ALPACA, CHATML)}

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Resolved:
    """The template a run trains with, and how its loss mask is derived."""

    name: str  # a built-in name, or "tokenizer" for the tokenizer's own
    jinja: str
    # "markers": the template marks the assistant's tokens with {% generation %} (transformers records the spans).
    # "prefixes": the tokenizer's own template has no markers; each assistant turn's span is found by rendering
    # the conversation up to the turn (with the generation prompt) and up to its end, and is accepted only when
    # both renderings are prefixes of the whole conversation's (checked for every row; see data_prep.encode).
    masking: str


def resolve(name: str | None, tokenizer) -> Resolved:
    """The template to train with. A built-in name wins; null takes the tokenizer's own.

    Raises ConfigError when there is none, or when the tokenizer lacks the template's control tokens.
    """
    if name is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        if not own:
            raise ConfigError(
                "model.chat_template: the tokenizer has no chat template of its own (base models such as "
                f"Llama-2 ship none); set a built-in one: {', '.join(sorted(BUILTIN))}"
            )
        return Resolved("tokenizer", own, "markers" if GENERATION_TAG.search(own) else "prefixes")
    if name not in BUILTIN:
        raise ConfigError(f"model.chat_template: unknown template '{name}' (built-in: {', '.join(sorted(BUILTIN))})")
    template = BUILTIN[name]
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.required_tokens if t not in vocab]
    if missing:
        raise ConfigError(
            f"model.chat_template: '{name}' needs the tokens {', '.join(missing)}, which this tokenizer "
            f"does not have; pick another template ({', '.join(sorted(set(BUILTIN) - {name}))})"
        )
    return Resolved(template.name, template.jinja, "markers")


def end_of_turn_token(name: str, tokenizer) -> str:
    """The token that ends an assistant turn under template `name` (generation stops there)."""
    template = BUILTIN.get(name)
    if template is not None and template.end_of_turn:
        return template.end_of_turn
    return tokenizer.eos_token
