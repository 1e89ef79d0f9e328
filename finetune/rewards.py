"""GRPO's reward functions (reward.functions): the built-ins, the user's own module:function, and TRL's adapters.

A recipe declares its rewards as data, and :func:`build` checks every entry before anything loads: a misspelled
option, a regex that does not compile or a function that cannot be imported would otherwise surface only after the
model is downloaded and the first group of completions sampled. Each problem is a ConfigError (exit 2) of one line
that names the entry as ``reward.functions.<index>`` and the key to fix. The data's columns are not known yet at that
point, so the columns each reward reads are kept on it and :func:`check_columns` checks them once the data stage has
read the prompts.

A :class:`Reward` scores plain-text completions, one float each. The train stage hands :func:`trl_functions` to
TRL's GRPOTrainer (reward_funcs; the weights go to GRPOConfig.reward_weights), which calls them with conversational
or plain completions and every dataset column; the evaluation stage calls :func:`score` for each function's rewards
and their weighted total, the quantity GRPO optimizes. The rules of the built-ins are in their docstrings below.

A user function is imported, never instantiated through Hydra's ``_target_``: a recipe names code, it does not run
arbitrary constructors. It is called as ``f(completions=..., prompts=..., **options, **columns)`` (completions
positionally when its first parameter has another name); its required parameters other than those are the data
columns it reads. What it returns is checked on every call, so a wrong length or a non-number names the function
instead of failing deep inside TRL's tensor code.

This module belongs to the ground layer: the standard library, finetune.errors and finetune.paths (jsonschema lazily,
for the json built-in's schemas; a RewardConfig is read by its fields, not imported), so that validating a recipe
never pulls in torch and the train and evaluation stages can both use it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError

# The options of RewardFunction besides name and weight; each built-in takes only its own (`options` is the user
# functions').
OPTION_KEYS = ("column", "pattern", "tolerance", "min", "max", "unit", "schema", "options")
# name -> (required options, optional options); length needs min or max (checked by its factory)
BUILTINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "exact_match": (("column",), ("pattern",)),
    "numeric_match": (("column",), ("pattern", "tolerance")),
    "regex": (("pattern",), ()),
    "length": ((), ("min", "max", "unit")),
    "json": ((), ("schema",)),
}
UNITS = ("words", "characters", "tokens")
# TRL's own keyword arguments to a reward function, not data columns
_TRL_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")

# A number as written in an answer: 1,234 / $12 / -3.5 / .5 / 1e3 / 3/4. A sign counts only where it cannot be a
# minus between two terms ("5-3" is 5 and 3, not 5 and -3).
_NUMBER = re.compile(r"(?P<sign>(?<![\w)\]])[-+\u2212])?\$?"
                     r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\d.])\.\d+)"
                     r"(?P<exp>[eE][-+]?\d+)?(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?")
_FENCE = re.compile(r"```(?:json)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass
class Reward:
    """One reward function, built and checked: called with plain-text completions, the prompts, and each data
    column it reads as a list aligned with the completions; returns one float per completion."""

    name: str  # the metric's name (TRL logs rewards/<name>/mean): unique in the list
    weight: float
    columns: tuple[str, ...] = ()  # the data's reference columns it reads
    fn: Callable[..., list[float]] = field(default=lambda completions, prompts, columns: [], repr=False)
    entry: str = ""  # reward.functions.N: where errors point

    def __call__(self, completions: list[str], prompts: list[str] | None = None, **columns: list) -> list[float]:
        where = f"{self.entry} ({self.name})"
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise ConfigError(f"{where}: the data has no column {', '.join(missing)} (it has: "
                              f"{', '.join(sorted(columns)) or 'none'})")
        try:
            values = self.fn(list(completions), prompts, columns)
        except ConfigError:
            raise
        except Exception as e:  # the user's code: whatever it raises, named in one line
            raise ConfigError(f"{where}: raised {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from e
        try:
            values = list(values)
        except TypeError:
            raise ConfigError(f"{where}: returned a {type(values).__name__}, not one number per completion") from None
        if len(values) != len(completions):
            raise ConfigError(f"{where}: returned {len(values)} rewards for {len(completions)} completions: return "
                              "one number per completion")
        for i, v in enumerate(values):
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ConfigError(f"{where}: reward {i} is {v!r}, not a finite number")
        return [float(v) for v in values]


def _text(value: Any, last: bool = True) -> str:
    """Plain text as it is; conversational messages: the last one's content (a completion) or all of them joined by
    newlines (a prompt, last=False); a content made of parts: their text parts joined."""
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "content" in m for m in value):
        return _text(value[-1]["content"]) if last else "\n".join(_text(m["content"]) for m in value)
    if isinstance(value, list):
        return "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in value)
    return "" if value is None else str(value)


def _normalize(text: Any) -> str:
    text = re.sub(r"\s+", " ", str(text).strip()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def _number(text: Any) -> float | None:
    """The last number in `text` (a number itself as it is), or None."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    found = None
    for m in _NUMBER.finditer(str(text)):
        value = float(m.group("num").replace(",", "") + (m.group("exp") or ""))
        if m.group("den"):
            den = float(m.group("den"))
            if den == 0:
                continue
            value /= den
        found = -value if m.group("sign") in ("-", "\u2212") else value
    return found


