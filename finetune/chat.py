"""Try the result: chat with base + adapter, answers streamed as they are generated.

    finetune-chat outputs/llama2-7b-medical/<time>/adapter           (interactive; /reset, /exit)
    finetune-chat <adapter> --prompt "What causes influenza?"          (one answer, then exit)
    echo "What causes influenza?" | finetune-chat <adapter>            (one answer per input line)
    finetune-chat <adapter> --tools tools.json                         (function calling: the tools' JSON
                                                                       schemas reach the template; answer a
                                                                       call with /tool RESULT)

The base model is loaded the way the run trained it (its plan's quantization) and the
adapter computes in the precision it was trained in; prompts are rendered with the chat
template saved with the adapter, so the model sees the format it learned.

Every prompt is fitted to the model's context (:func:`context_length`) with room for
``--max-new-tokens``: when the conversation outgrows it, its oldest turns are dropped (a note on
stderr says how many); a message too long on its own is refused with one ``error:`` line, and the
chat goes on (a one-shot ``--prompt`` exits 2).

Code from the model's repository runs only with ``--trust-remote-code`` on this command line,
never because the run directory's config.yaml asks for it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from finetune.errors import ConfigError, FinetuneError

# Where a config names its context length, in order of preference (GPT-2 names it n_positions and n_ctx,
# ChatGLM seq_length).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
# transformers gives a tokenizer saved without a limit model_max_length = int(1e30): not a context length.
_NO_LIMIT = 10**7


class PromptTooLong(FinetuneError):
    """The message (with the system message) leaves no room for the answer in the model's context."""

    exit_code = 2


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The model's context in tokens: its config's max_position_embeddings, else n_positions (n_ctx,
    seq_length for the families that only name those; a multimodal config's text_config after its own
    fields), else the tokenizer's model_max_length when it is a real figure; None when nothing says.

    `config` is a transformers config or a config.json dict."""
    def get(c: Any, key: str) -> Any:
        return c.get(key) if isinstance(c, dict) else getattr(c, key, None)

    configs = [config] if config is not None else []
    text = get(config, "text_config") if config is not None else None
    if text is not None:
        configs.append(text)
    for c in configs:
        for key in _CONTEXT_KEYS:
            value = get(c, key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        return limit
    return None


def _turns(history: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The conversation in whole turns: each user message with the answers (and tool results) that follow it."""
    turns: list[list[dict[str, str]]] = []
    for m in history:
        if m["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return turns


class Chat:
    def __init__(self, adapter: str, system: str | None = None, max_new_tokens: int = 256,
                 trust_remote_code: bool = False, tools: list | None = None):
        import torch
        from transformers import AutoTokenizer

        from data_prep.templates import stop_token_ids
        from finetune.models.loader import load_with_adapter
        from finetune.models.merge import find_run

        run = find_run(adapter, trust_remote_code=trust_remote_code)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir, trust_remote_code=trust_remote_code)
        if not self.tokenizer.chat_template:
            raise FinetuneError(f"{run.adapter_dir}: the adapter has no chat template saved with it")
        self.model = load_with_adapter(run.model_cfg, run.choices, run.adapter_dir, self.device)
        self.system = system
        self.max_new_tokens = max_new_tokens
        template_name = _template_name(run.run_dir)
        self.stop_ids = stop_token_ids(self.tokenizer, template_name)  # EOS and the end-of-turn token
        self.tools = tools
        self.history: list[dict[str, str]] = []
        self.context = context_length(getattr(self.model, "config", None), self.tokenizer)
        if self.context is not None and max_new_tokens >= self.context:
            raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                              f"context ({self.context} tokens): pass a smaller one")

    def prompt_text(self, message: str, role: str = "user") -> str:
        """The text the model is given for `message` (a user's, or a tool's result) after the conversation so far."""
        return self._render(message, role, self.history)

    def _render(self, message: str, role: str, history: list[dict[str, str]]) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + history
        messages = messages + [{"role": role, "content": message}]
        extra = {"tools": self.tools} if self.tools else {}
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        except Exception as e:  # jinja's TemplateError, or a template that cannot take the role
            raise FinetuneError(f"the adapter's chat template cannot render this conversation: {e}") from e

    def _tokens(self, text: str) -> list[int]:
        # verbose=False: we fit the prompt to the context ourselves; the tokenizer's own limit may also be
        # smaller than the model's, and its warning would be wrong then.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def fit(self, message: str, role: str = "user") -> list[int]:
        """The prompt's token ids for `message` after the conversation so far, leaving room for max_new_tokens
        in the model's context: the oldest whole turns of the conversation are dropped (for good, with one
        note on stderr) until it fits; never the system message, the new message, nor (for a tool's result)
        the turn whose call it answers. Raises PromptTooLong when even those do not fit."""
        ids = self._tokens(self.prompt_text(message, role))
        if self.context is None or len(ids) + self.max_new_tokens <= self.context:
            return ids
        room = self.context - self.max_new_tokens
        turns = _turns(self.history)
        kept = turns[-1:] if role == "tool" else []  # a tool's result goes with the call it answers
        droppable = turns[:len(turns) - len(kept)]
        alone = self._tokens(self._render(message, role, [m for t in kept for m in t]))
        if len(alone) > room:
            raise PromptTooLong(f"this message is {len(alone)} tokens and the model's context is {self.context} "
                                f"(with max_new_tokens {self.max_new_tokens}): shorten it")
        dropped = 0
        while len(ids) > room:  # ends: with every droppable turn gone the prompt is `alone`, which fits
            dropped += 1
            history = [m for t in droppable[dropped:] + kept for m in t]
            ids = alone if dropped == len(droppable) else self._tokens(self._render(message, role, history))
        self.history = [m for t in droppable[dropped:] + kept for m in t]
        turns_text = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
        sys.stderr.write(f"note: dropped {turns_text} of the conversation to fit the model's context "
                         f"({self.context} tokens)\n")
        sys.stderr.flush()
        return ids

    def ask(self, message: str, stream: Any = None, role: str = "user", prompt_ids: list[int] | None = None) -> str:
        """The model's answer to `message`; role "tool" hands it a tool's result for the call it just made.
        `prompt_ids` is what :meth:`fit` gave for this message, when the caller fitted it already."""
        import torch
        from transformers import TextStreamer

        ids = prompt_ids if prompt_ids is not None else self.fit(message, role)
        input_ids = torch.tensor([ids], device=self.device)
        max_new = self.max_new_tokens if self.context is None else min(self.max_new_tokens, self.context - len(ids))
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_new, do_sample=False, eos_token_id=self.stop_ids,
                                      pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)
        new = out[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(new) if t in self.stop_ids), len(new))
        answer = self.tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
        self.history += [{"role": role, "content": message}, {"role": "assistant", "content": answer}]
        return answer


