"""Text rules every layer shares: what no name posstate stores or reads from a config may hold."""

from __future__ import annotations

import re

#: What no symbol or key may hold (docs/FORMAT.md, the schema's ``text`` pattern uses the same class): C0 and C1
#: controls and DEL, lone surrogates (orjson cannot write them: every later save would fail), and the bidi
#: embeddings, overrides and isolates that make a name display as another one.
BAD_TEXT_CLASS = r"\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069"
BAD_TEXT = re.compile(f"[{BAD_TEXT_CLASS}]")
