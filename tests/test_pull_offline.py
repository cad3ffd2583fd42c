"""HF_HUB_OFFLINE=1 (or another true spelling, as huggingface_hub reads it) means no network: `pull` and pull-on-use
of an address not in the store are a clear error with no request made; an address pulled before still resolves.
The Hub is a real HTTP server on 127.0.0.1 (test_pull_repo's); the real CLI."""

from __future__ import annotations

import pytest
from test_pull_repo import BARTOWSKI, _repo, ggufs, hub  # noqa: F401 (fixtures)

from ondevice.errors import ModelNotFound
from ondevice.models import models_dir, resolve, sources


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes"])
def test_offline_means_no_download_and_the_store_still_answers(hub, ggufs, cli, monkeypatch, value):  # noqa: F811
    _repo(hub, ggufs, "bartowski/Tiny-GGUF", BARTOWSKI)
    off = {"HF_HUB_OFFLINE": value}
    r = cli("pull", "hf.co/bartowski/Tiny-GGUF:Q8_0", env=off)
    assert r.returncode != 0 and hub.log == [], r.stderr
    assert (f"hf.co/bartowski/Tiny-GGUF:Q8_0 is not in the store, and HF_HUB_OFFLINE={value} forbids downloading "
            f"it; pull it where the network is allowed (unset HF_HUB_OFFLINE)") in r.stderr
    assert "Traceback" not in r.stderr and not list(models_dir().glob("*.gguf*"))
    monkeypatch.setattr(sources, "PULL_ON_USE", True)  # as the command line sets it (run/serve/load of an address)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(ModelNotFound, match="is not in the store, and HF_HUB_OFFLINE"):
        resolve("hf://bartowski/Tiny-GGUF/Tiny-Q4_K_M.gguf")
    assert hub.log == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert cli("pull", "hf.co/bartowski/Tiny-GGUF:Q8_0", "-q").returncode == 0
    n = len(hub.log)
    again = cli("pull", "hf.co/bartowski/Tiny-GGUF:Q8_0", env=off)  # pulled before: found with no network
    assert again.returncode == 0 and "Tiny-Q8_0: " in again.stdout, again.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert resolve("hf.co/bartowski/Tiny-GGUF:Q8_0").path == models_dir() / "Tiny-Q8_0.gguf"
    forced = cli("pull", "hf.co/bartowski/Tiny-GGUF:Q8_0", "--force", env=off)
    assert forced.returncode != 0 and "forbids downloading it again (--force)" in forced.stderr, forced.stderr
    assert len(hub.log) == n
    assert cli("pull", "hf.co/bartowski/Tiny-GGUF:Q2_K", "-q", env={"HF_HUB_OFFLINE": "0"}).returncode == 0
