"""``ondevice models`` shows one spelling for one licence: a known SPDX id in its SPDX spelling whatever case the
GGUF's ``general.license`` has (Hugging Face's lower-case ``apache-2.0`` in a quantized variant's file next to the
catalog's ``Apache-2.0``); unknown names as they are, and the file's own key untouched (models/licences.py)."""

from __future__ import annotations

import json
import shutil

from ondevice.models.gguf_check import validate_gguf
from ondevice.models.licences import licence_display


def test_known_spdx_ids_take_their_spdx_spelling_and_others_stay():
    for raw, shown in (("apache-2.0", "Apache-2.0"), ("APACHE-2.0", "Apache-2.0"), (" mit ", "MIT"),
                       ("bsd-3-clause", "BSD-3-Clause"), ("cc-by-nc-4.0", "CC-BY-NC-4.0"), ("gpl-3.0-or-later",
                       "GPL-3.0-or-later"), ("unlicense", "Unlicense"), ("Apache-2.0", "Apache-2.0")):
        assert licence_display(raw) == shown, raw
    for other in ("llama3", "Gemma Terms of Use", "other", "apache 2.0", "", "mit or apache-2.0"):
        assert licence_display(other) == other
    assert licence_display(None) is None


def test_a_stored_variant_reads_as_the_catalog_entry_does(cli, smol_path, tmp_path):
    stored = tmp_path / "home" / "models" / "smol-variant.gguf"
    stored.parent.mkdir(parents=True)
    shutil.copy(smol_path, stored)
    assert validate_gguf(stored).license == "apache-2.0"  # what the file holds (Hugging Face's spelling)
    r = cli("models", "--json")
    assert r.returncode == 0, r.stderr
    by = {row["name"]: row["licence"] for row in json.loads(r.stdout)}
    assert by["smol-variant"] == by["smollm2-135m-instruct"] == "Apache-2.0", by
    r = cli("models", "smol-variant", str(stored), "--license")
    assert r.returncode == 0 and r.stdout.count("\nApache-2.0\n") == 2 and "apache" not in r.stdout, r.stdout
    r = cli("models", "smol-variant", "-v", env={"COLUMNS": "200"})
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("smol-variant "))
    assert " Apache-2.0 " in row, r.stdout
    assert any(ln.split() == ["general.license", "apache-2.0"] for ln in r.stdout.splitlines())  # the raw key
    assert validate_gguf(stored).license == "apache-2.0"  # the file was not rewritten
