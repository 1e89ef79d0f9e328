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

Code from the model's repository runs only with ``--trust-remote-code`` on this command line,
never because the run directory's config.yaml asks for it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from finetune.errors import FinetuneError


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

    def prompt_text(self, message: str, role: str = "user") -> str:
        """The text the model is given for `message` (a user's, or a tool's result) after the conversation so far."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages = messages + [{"role": role, "content": message}]
        extra = {"tools": self.tools} if self.tools else {}
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        except Exception as e:  # jinja's TemplateError, or a template that cannot take the role
            raise FinetuneError(f"the adapter's chat template cannot render this conversation: {e}") from e

    def ask(self, message: str, stream: Any = None, role: str = "user") -> str:
        """The model's answer to `message`; role "tool" hands it a tool's result for the call it just made."""
        import torch
        from transformers import TextStreamer

        text = self.prompt_text(message, role)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                                      streamer=streamer)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
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
    from finetune.quiet import quiet_libraries

    quiet_libraries()
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
        print("model> ", end="", flush=True)
        chat.ask(line, stream=sys.stdout, role=role)


if __name__ == "__main__":
    main()
