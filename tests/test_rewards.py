"""GRPO's reward functions (finetune/rewards.py): the built-ins on realistic completions, the user's own
module:function, TRL's adapters, and a one-line ConfigError naming the entry for every bad declaration."""

from __future__ import annotations

import sys

import pytest

from finetune import rewards
from finetune.config import RewardConfig, RewardFunction, compose
from finetune.errors import ConfigError


def build(*specs, **kw):
    return rewards.build(RewardConfig(functions=[RewardFunction(**s) for s in specs]), **kw)


def one(spec, completions, **columns):
    [reward] = build(spec)
    return reward(completions, **columns)


def refused(*specs, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        build(*specs, **kw)
    message = str(e.value)
    assert "\n" not in message, message
    return message


# --- the built-ins ---------------------------------------------------------------------------------------------

def test_exact_match_normalizes_case_whitespace_and_a_final_period():
    got = one({"name": "exact_match", "column": "answer"},
              ["  Paris.", "paris   is it", "PARIS", "Lyon"], answer=["Paris", "Paris is it", "paris.", "Paris"])
    assert got == [1.0, 1.0, 1.0, 0.0]


def test_exact_match_with_a_pattern_takes_its_first_group():
    got = one({"name": "exact_match", "column": "answer", "pattern": r"<answer>(.*?)</answer>"},
              ["I think <answer> Blue </answer>", "blue", "<answer>red</answer><answer>blue</answer>"],
              answer=["blue", "blue", "blue"])
    assert got == [1.0, 0.0, 0.0]  # no match: 0; the first match counts


def test_numeric_match_gsm8k_style():
    completions = ["48 + 24 = 72, so the answer is 1,234.", "She pays $12 in all.", "It drops by -3.5 degrees",
                   "1e3 grams", "3/4 of the cake", "5 - 3 leaves 2", "No idea.", "The answer is 71."]
    refs = ["1234", "12", "-3.5", "1000", "0.75", "2", "5", "72"]
    assert one({"name": "numeric_match", "column": "answer"}, completions, answer=refs) == [1, 1, 1, 1, 1, 1, 0, 0]


def test_numeric_match_extraction_tolerance_and_numeric_references():
    spec = {"name": "numeric_match", "column": "answer", "pattern": "<answer>(.*?)</answer>"}
    got = one(spec, ["reasoning 7 <answer>42</answer> 9", "42 but no tags", "<answer>forty-two</answer>"],
              answer=[42, 42, "42"])
    assert got == [1.0, 0.0, 0.0]
    loose = {"name": "numeric_match", "column": "answer", "tolerance": 0.01}
    assert one(loose, ["3.141", "3.2"], answer=["3.14", "#### 3.14"]) == [1.0, 0.0]
    assert one({"name": "numeric_match", "column": "answer"}, ["0.1 + 0.2 = 0.30000000000000004"],
               answer=[0.3]) == [1.0]


def test_regex_searches_without_flags():
    spec = {"name": "regex", "pattern": "^Answer:"}
    assert one(spec, ["Answer: 4", "The Answer: 4", "answer: 4"]) == [1.0, 0.0, 0.0]
    assert one({"name": "regex", "pattern": "(?i)^answer:"}, ["answer: 4"]) == [1.0]


def test_length_is_one_inside_and_falls_linearly_outside():
    spec = {"name": "length", "min": 4, "max": 8}
    texts = [" ".join(["w"] * n) for n in (0, 2, 4, 8, 12, 16, 40)]
    assert one(spec, texts) == [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert one({"name": "length", "max": 10, "unit": "characters"}, ["  abcde  ", "a" * 15]) == [1.0, 0.5]


def test_length_in_tokens_uses_the_tokenizer():
    class Tokenizer:
        def encode(self, text, add_special_tokens=True):
            return list(text.replace(" ", "")) + ([0] if add_special_tokens else [])

    [reward] = build({"name": "length", "min": 3, "unit": "tokens"}, tokenizer=Tokenizer())
    assert reward(["abc", "a b c d", "a"]) == [1.0, 1.0, pytest.approx(1 / 3)]


def test_json_fences_and_invalid_json():
    spec = {"name": "json"}
    completions = ['{"name": "Ada"}', 'Here:\n```json\n{"name": "Ada"}\n```\nDone.', "```\n[1, 2]\n```",
                   "{name: Ada}", "The answer is {\"a\": 1"]
    assert one(spec, completions) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_json_schema_gives_half_for_valid_json_that_fails_it():
    pytest.importorskip("jsonschema")
    spec = {"name": "json", "schema": {"type": "object", "required": ["name"]}}
    assert one(spec, ['{"name": "Ada"}', '{"age": 3}', "nope"]) == [1.0, 0.5, 0.0]
    assert "reward.functions.0: `schema`" in refused({"name": "json", "schema": {"type": 12}})


def test_json_schema_without_jsonschema_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema raises ImportError
    message = refused({"name": "json", "schema": {"type": "object"}})
    assert "reward.functions.0: `schema`" in message and "pip install jsonschema" in message


# --- names, weights, score and TRL's adapters ------------------------------------------------------------------

def test_names_are_unique_and_score_sums_the_weights():
    rs = build({"name": "regex", "pattern": "^Answer:", "weight": 0.5}, {"name": "regex", "pattern": "42"},
               {"name": "exact_match", "column": "answer", "weight": -1.0})
    assert [r.name for r in rs] == ["regex", "regex_2", "exact_match"]
    assert [r.columns for r in rs] == [(), (), ("answer",)]
    got = rewards.score(rs, ["Answer: 42", "42", "Answer: 7"], answer=["Answer: 42", "x", "y"])
    assert got == {"regex": [1.0, 0.0, 1.0], "regex_2": [1.0, 1.0, 0.0], "exact_match": [1.0, 0.0, 0.0],
                   "reward": [0.5, 1.0, 0.5]}


def test_trl_functions_take_conversational_completions_and_are_named():
    rs = build({"name": "numeric_match", "column": "answer"}, {"name": "regex", "pattern": "x"},
               {"name": "regex", "pattern": "y"})
    funcs = rewards.trl_functions(rs)
    assert [f.__name__ for f in funcs] == ["numeric_match", "regex", "regex_2"]
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "6 * 7?"}]] * 2
    completions = [[{"role": "assistant", "content": "It is 42"}], [{"role": "assistant", "content": "41"}]]
    got = funcs[0](prompts=prompts, completions=completions, completion_ids=[[1], [2]], answer=["42", "42"],
                   question=["a", "b"], trainer_state=object(), log_extra=print, log_metric=print)
    assert got == [1.0, 0.0]
    assert funcs[1](prompts=["p"], completions=["xx"], completion_ids=[[1]]) == [1.0]