def _compile(pattern: Any, entry: str, groups: bool) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{entry}: `pattern` must be a regular expression (a string), got {pattern!r}")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{entry}: `pattern` {pattern!r} is not a valid regular expression: {e.msg} at position "
                          f"{e.pos}") from None
    if groups and compiled.groups < 1:
        raise ConfigError(f"{entry}: `pattern` {pattern!r} has no group: put the answer in one, e.g. "
                          "<answer>(.*?)</answer>")
    return compiled


def _answer(spec, entry: str) -> tuple[str, Callable[[str], str | None]]:
    """exact_match's and numeric_match's reference column, and what takes their answer out of a completion."""
    if not isinstance(spec.column, str) or not spec.column:
        raise ConfigError(f"{entry}: `column` is missing: name the data's reference column, e.g. column: answer")
    if spec.pattern is None:
        return spec.column, lambda text: text
    pattern = _compile(spec.pattern, entry, groups=True)
    return spec.column, lambda text: m.group(1) if (m := pattern.search(text)) else None


def _exact_match(spec, entry: str, tokenizer) -> tuple[Callable, tuple[str, ...]]:
    """1.0 when the answer (group 1 of `pattern`'s first match, or the whole completion) equals the reference
    column's value once both are stripped, their whitespace collapsed, lowercased and a trailing period dropped;
    else 0.0 (no match of `pattern`: 0.0)."""
    column, extract = _answer(spec, entry)

    def fn(completions, prompts, columns):
        answers = (extract(c) for c in completions)
        return [float(a is not None and ref is not None and _normalize(a) == _normalize(ref))
                for a, ref in zip(answers, columns[column], strict=True)]
    return fn, (column,)


def _numeric_match(spec, entry: str, tokenizer) -> tuple[Callable, tuple[str, ...]]:
    """1.0 when the last number of the answer (group 1 of `pattern`'s first match, or the whole completion) is
    within `tolerance` of the reference column's number (its last one, when it is text); else 0.0, and 0.0 when
    either has no number. Numbers may be written 1,234 / $12 / -3.5 / 1e3 / 3/4. The default tolerance is 1e-6 of
    the reference's magnitude, at least 1e-9: equality up to float rounding."""
    column, extract = _answer(spec, entry)
    tolerance = spec.tolerance
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, int | float)
                                  or not math.isfinite(tolerance) or tolerance < 0):
        raise ConfigError(f"{entry}: `tolerance` must be a number >= 0, got {tolerance!r}")

    def match(answer: str | None, ref: Any) -> float:
        got, want = _number(answer) if answer is not None else None, _number(ref) if ref is not None else None
        if got is None or want is None:
            return 0.0
        return float(abs(got - want) <= (tolerance if tolerance is not None else max(1e-6 * abs(want), 1e-9)))

    def fn(completions, prompts, columns):
        return [match(extract(c), ref) for c, ref in zip(completions, columns[column], strict=True)]
    return fn, (column,)


