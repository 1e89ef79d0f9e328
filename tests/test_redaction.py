"""Credentials are masked by value (finetune/redaction.py): in URIs, query parameters and environment secrets."""

from __future__ import annotations

import pytest

from finetune.redaction import mask


@pytest.mark.parametrize("text, expected", [
    ("http://user:hunter2pw@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
    ("https://host/x?token=abc123&page=2", "https://host/x?token=***&page=2"),
    ("https://host/x?a=1&access_token=abc123#top", "https://host/x?a=1&access_token=***#top"),
    ("calling with api_key=sk-abc123 now", "calling with api_key=*** now"),
    ("tracking.uri=http://u:pw@h:1/?sig=zz", "tracking.uri=http://u:***@h:1/?sig=***"),
    # Left alone: no credential in them.
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("eval.max_new_tokens=128 adapter.rank=8", "eval.max_new_tokens=128 adapter.rank=8"),
    ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
])
def test_credentials_in_uris_and_parameters_are_masked(text, expected):
    assert mask(text) == expected
    assert mask(expected) == expected  # idempotent


def test_values_of_secret_environment_variables_are_masked(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("MY_SERVICE_API_KEY", "key-0123456789")
    monkeypatch.setenv("DB_PASSWORD_FILE_CONTENT", "correct-horse-battery")
    monkeypatch.setenv("SOME_SECRET", "true")  # too short to be a credential: "true" stays readable
    text = "hf_abcdefghijklmnop / key-0123456789 / correct-horse-battery / true"
    assert mask(text) == "*** / *** / *** / true"


def test_the_run_writes_and_logs_masked_values_but_keeps_the_real_ones(monkeypatch):
    from finetune.config import compose, to_plain_dict
    from finetune.tracking import redact

    monkeypatch.setenv("TEAM_TOKEN", "tok-9876543210")
    cfg = compose(["+recipe=tiny-demo", "tracking.uri=http://bob:pa55word@127.0.0.1:5000",
                   "tracking.experiment=tok-9876543210"])
    assert cfg.tracking.uri == "http://bob:pa55word@127.0.0.1:5000"  # what the run connects with
    written = to_plain_dict(cfg)  # what config.yaml holds
    assert written["tracking"] == {**written["tracking"], "uri": "http://bob:***@127.0.0.1:5000",
                                   "experiment": "***"}
    assert written["adapter"]["rank"] == 16
    assert redact({"tracking.uri": cfg.tracking.uri, "tracking.experiment": "tok-9876543210", "adapter.rank": 16}) \
        == {"tracking.uri": "http://bob:***@127.0.0.1:5000", "tracking.experiment": "***", "adapter.rank": 16}


def test_hydras_escaped_overrides_are_masked():
    """Hydra prints a multirun's overrides with escaped colons: `tracking.uri=http\\://bob\\:PW@host\\:5000`."""
    assert mask(r"tracking.uri=http\://bob\:Pw4TestOnly@127.0.0.1\:5000") == r"tracking.uri=http\://bob\:***@127.0.0.1\:5000"