# --- the user's own functions ----------------------------------------------------------------------------------

def write(tmp_path, module: str, source: str):
    (tmp_path / f"{module}.py").write_text(source)


def test_user_function_with_options_prompts_and_a_column(tmp_path):
    write(tmp_path, "my_rewards_a", (
        "def brevity(completions, prompts, answer, limit=10, **kwargs):\n"
        "    return [1.0 if len(c) <= limit and a in c else 0.0 for c, a in zip(completions, answer)]\n"
        "def helper():\n    pass\n"))
    [r] = build({"name": "my_rewards_a:brevity", "options": {"limit": 5}, "weight": 2}, search_dirs=[tmp_path])
    assert (r.name, r.weight, r.columns) == ("brevity", 2.0, ("answer",))
    assert rewards.score([r], ["ok 4", "4 but far too long"], ["p", "q"], answer=["4", "4"], other=[1, 2]) == {
        "brevity": [1.0, 0.0], "reward": [2.0, 0.0]}
    rewards.check_columns([r], {"answer", "prompt"}, "the prompts")
    with pytest.raises(ConfigError) as e:
        rewards.check_columns([r], {"prompt", "solution"}, "dataset.path=gsm8k.jsonl")
    message = str(e.value)
    assert "\n" not in message
    assert "reward.functions.0" in message and "answer" in message and "prompt, solution" in message


def test_user_function_taking_completions_by_position(tmp_path):
    write(tmp_path, "my_rewards_b", "def short(texts):\n    return [float(len(t) < 3) for t in texts]\n")
    [r] = build({"name": "my_rewards_b:short"}, search_dirs=[tmp_path])
    assert r.columns == () and r(["ab", "abcd"]) == [1.0, 0.0]
    write(tmp_path, "my_rewards_e", "def counted(**kw):\n    return [len(c) for c in kw['completions']]\n")
    [r] = build({"name": "my_rewards_e:counted"}, search_dirs=[tmp_path])
    assert r(["ab", "abcd"], ["p", "q"], answer=[1, 2]) == [2.0, 4.0]


def test_user_function_bad_returns_name_the_function(tmp_path):
    write(tmp_path, "my_rewards_c", (
        "def wrong_length(completions, **kw):\n    return [1.0]\n"
        "def not_numbers(completions, **kw):\n    return ['high' for _ in completions]\n"
        "def boom(completions, **kw):\n    raise KeyError('answer')\n"))
    for name, words in [("wrong_length", "returned 1 rewards for 2 completions"), ("not_numbers", "'high'"),
                        ("boom", "KeyError")]:
        [r] = build({"name": f"my_rewards_c:{name}"}, search_dirs=[tmp_path])
        with pytest.raises(ConfigError) as e:
            r(["a", "b"])
        assert "\n" not in str(e.value) and "reward.functions.0" in str(e.value) and name in str(e.value)
        assert words in str(e.value)


