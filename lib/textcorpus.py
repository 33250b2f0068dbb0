"""Text input for build_cache.py: a text file, JSON lines, or the corpus Python itself ships; cleaned and counted.

Sources (`CorpusConfig.source`):
- `pydoc_topics`: the help texts of the Python language reference that every CPython installation ships
  (`pydoc_data.topics`: 79 topics, ~465 KB of English prose and grammar in Python 3.11), split into paragraphs at
  blank lines, whitespace collapsed, paragraphs longer than `max_words` cut into consecutive pieces of at most
  `max_words` words. Real text, offline; its content changes a little between Python versions.
- a path: `.jsonl` / `.ndjson` (or `format: jsonl`) is one JSON object per line with the text under `text_field`;
  anything else is plain text, one sample per line (`\\n` or `\\r\\n`).

Bad-input policy (each case counted and reported, never an exception):
- invalid UTF-8: `invalid_utf8: replace` decodes the bad bytes as U+FFFD; `skip` drops the line. Lone
  surrogates (from JSON escapes) become U+FFFD under either policy.
- control characters: tab, line/paragraph separators, form feed and the other whitespace controls become
  spaces; every other C0/C1 control and DEL is removed.
- empty lines (nothing left after the cleanup): skipped.
- long texts: cut to `max_chars` characters (the renderer then draws what fits the page and counts the rest as
  overflow). A text line longer than 1 MiB is read only up to that point.
- JSON lines that do not parse, are not objects or have no string under `text_field`: skipped.
A sample's id is its 0-based line number in the input (skipped lines keep their numbers), or its piece number in
`pydoc_topics`.
"""
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lib.config import ConfigError

SOURCES = ("pydoc_topics",)
FORMATS = ("auto", "text", "jsonl")
TEXT_LINE_LIMIT = 1 << 20           # bytes read of one text line; the rest of such a line is skipped
JSON_LINE_LIMIT = 64 << 20          # bytes of one JSON line; longer ones are skipped as bad JSON

_WHITESPACE_CONTROLS = "\t\n\v\f\r\x1c\x1d\x1e\x1f\x85\u2028\u2029"
_CONTROLS = {c: None for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROLS.update({ord(c): " " for c in _WHITESPACE_CONTROLS})
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass
class CorpusConfig:
    source: str = "pydoc_topics"    # pydoc_topics (built in, see lib/textcorpus.py) | path to a .txt or .jsonl file
    format: str = "auto"            # auto (.jsonl/.ndjson: JSON lines, else text) | text | jsonl
    text_field: str = "text"        # JSON lines: the key holding the text
    max_words: int = 40             # pydoc_topics: paragraphs are cut into pieces of at most this many words
    limit: int = 0                  # keep only the first `limit` samples (0 = all)
    max_chars: int = 2000           # longer texts are truncated to this many characters (counted)
    invalid_utf8: str = "replace"   # replace (U+FFFD) | skip (drop the line); counted either way

    def validate(self):
        if self.format not in FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}, got '{self.format}'")
        if self.invalid_utf8 not in ("replace", "skip"):
            raise ConfigError(f"data.invalid_utf8 must be replace or skip, got '{self.invalid_utf8}'")
        if self.max_chars < 1 or self.max_words < 1 or self.limit < 0:
            raise ConfigError("data.max_chars and data.max_words must be >= 1 and data.limit >= 0")


@dataclass
class Corpus:
    texts: list                     # cleaned texts, in input order
    ids: list                       # sample id of each text (input line number / piece number)
    counts: dict                    # bad-input counts, see COUNT_KEYS
    source: dict                    # what was read: kind, path, bytes, sha256 of the input


COUNT_KEYS = ("lines", "samples", "empty_skipped", "invalid_utf8_replaced", "invalid_utf8_skipped",
              "control_chars_cleaned", "truncated", "bad_json_skipped")


def clean(text: str, max_chars: int, counts: dict, cut: bool = False):
    """The text as rendered (controls handled, whitespace collapsed, cut to max_chars) or None if empty.

    `cut`: the input line was already cut at the line-length limit (counted as truncated).
    """
    if _SURROGATE_RE.search(text):
        text = _SURROGATE_RE.sub("\ufffd", text)
        counts["invalid_utf8_replaced"] += 1
    if _CONTROL_RE.search(text):
        text = text.translate(_CONTROLS)
        counts["control_chars_cleaned"] += 1
    if len(text) > max_chars or cut:
        text = text[:max_chars]
        counts["truncated"] += 1
    text = " ".join(text.split())
    if not text:
        counts["empty_skipped"] += 1
        return None
    return text


def _pydoc_pieces(max_words):
    from pydoc_data.topics import topics
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            words = paragraph.split()
            for start in range(0, len(words), max_words):
                yield " ".join(words[start:start + max_words])


def _lines(f, limit):
    """Raw lines (without the line break) of a binary file, each read up to `limit` bytes; (bytes, cut)."""
    while True:
        line = f.readline(limit)
        if not line:
            return
        cut = not line.endswith(b"\n") and len(line) == limit
        if cut:  # skip the rest of this line
            while True:
                rest = f.readline(limit)
                if not rest or rest.endswith(b"\n"):
                    break
            end = len(line)
            while end > 0 and (line[end - 1] & 0xC0) == 0x80:  # do not split a UTF-8 sequence
                end -= 1
            if end > 0 and line[end - 1] >= 0xC0:
                end -= 1
            line = line[:end]
        yield line.rstrip(b"\r\n"), cut


def read_corpus(cfg: CorpusConfig) -> Corpus:
    """Read and clean the configured input; raises FileNotFoundError for a missing file."""
    cfg.validate()
    counts = dict.fromkeys(COUNT_KEYS, 0)
    texts, ids = [], []

    def keep(text, sample_id, cut=False):
        text = clean(text, cfg.max_chars, counts, cut)
        if text is not None:
            texts.append(text)
            ids.append(sample_id)
        return bool(cfg.limit) and len(texts) >= cfg.limit

    if cfg.source in SOURCES:
        for piece_id, piece in enumerate(_pydoc_pieces(cfg.max_words)):
            counts["lines"] += 1
            if keep(piece, piece_id):
                break
        source = {"kind": "pydoc_topics", "python": sys.version.split()[0]}
    else:
        path = Path(cfg.source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.source: input file {path} not found; give a text file (one sample per "
                                    f"line), a .jsonl file, or data.source=pydoc_topics for the built-in corpus")
        jsonl = cfg.format == "jsonl" or (cfg.format == "auto" and path.suffix.lower() in (".jsonl", ".ndjson"))
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for line_id, (raw, cut) in enumerate(_lines(f, JSON_LINE_LIMIT if jsonl else TEXT_LINE_LIMIT)):
                counts["lines"] += 1
                digest.update(raw + b"\n")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    if cfg.invalid_utf8 == "skip":
                        counts["invalid_utf8_skipped"] += 1
                        continue
                    text = raw.decode("utf-8", errors="replace")
                    counts["invalid_utf8_replaced"] += 1
                if jsonl:
                    text = _json_text(text, cut, cfg.text_field)
                    if text is None:
                        counts["bad_json_skipped"] += 1
                        continue
                if keep(text, line_id, cut and not jsonl):
                    break
        source = {"kind": "jsonl" if jsonl else "text", "path": str(path.resolve()),
                  "bytes": path.stat().st_size, "sha256_of_lines_read": digest.hexdigest()}
    counts["samples"] = len(texts)
    return Corpus(texts, ids, counts, source)


def _json_text(line, cut, field):
    if cut or not line.strip():
        return None if cut else ""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        return None
    return record[field]
