"""The Hugging Face token as huggingface_hub finds it (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, the file a
`huggingface-cli login` saved), never shown; and a Hub file's address spelled hf.co / huggingface.co /
www.huggingface.co fetched as hf:// is: from HF_ENDPOINT (a mirror) with the token. The Hub is a real HTTP server on
127.0.0.1 (test_pull_repo's) whose gated repository answers 401 without the right token; the real CLI."""

from __future__ import annotations

import pytest
from test_pull_repo import ggufs, hub  # noqa: F401 (fixtures)

from ondevice.models import models_dir, pull

TOKEN = "hf_secretTOKENvalue123"


@pytest.fixture()
def gated(hub, ggufs):  # noqa: F811
    hub.repos["org/Gated-GGUF"] = {"g-Q4_K_M.gguf": ggufs(3)}
    hub.tokens["org/Gated-GGUF"] = TOKEN
    return hub


def _auths(h) -> set:
    return {e["auth"] for e in h.log}


def test_a_login_token_or_the_legacy_variable_opens_a_gated_repository(gated, cli, tmp_path):
    none = cli("pull", "hf.co/org/Gated-GGUF", "--retries", "0")
    assert none.returncode != 0 and "run `huggingface-cli login`" in none.stderr, none.stderr
    login = tmp_path / "hf-home" / "token"  # what `huggingface-cli login` writes to $HF_HOME/token
    login.parent.mkdir(parents=True, exist_ok=True)
    login.write_text(TOKEN + "\n")
    ran = cli("pull", "hf.co/org/Gated-GGUF", "--name", "g1")
    assert ran.returncode == 0, ran.stderr
    assert TOKEN not in ran.stdout + ran.stderr and f"Bearer {TOKEN}" in _auths(gated)
    login.unlink()
    other = tmp_path / "elsewhere.token"
    other.write_text(TOKEN)
    for env in ({"HUGGING_FACE_HUB_TOKEN": TOKEN}, {"HF_TOKEN_PATH": str(other)}):
        ran = cli("pull", "hf://org/Gated-GGUF/g-Q4_K_M.gguf", "--name", "g2", "--force", "-q", env=env)
        assert ran.returncode == 0, (env, ran.stderr)
        assert TOKEN not in ran.stdout + ran.stderr
    wrong = cli("pull", "hf://org/Gated-GGUF/g-Q4_K_M.gguf", "--name", "g3", "--retries", "0",
                env={"HF_TOKEN": "hf_wrong"})  # HF_TOKEN first, as huggingface_hub reads it: said refused, not shown
    assert wrong.returncode != 0 and "token sent was refused" in wrong.stderr and "hf_wrong" not in wrong.stderr


@pytest.mark.parametrize("spelling", ["hf.co/org/Gated-GGUF/resolve/main/g-Q4_K_M.gguf",
                                      "https://hf.co/org/Gated-GGUF/g-Q4_K_M.gguf",
                                      "https://www.huggingface.co/org/Gated-GGUF/resolve/main/g-Q4_K_M.gguf",
                                      "huggingface.co/org/Gated-GGUF/blob/main/g-Q4_K_M.gguf?download=true"])
def test_every_spelling_of_a_hub_file_goes_to_the_mirror_with_the_token(gated, monkeypatch, spelling):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = pull(spelling, progress=False, retries=0)
    assert path == models_dir() / "g-Q4_K_M.gguf" and path.read_bytes() == gated.repos["org/Gated-GGUF"][
        "g-Q4_K_M.gguf"]
    fetched = [e for e in gated.log if e["path"] == "/org/Gated-GGUF/resolve/main/g-Q4_K_M.gguf"]
    assert fetched and fetched[0]["auth"] == f"Bearer {TOKEN}"
