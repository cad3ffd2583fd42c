"""A licence as ``ondevice models`` shows it: a known SPDX id in its canonical spelling, whatever its case.

A GGUF's ``general.license`` carries what its converter copied from the model card (Hugging Face writes ids in
lower case: ``apache-2.0``), the catalog the SPDX spelling (``Apache-2.0``): one model and its quantized variants
read the same. Only the display changes; files keep what they hold (``ondevice models -v`` shows the raw key).
"""

from __future__ import annotations

_SPDX = ("0BSD", "AFL-3.0", "AGPL-3.0", "AGPL-3.0-only", "AGPL-3.0-or-later", "Apache-2.0", "Artistic-2.0",
         "BSD-2-Clause", "BSD-3-Clause", "BSD-3-Clause-Clear", "BSL-1.0", "CC-BY-3.0", "CC-BY-4.0", "CC-BY-NC-4.0",
         "CC-BY-NC-ND-4.0", "CC-BY-NC-SA-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC0-1.0", "ECL-2.0", "EPL-2.0",
         "EUPL-1.2", "GPL-2.0", "GPL-2.0-only", "GPL-2.0-or-later", "GPL-3.0", "GPL-3.0-only", "GPL-3.0-or-later",
         "ISC", "LGPL-2.1", "LGPL-2.1-only", "LGPL-2.1-or-later", "LGPL-3.0", "LGPL-3.0-only",
         "LGPL-3.0-or-later", "MIT", "MIT-0", "MPL-2.0", "OSL-3.0", "PostgreSQL", "Unlicense", "UPL-1.0", "WTFPL",
         "Zlib")
_CANONICAL = {s.lower(): s for s in _SPDX}


def licence_display(text: str | None) -> str | None:
    """``text`` with a known SPDX id (matched case-insensitively, spaces around it ignored) in its SPDX spelling;
    anything else (a licence's own name, "llama3", "Gemma Terms of Use", None) as it is."""
    if not isinstance(text, str):
        return text
    return _CANONICAL.get(text.strip().lower(), text)