def test_user_function_declarations_refused(tmp_path):
    write(tmp_path, "my_rewards_d", (
        "LIMIT = 3\n"
        "def scorer(completions, **kw):\n    return [0.0] * len(completions)\n"
        "def positional_only(completions, answer, /):\n    return []\n"
        "def fixed(completions, limit):\n    return []\n"
        "def nothing():\n    return []\n"))
    d = [tmp_path]
    assert "cannot import no_such_module_x" in refused({"name": "no_such_module_x:f"}, search_dirs=d)
    message = refused({"name": "my_rewards_d:missing"}, search_dirs=d)
    assert "reward.functions.0: `name`" in message and "has no missing" in message and "scorer" in message
    assert "not a function" in refused({"name": "my_rewards_d:LIMIT"}, search_dirs=d)
    assert "signature" in refused({"name": "my_rewards_d:nothing"}, search_dirs=d)
    assert "by position" in refused({"name": "my_rewards_d:positional_only"}, search_dirs=d)
    message = refused({"name": "my_rewards_d:fixed", "options": {"limt": 3}}, search_dirs=d)
    assert "`options` limt is not a parameter" in message
    message = refused({"name": "my_rewards_d:scorer", "column": "answer"}, search_dirs=d)
    assert "reward.functions.0: `column`" in message
    assert "trainer passes" in refused({"name": "my_rewards_d:scorer", "options": {"prompts": []}}, search_dirs=d)


# --- bad declarations of the built-ins -------------------------------------------------------------------------

@pytest.mark.parametrize("specs, words", [
    ([{"name": "regex", "pattern": "x"}, {"name": "similarity"}], ["reward.functions.1: `name`", "exact_match",
                                                                  "module:function"]),
    ([{"name": "regex", "pattern": "x"}, {"name": "regex", "pattern": "y", "tolerance": 0.1}],
     ["reward.functions.1: `tolerance` is numeric_match's option, not regex's"]),
    ([{"name": "exact_match"}], ["reward.functions.0: `column` is missing"]),
    ([{"name": "numeric_match", "pattern": "(x)"}], ["reward.functions.0: `column` is missing"]),
    ([{"name": "regex"}], ["reward.functions.0: `pattern` is missing"]),
    ([{"name": "length"}], ["reward.functions.0: `min` and `max`"]),
    ([{"name": "regex", "pattern": "(unclosed"}], ["reward.functions.0: `pattern`", "missing ), unterminated "
                                                                                   "subpattern at position 0"]),
    ([{"name": "exact_match", "column": "a", "pattern": "<answer>"}], ["reward.functions.0: `pattern`", "no group"]),
    ([{"name": "numeric_match", "column": "a", "tolerance": -1}], ["reward.functions.0: `tolerance`"]),
    ([{"name": "length", "min": 10, "max": 5}], ["reward.functions.0: `min` 10 is above `max` 5"]),
    ([{"name": "length", "min": 1.5}], ["reward.functions.0: `min`"]),
    ([{"name": "length", "max": 5, "unit": "lines"}], ["reward.functions.0: `unit`", "words, characters, tokens"]),
    ([{"name": "length", "max": 5, "unit": "tokens"}], ["reward.functions.0: `unit` tokens needs the model's "
                                                        "tokenizer"]),
    ([{"name": "regex", "pattern": "x", "weight": 0}], ["reward.functions.0: `weight` 0 turns it off: remove it"]),
    ([{"name": "regex", "pattern": "x", "weight": float("nan")}], ["reward.functions.0: `weight`"]),
    ([{"name": "json", "options": {"a": 1}}], ["reward.functions.0: `options` is for module:function"]),
    ([{"name": "a:b:c"}], ["reward.functions.0: `name`"]),
])
def test_bad_declarations_are_one_line_naming_the_entry_and_key(specs, words):
    message = refused(*specs)
    for w in words:
        assert w in message


# --- through the recipe schema ---------------------------------------------------------------------------------

GRPO = ["+recipe=tiny-demo", "train.method=grpo", "dataset.format=prompts", "train.effective_batch_size=16"]


def test_composed_recipe_builds():
    cfg = compose(GRPO + ["reward.functions=[{name: regex, pattern: x, weight: 0.5}, {name: numeric_match, "
                          "column: answer, pattern: '<answer>(.*?)</answer>', tolerance: 0.01}]"])
    rs = rewards.build(cfg.reward)
    assert [(r.name, r.weight, r.columns) for r in rs] == [("regex", 0.5, ()), ("numeric_match", 1.0, ("answer",))]
    with pytest.raises(ConfigError, match=r"^reward\.functions\.0: `tolerance`"):
        rewards.build(compose(GRPO + ["reward.functions=[{name: regex, pattern: x, tolerance: 1}]"]).reward)


def test_composed_wrong_type_is_a_one_line_config_error_through_the_cli():
    """compose() lets Hydra's own error through for a value of the wrong type; the CLI's classify() turns it into
    exit 2 and one line (naming only `weight`: OmegaConf's full_key for a list item is relative to it)."""
    from hydra.errors import HydraException

    from finetune.cli import classify

    with pytest.raises(HydraException) as e:
        compose(GRPO + ["reward.functions=[{name: regex, pattern: x, weight: abc}]"])
    code, message = classify(e.value)
    assert code == ConfigError.exit_code and "\n" not in message and "weight" in message
