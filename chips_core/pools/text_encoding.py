"""Text encodings of manifests and caption files: `--encoding auto` detection and decoding.

Captions are stored as Python text (UTF-8 in DuckDB) whatever the source's encoding, so a pair_id (which
hashes the caption's UTF-8 bytes) depends on the caption's text, never on how the source file encoded it.

`auto` decides ONE encoding per source, from the manifest file or from a sample of its caption files (folder
sidecars, WebDataset txt members; a single short caption is too little to guess from):
- valid UTF-8 (a BOM is skipped) -> utf-8;
- mostly UTF-8: valid multi-byte UTF-8 sequences and fewer invalid bytes than those -> utf-8; the rows with
  invalid bytes are rejected as `undecodable_caption` (a UTF-8 file with a few broken rows);
- otherwise charset-normalizer's best guess over the non-ASCII lines / captions, ties between equally
  plausible code pages broken toward Windows-1252 / Latin-1 (spreadsheet exports); no plausible encoding
  -> utf-8 (every undecodable row is then rejected, nothing is guessed).
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from chips_core.errors import ChipsError

AUTO = "auto"
_SCAN_LIMIT = 512 * 2**20  # bytes of a file scanned for UTF-8 validity (the rest is assumed alike)
_SAMPLE_LIMIT = 256 * 2**10  # bytes of non-ASCII lines handed to charset-normalizer
_PREFERRED = ("cp1252", "latin_1", "iso8859_15")  # tie-breakers among equally plausible code pages
# UTF-32 first: its little-endian BOM starts with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_BAD = re.compile("[\udc80-\udcff]")
_NON_ASCII = re.compile("[^\x00-\x7f\udc80-\udcff]")


class EncodingError(ChipsError, ValueError):
    """An unknown encoding name; the message names it."""


@dataclass(frozen=True)
class Detected:
    """The encoding used for a source and how it was chosen ('given', 'detected', 'mostly utf-8', ...)."""

    encoding: str
    how: str

    def describe(self) -> str:
        return f"{self.encoding} ({self.how})"


def canonical(name: str) -> str:
    """Python's canonical codec name ('latin-1' -> 'iso8859-1'), or 'auto'; EncodingError when unknown."""
    if name.strip().lower() == AUTO:
        return AUTO
    try:
        return codecs.lookup(name.strip()).name
    except LookupError:
        raise EncodingError(
            f"--encoding {name!r}: unknown encoding (e.g. auto, utf-8, cp1252, latin-1)"
        ) from None


def _utf8_counts(data: bytes, final: bool, dec: codecs.IncrementalDecoder) -> tuple[int, int]:
    if data.isascii():
        return 0, 0
    text = dec.decode(data, final)
    return len(_BAD.findall(text)), len(_NON_ASCII.findall(text))


def detect_captions(captions: Iterable[bytes], limit: int = 5000) -> Detected:
    """One encoding for a source's caption files, from (at most `limit` of) their raw bytes."""
    bad = good = size = 0
    sample: list[bytes] = []
    for data, _ in zip(captions, range(limit), strict=False):
        dec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        b, g = _utf8_counts(data, True, dec)
        bad, good = bad + b, good + g
        if b and size < _SAMPLE_LIMIT:
            sample.append(data.strip())
            size += len(data) + 1
    return _decide(bad, good, b"\n".join(sample))


def detect_file(path: str | os.PathLike, chunk: int = 2**20) -> Detected:
    """The encoding of a manifest file (its first 512 MB are scanned; a non-regular file is taken as
    UTF-8)."""
    if not os.path.isfile(path):
        return Detected("utf-8", "not a regular file, assumed")
    with open(path, "rb") as f:
        head = f.read(4)
    for bom, name in _BOMS:
        if head.startswith(bom):
            return Detected(name, "byte order mark")
    dec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    bad = good = seen = 0
    sample: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        carry = b""
        while seen < _SCAN_LIMIT:
            data = f.read(chunk)
            seen += len(data)
            final = not data
            b, g = _utf8_counts(data, final, dec)
            bad, good = bad + b, good + g
            if b and size < _SAMPLE_LIMIT:  # keep whole lines holding non-ASCII bytes for the detector
                lines = (carry + data).split(b"\n")
                carry = lines.pop() if not final else b""
                for line in lines:
                    if not line.isascii() and size < _SAMPLE_LIMIT:
                        sample.append(line)
                        size += len(line) + 1
            else:
                carry = (carry + data).rsplit(b"\n", 1)[-1] if data else b""
            if final:
                break
    return _decide(bad, good, b"\n".join(sample))


def _decide(bad: int, good: int, sample: bytes) -> Detected:
    if not bad:
        return Detected("utf-8", "detected")
    if good > bad:
        return Detected("utf-8", "mostly utf-8")
    from charset_normalizer import from_bytes

    results = list(from_bytes(sample))
    if not results:
        return Detected("utf-8", "no plausible encoding, assumed")
    best = min(r.chaos for r in results)
    ties = [r for r in results if r.chaos <= best + 0.01]
    for preferred in _PREFERRED:
        if any(preferred in r.could_be_from_charset for r in ties):
            return Detected(codecs.lookup(preferred).name, "detected")
    return Detected(codecs.lookup(ties[0].encoding).name, "detected")


def decode_caption(data: bytes, encoding: str = "utf-8") -> tuple[str | None, tuple[str, str] | None, str]:
    """Decode a caption file or member: (text stripped, None, encoding used) or (None, (reason, message),
    encoding tried). A UTF-8 BOM is skipped; 'auto' (not resolved by the caller) reads UTF-8."""
    enc = "utf-8" if encoding == AUTO else encoding
    enc_used = "utf-8-sig" if enc == "utf-8" else enc
    try:
        text = data.decode(enc_used)
    except UnicodeDecodeError as exc:
        return (
            None,
            (
                "undecodable_caption",
                f"caption bytes are not valid {enc} ({exc.reason} at byte {exc.start})",
            ),
            enc,
        )
    return text.strip(), None, enc