def _regex(spec, entry: str, tokenizer) -> tuple[Callable, tuple[str, ...]]:
    """1.0 when `pattern` is found anywhere in the completion (re.search, no flags: anchor it with ^...$ for the
    whole text, inline flags such as (?i) or (?s) where wanted); else 0.0."""
    if spec.pattern is None:
        raise ConfigError(f"{entry}: `pattern` is missing: the regular expression a completion must match")
    pattern = _compile(spec.pattern, entry, groups=False)
    return (lambda completions, prompts, columns: [float(pattern.search(c) is not None) for c in completions]), ()


def _length(spec, entry: str, tokenizer) -> tuple[Callable, tuple[str, ...]]:
    """1.0 for a length in [min, max] (either bound may be left out); below min, n / min (0 at an empty text);
    above max, 1 - (n - max) / max, down to 0 at twice max (max 0: 0 for any text), never below 0. Lengths are
    the stripped text's words (whitespace-separated), characters, or tokens (the model's tokenizer, no special
    tokens)."""
    for key in ("min", "max"):
        value = getattr(spec, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{entry}: `{key}` must be a whole number >= 0, got {value!r}")
    lo, hi = spec.min, spec.max
    if lo is None and hi is None:
        raise ConfigError(f"{entry}: `min` and `max` are both missing: set either or both (the length rewarded)")
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{entry}: `min` {lo} is above `max` {hi}: swap them")
    unit = spec.unit or "words"
    if unit not in UNITS:
        raise ConfigError(f"{entry}: `unit` must be one of {', '.join(UNITS)}, got {unit!r}")
    if unit == "tokens" and tokenizer is None:
        raise ConfigError(f"{entry}: `unit` tokens needs the model's tokenizer, which this caller did not pass: "
                          "use words or characters, or build the rewards with the tokenizer")

    def size(text: str) -> int:
        text = text.strip()
        if unit == "words":
            return len(text.split())
        if unit == "characters":
            return len(text)
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return len(tokenizer.encode(text))

    def reward(n: int) -> float:
        if lo is not None and n < lo:
            return n / lo
        if hi is not None and n > hi:
            return max(0.0, 1.0 - (n - hi) / hi) if hi > 0 else 0.0
        return 1.0
    return (lambda completions, prompts, columns: [reward(size(c)) for c in completions]), ()


def _json(spec, entry: str, tokenizer) -> tuple[Callable, tuple[str, ...]]:
    """1.0 for valid JSON that satisfies `schema` (when given); 0.5 for valid JSON that does not; 0.0 for no
    valid JSON. The JSON is the content of the first ```json or ``` fence when the completion has one, else the
    whole stripped completion."""
    validator = None
    if spec.schema is not None:
        if not isinstance(spec.schema, Mapping):
            raise ConfigError(f"{entry}: `schema` must be a JSON schema (a mapping), got {spec.schema!r}")
        try:
            import jsonschema
        except ImportError:
            raise ConfigError(f"{entry}: `schema` needs jsonschema, which is not installed: pip install jsonschema "
                              "(or remove the schema to reward any valid JSON)") from None
        schema = json.loads(json.dumps(spec.schema))  # plain dicts and lists, as the validator expects
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.exceptions.SchemaError as e:
            raise ConfigError(f"{entry}: `schema` is not a valid JSON schema: {e.message}") from None
        validator = cls(schema)

    def reward(text: str) -> float:
        fence = _FENCE.search(text)
        try:
            value = json.loads((fence.group(1) if fence else text).strip())
        except ValueError:
            return 0.0
        return 1.0 if validator is None or validator.is_valid(value) else 0.5
    return (lambda completions, prompts, columns: [reward(c) for c in completions]), ()


_FACTORIES = {"exact_match": _exact_match, "numeric_match": _numeric_match, "regex": _regex, "length": _length,
              "json": _json}


def _import(spec, entry: str, search_dirs: list | None) -> Callable:
    module_name, _, attr = spec.name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{entry}: `name` {spec.name!r} must be module:function, both parts given")
    from finetune.paths import recipes_dir

    dirs = [Path(d) for d in search_dirs or []] + [Path.cwd()]
    try:
        dirs += [recipes_dir(), recipes_dir() / "recipe"]
    except FileNotFoundError:
        pass
    # In front of the installed packages, and left there: the module may import its neighbours later.
    for d in reversed([str(d.resolve()) for d in dirs if d.is_dir()]):
        if d not in sys.path:
            sys.path.insert(0, d)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{entry}: `name` {spec.name!r}: cannot import {module_name} ({first}); put "
                          f"{module_name}.py beside the recipe or in the working directory, or install it") from None
    fn = getattr(module, attr, None)
    if fn is None:
        own = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                     and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"{entry}: `name` {spec.name!r}: {module_name} has no {attr} (its functions: "
                          f"{', '.join(own[:8]) or 'none'}{', ...' if len(own) > 8 else ''})")
    if not callable(fn):
        raise ConfigError(f"{entry}: `name` {spec.name!r}: {attr} is a {type(fn).__name__}, not a function")
    return fn