def load_tools(path: str) -> list:
    """The tool definitions in a JSON file (a list of OpenAI-style {type: function, function: {...}}), checked
    as the data stage checks a row's `tools`."""
    import json
    from pathlib import Path

    from data_prep.formats import RowError, row_tools

    try:
        tools = json.loads(Path(path).read_text())
    except OSError as e:
        raise FinetuneError(f"--tools {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise FinetuneError(f"--tools {path}: not JSON ({e.msg}, line {e.lineno})") from e
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    try:
        checked = row_tools({"tools": tools})
    except RowError as e:
        raise FinetuneError(f"--tools {path}: {e}") from e
    if not checked:
        raise FinetuneError(f"--tools {path}: the list of tools is empty")
    return checked


def _template_name(run_dir) -> str:
    import json

    report = run_dir / "data_report.json"
    return json.loads(report.read_text()).get("chat_template", "") if report.is_file() else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune-chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="the adapter directory (outputs/<recipe>/<time>/adapter) or its run directory")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--tools", help="a JSON file with the tools the model may call (a list of OpenAI-style "
                                        "function schemas, as in a messages row's `tools`)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let code from the base model's repository run (needed when the run's recipe set "
                             "model.trust_remote_code; never taken from the run directory)")
    args = parser.parse_args(argv)
    from finetune.quiet import quiet_libraries, quiet_loading

    quiet_libraries()
    quiet_loading()
    try:
        tools = load_tools(args.tools) if args.tools else None
        chat = Chat(args.adapter, system=args.system, max_new_tokens=args.max_new_tokens,
                    trust_remote_code=args.trust_remote_code, tools=tools)
        if args.prompt is not None:
            chat.ask(args.prompt, stream=sys.stdout)
            return
        _loop(chat)
    except FinetuneError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)


def _loop(chat: Chat) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        print("chatting with the adapter; /reset forgets the conversation, /exit (or Ctrl-D) quits"
              + ("; /tool RESULT answers the model's tool call" if chat.tools else ""))
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            chat.history.clear()
            print("(conversation reset)")
            continue
        role = "user"
        if line.startswith("/tool ") or line == "/tool":
            role, line = "tool", line[len("/tool"):].strip()
        try:
            ids = chat.fit(line, role)
        except PromptTooLong as e:  # this turn is refused; the conversation goes on as it was
            sys.stdout.flush()
            sys.stderr.write(f"error: {e}\n")
            sys.stderr.flush()
            continue
        print("model> ", end="", flush=True)
        chat.ask(line, stream=sys.stdout, role=role, prompt_ids=ids)


if __name__ == "__main__":
    main()
