"""`ondevice chat`'s commands as a user of `ollama run` types them: /set parameter for every sampler, Ollama's
display settings, /save and /load of a conversation (real CLI subprocesses, the real embedded model)."""

from __future__ import annotations

import json
import re


def test_set_parameter_takes_every_sampler_and_ollamas_other_words(cli):
    script = ("/set parameter repeat_last_n 32\n/set parameter typical_p 0.9\n/set mirostat 2\n/set mirostat 5\n"
              "/set num_thread 4\n/set nowordwrap\n/set think\n/set nothink\n/show parameters\n")
    r = cli("chat", "-n", "1", "-t", "2", input=script)
    err = r.stderr
    assert r.returncode == 0 and r.stdout == "", err
    assert "repeat_last_n = 32" in err and "typical_p = 0.9" in err and "mirostat = 2" in err, err
    assert "/set mirostat: --mirostat / mirostat=5 must be 0 (off), 1 or 2" in err, err
    assert "num_thread is set when the model loads: start chat again with -t/--threads N" in err, err
    assert "/set nowordwrap: Ollama's display setting" in err, err
    # `ollama run`'s /set think turns thinking on, not a display setting: as the server's think=true, no such mode
    assert "/set think: this model has no thinking mode;" in err and "think: Ollama's display" not in err, err
    assert "/set nothink: this model has no thinking mode, so it is off (accepted)" in err, err
    assert "repeat_last_n 32, typical_p 0.9, mirostat 2" in err, err  # /show parameters names the changed ones


def test_save_and_load_a_conversation(cli, tmp_path):
    path = tmp_path / "talk.json"
    fast = ("-n", "4", "-t", "2")
    r = cli("chat", *fast, input=f"/set system Be terse.\n/set temperature 0\n/set stop END\nMy name is Zed.\n"
                                 f"/save {path}\n")
    assert r.returncode == 0 and f"(conversation saved to {path}; /load {path} resumes it)" in r.stderr, r.stderr
    saved = json.loads(path.read_text())
    assert saved["system"] == "Be terse." and saved["parameters"]["temp"] == 0, saved
    assert saved["parameters"]["stop"] == ["END"], saved
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"], saved
    assert saved["messages"][0]["content"] == "My name is Zed."
    r = cli("chat", *fast, "--timings", input=f"/load {path}\n/show\nWhat is my name?\n/load {tmp_path}/none.json\n")
    err = r.stderr
    assert r.returncode == 0 and f"(conversation of 2 messages resumed from {path}" in err, err
    assert "temp 0.0" in err and "stop ['END']" in err and "system: Be terse." in err, err
    fresh = cli("chat", *fast, "--timings", "-s", "Be terse.", input="What is my name?\n")
    n_prompt = [int(re.search(r"prompt (\d+) tok", x.stderr).group(1)) for x in (r, fresh)]
    assert n_prompt[0] > n_prompt[1], n_prompt  # the saved turns come before the new message
    assert "/none.json: No such file or directory; give a file /save wrote" in err, err
