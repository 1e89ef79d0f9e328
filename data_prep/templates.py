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

# ChatML (<|im_start|>role\ncontent<|im_end|>), for tokenizers that have its two tokens. With a row's
# `tools`, the system turn lists their JSON schemas and the assistant calls one as
# <tool_call>{"name": ..., "arguments": ...}</tool_call> (the convention of Qwen2.5 and Hermes); a tool's
# result comes back in a user turn inside <tool_response>. The calls are trained, the results are not.
CHATML = ChatTemplate(
    name="chatml",
    jinja=(
        "{%- if tools -%}"
        "{{ '<|im_start|>system\\n' }}"
        "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
        "{{ '# Tools\\n\\nYou may call one or more functions. Their signatures, within <tools></tools>:\\n<tools>' }}"
        "{%- for tool in tools -%}{{ '\\n' + (tool | tojson) }}{%- endfor -%}"
        "{{ '\\n</tools>\\n\\nTo call one, answer with <tool_call>\\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
        "{%- set loop_messages = messages[1:] if messages[0]['role'] == 'system' else messages -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] }}"
        "{%- for call in message['tool_calls'] or [] -%}"
        "{%- set fn = call['function'] if call['function'] is defined else call -%}"
        "{{ '\\n' if message['content'] or not loop.first else '' }}"
        "{{ '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
        "{{ fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) }}{{ '}\\n</tool_call>' }}"
        "{%- endfor -%}"
        "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{%- elif message['role'] == 'tool' -%}"
        "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
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
    """The token that ends an assistant turn under template `name` (generation stops there): a built-in
    template's own, else the one the tokenizer's current chat template writes after an answer
    (:func:`rendered_end_of_turn`), else the tokenizer's EOS."""
    template = BUILTIN.get(name)
    if template is not None and template.end_of_turn:
        return template.end_of_turn
    return rendered_end_of_turn(tokenizer) or tokenizer.eos_token


ANSWER_SENTINEL = "Zq7 answer sentinel"


def rendered_end_of_turn(tokenizer) -> str | None:
    """The first special token the tokenizer's chat template writes after an assistant's answer
    (``<|eot_id|>`` for Llama 3, ``<|im_end|>`` for ChatML and Qwen, ``<end_of_turn>`` for Gemma, ``</s>``
    for Llama 2), read off a rendering; None when there is no template or it writes none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER_SENTINEL}], tokenize=False)
    except Exception:  # a template that needs more than this (a system turn, tools): fall back to EOS
        return None
    at = text.rfind(ANSWER_SENTINEL) if isinstance(text, str) else -1
    if at < 0:
        return None
    rest = text[at + len(ANSWER_SENTINEL):]
    tokens = sorted((t for t in tokenizer.added_tokens_encoder if t.strip()), key=len, reverse=True)
    if not tokens:
        return None
    hit = re.search("|".join(map(re.escape, tokens)), rest)
    return hit.group() if hit else None


def stop_token_ids(tokenizer, name: str = "") -> list[int]:
    """Every id generation stops at: EOS and the template's end-of-turn token (sorted, no UNK)."""
    eot = end_of_turn_token(name, tokenizer)
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(eot) if eot else None}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def write_generation_config(tokenizer, directory, base=None, name: str = "") -> list[int]:
    """generation_config.json in `directory` naming every stop (``eos_token_id`` a list holding the end-of-turn
    token) and the pad, on top of `base` (the model's own GenerationConfig) when given. Returns the stops."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    own = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    stops = sorted({*stop_token_ids(tokenizer, name), *(i for i in own if isinstance(i, int))})
    config.eos_token_id = stops if len(stops) > 1 else stops[0]
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(directory)
    return stops
