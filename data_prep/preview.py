"""Print prepared examples with the trained tokens highlighted, to check the masking before training.

    finetune +recipe=tiny-demo stages=[data] dataset.preview=3

Each example is decoded in runs of tokens that share a label state: the runs the loss is
computed on (the answers and their end token) are shown on a green background, the
rest (system prompt, user turns, template markup) dimmed. What is highlighted is
exactly what the model is trained to produce.
"""

from __future__ import annotations

from itertools import groupby

from data_prep.store import Example

TRAINED = "bold black on green"
IGNORED = "dim"


def render(example: Example, tokenizer):
    """A rich Text of the example, trained runs highlighted."""
    from rich.text import Text

    text = Text()
    pairs = zip(example.input_ids, example.labels, strict=True)
    for trained, run in groupby(pairs, key=lambda p: p[1] != -100):
        ids = [t for t, _ in run]
        piece = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text.append(piece, style=TRAINED if trained else IGNORED)
    return text


def multi_turn_line(report) -> str:
    """dataset.multi_turn as applied: which policy each conversation got, and what splitting cost."""
    m = report.multi_turn
    applied = ", ".join(f"{policy} {n}" for policy, n in m.get("applied", {}).items())
    cost = (f"; split made {m['split_examples']} examples, repeating {m['repeated_prefix_tokens']} prefix tokens"
            if m.get("split_examples") else "")
    return f"multi-turn: dataset.multi_turn={m.get('setting')}: conversations by policy: {applied}{cost}"


def show(data, tokenizer, count: int, console) -> None:
    """Print the first `count` training examples (and say how many tokens of each are trained)."""
    from rich.panel import Panel
    from rich.text import Text

    examples = data.train[:count]
    r = data.report
    legend = Text.assemble(("trained", TRAINED), " (loss)  ", ("not trained", IGNORED), " (labels -100)")
    console.print(Text.assemble(f"preview: {len(examples)} of {r.train_rows} training examples, template ",
                                (r.chat_template, "bold"), f", masking {r.masking}: ", legend))
    if r.multi_turn:
        console.print(multi_turn_line(r))
    for ex in examples:
        trained = sum(1 for label in ex.labels if label != -100)
        title = f"{ex.location} - {len(ex.input_ids)} tokens, {trained} trained"
        console.print(Panel(render(ex, tokenizer), title=title, title_align="left", expand=False), soft_wrap=False)