def _user(spec, entry: str, search_dirs: list | None) -> tuple[Callable, tuple[str, ...], str]:
    """The user's function, its call planned from its signature: (call, its data columns, its name)."""
    fn = _import(spec, entry, search_dirs)
    options = spec.options or {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ConfigError(f"{entry}: `options` must be a mapping of keyword arguments, got {options!r}")
    options = dict(options)
    bad = (f"{entry}: `name` {spec.name!r} has a signature that cannot be called as f(completions=..., prompts=..., "
           "**options, **columns)")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{bad}: {e}") from None
    P = inspect.Parameter
    named = {p.name: p for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    takes_all = any(p.kind == P.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    by_position = "completions" not in named and bool(positional)  # else by keyword: named, or into **kwargs
    if "completions" not in named and not positional and not takes_all:
        raise ConfigError(f"{bad}: it takes no `completions` parameter (name one so, or make it the first)")
    first = positional[0].name if by_position else "completions"
    for key in ("completions", "prompts", first):
        if key in options:
            raise ConfigError(f"{entry}: `options` sets {key}, which the trainer passes itself: remove it")
    unknown = sorted(k for k in options if k not in named and not takes_all)
    if unknown:
        raise ConfigError(f"{entry}: `options` {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
                          f"parameter of {spec.name} (it takes: {', '.join(named) or 'no keywords'})")
    stuck = [p.name for p in params if p.kind == P.POSITIONAL_ONLY and p.default is P.empty and p.name != first]
    if stuck:
        raise ConfigError(f"{bad}: {', '.join(stuck)} can only be passed by position (drop the `/`)")
    columns = tuple(n for n, p in named.items() if p.default is P.empty and n not in ("completions", "prompts", first)
                    and n not in options)
    wants_prompts = "prompts" in named or takes_all

    def call(completions, prompts, data):
        kwargs = {k: v for k, v in data.items() if takes_all or (k in named and k not in (first, "prompts"))}
        kwargs.update(options)
        if wants_prompts:
            kwargs["prompts"] = prompts
        return fn(completions, **kwargs) if by_position else fn(completions=completions, **kwargs)
    return call, columns, getattr(fn, "__name__", None) or spec.name.partition(":")[2]


def build(reward_cfg, tokenizer=None, search_dirs: list | None = None) -> list[Reward]:
    """Validate and build reward.functions (a RewardConfig) before anything loads. `tokenizer`: the model's, for
    length's tokens unit; `search_dirs`: where user modules are looked for first (the recipe's directory). Every
    problem is a ConfigError of one line naming the entry (reward.functions.N) and the key to fix."""
    rewards: list[Reward] = []
    taken = {"reward"}  # score()'s weighted total
    for i, spec in enumerate(reward_cfg.functions):
        entry = f"reward.functions.{i}"
        name = spec.name
        weight = spec.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ConfigError(f"{entry}: `weight` must be a finite number, got {weight!r}")
        if weight == 0:
            raise ConfigError(f"{entry}: `weight` 0 turns it off: remove it")
        given = [k for k in OPTION_KEYS if getattr(spec, k) not in (None, {})]
        if isinstance(name, str) and name in BUILTINS:
            allowed = set(sum(BUILTINS[name], ()))
            for key in given:
                if key not in allowed:
                    owners = [b for b, (req, opt) in BUILTINS.items() if key in req + opt]
                    whose = f"{' and '.join(owners)}'s option" if owners else "for module:function rewards"
                    takes = ", ".join(sum(BUILTINS[name], ()) + ("weight",))
                    raise ConfigError(f"{entry}: `{key}` is {whose}, not {name}'s (it takes {takes}): remove it")
            fn, columns = _FACTORIES[name](spec, entry, tokenizer)
            base = name
        elif isinstance(name, str) and name.count(":") == 1:
            for key in given:
                if key != "options":
                    raise ConfigError(f"{entry}: `{key}` is a built-in's option; {name} takes only options "
                                      f"(its keyword arguments) and weight: move it into options, or remove it")
            fn, columns, base = _user(spec, entry, search_dirs)
        else:
            raise ConfigError(f"{entry}: `name` {name!r} is not a reward function: use a built-in "
                              f"({', '.join(BUILTINS)}) or your own as module:function")
        label = getattr(spec, "label", None)
        if label is not None:  # the metric name the user chose: a word, unique in the list
            if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", label) or label in taken:
                why = "is taken by another function (or is `reward`, the total)" if label in taken else (
                    "must be a name of letters, digits, _ . - (it names the metrics rewards/<label>/mean)")
                raise ConfigError(f"{entry}: `label` {label!r} {why}")
            base = label
        unique, n = base, 1
        while unique in taken:
            n += 1
            unique = f"{base}_{n}"
        taken.add(unique)
        rewards.append(Reward(name=unique, weight=float(weight), columns=columns, fn=fn, entry=entry))
    return rewards


def check_columns(rewards: list[Reward], columns: set[str], source: str) -> None:
    """A ConfigError (one line) for the first reward that reads a column the prompt data (`source`, as the
    message should name it) does not have."""
    for r in rewards:
        missing = [c for c in r.columns if c not in columns]
        if missing:
            raise ConfigError(f"{r.entry} ({r.name}) reads the column {', '.join(missing)}, which {source} does not "
                              f"have (its columns: {', '.join(sorted(columns)) or 'none'}): fix the reward's column, "
                              "or add it to the data")


def trl_functions(rewards: list[Reward]) -> list:
    """TRL GRPOTrainer's reward_funcs: one plain function per reward, named as it (TRL logs rewards/<name>/mean),
    taking TRL's keyword call (prompts, completions, completion_ids, every dataset column, trainer_state, ...)."""
    def adapter(reward: Reward):
        def f(prompts=None, completions=None, completion_ids=None, **kwargs):
            for key in _TRL_KWARGS:
                kwargs.pop(key, None)
            texts = None if prompts is None else [_text(p, last=False) for p in prompts]
            return reward([_text(c) for c in completions], texts, **kwargs)
        f.__name__ = f.__qualname__ = reward.name
        return f
    return [adapter(r) for r in rewards]


def score(rewards: list[Reward], completions: list[str], prompts: list[str] | None = None,
          **columns) -> dict[str, list[float]]:
    """Each function's rewards by name, and "reward": their weighted sum per completion (what GRPO optimizes)."""
    out = {r.name: r(completions, prompts, **columns) for r in rewards}
    out["reward"] = [sum(r.weight * out[r.name][i] for r in rewards) for i in range(len(completions))]
    return out
