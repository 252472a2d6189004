"""Hub names offline: one clear error at once, the local cache used when it has the files."""

import pytest

from sstoken_pl import hub
from sstoken_pl.errors import ConfigError
from tests.test_cli import cli


def test_offline_kwargs(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(hub, "is_cached", lambda name, kind="model": name == "org/cached")
    assert hub.offline_kwargs(str(tmp_path), "model.model_name_or_path") == {}  # a local folder: untouched
    assert hub.offline_kwargs("org/cached", "model.model_name_or_path") == {"local_files_only": True}
    with pytest.raises(ConfigError, match="model.model_name_or_path: 'org/missing' is not a local path, and the "
                                          "Hugging Face hub cannot be reached"):
        hub.offline_kwargs("org/missing", "model.model_name_or_path")
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert hub.offline_kwargs("org/missing", "x") == {}  # online: the hub decides


def test_hf_hub_offline_is_honoured(monkeypatch):
    hub.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert hub.hub_reachable() is False
    finally:
        hub.hub_reachable.cache_clear()


@pytest.mark.parametrize("args, what", [
    (["--model.model_config", "null", "--model.model_name_or_path", "someorg/not-cached-model"], "model.model_name_or_path"),
    (["--data.path", "someorg/not-cached-dataset"], "data.path"),
])
def test_a_hub_name_offline_is_one_line_at_once(tmp_path, args, what):
    out = cli("fit", "--config", "configs/tiny.yaml", *args, f"--trainer.default_root_dir={tmp_path}")
    assert out.returncode != 0
    assert f"error: {what}: 'someorg/not-cached-" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
