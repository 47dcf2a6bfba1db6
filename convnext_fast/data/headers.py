"""Header checks for the preflight: every image's header is parsed, no pixel is decoded.

`header_check(path)` opens the file with PIL (which reads the header only) or, for a JPEG, walks its marker
segments up to the start of scan and checks the tables that PIL skips but every decoder needs: Huffman tables (DHT), quantization tables (DQT), the frame (SOF) and
the scan header (SOS). These are the files that used to pass the preflight and stop a run at its first batch
("Truncated File Read" from a segment length that points past the end; "Bogus Huffman table definition" from
garbled tables). A check that needs the entropy-coded data (a bit error in the scan) stays with the full decode
(`--verify-images`).
"""

from __future__ import annotations

import struct

# Markers without a length field (TEM, RSTn, SOI, EOI); any other marker in the header has one.
_STANDALONE = {0x01, *range(0xD0, 0xD9)}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HEADER_READ = 1 << 14  # a JPEG's tables sit in its first few KiB; past them (large EXIF/ICC), seek


def header_check(path: str) -> str | None:
    """None if the header of `path` parses, else why not (one phrase). Reads the header only.

    JPEG (the common case, and the format whose headers a decoder trusts most) is checked by its marker segments
    alone: that covers what PIL's header parse checks (frame size, segment lengths) and the tables it skips, in
    one read. Other formats go through PIL's `Image.open`, which reads their header without decoding pixels."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            if f.read(3) == b"\xff\xd8\xff":
                return jpeg_segments_check(f)
        with Image.open(path) as im:
            if im.width < 1 or im.height < 1:
                return "image has zero size"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"unreadable header ({type(e).__name__}: {e})"
    return None


def jpeg_segments_check(f) -> str | None:
    """Walk a JPEG's marker segments from SOI to SOS in the open binary file `f`; None if they are consistent."""
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    window = f.read(_HEADER_READ)  # one read holds the tables of nearly every JPEG; beyond it, seek

    def at(offset: int, n: int) -> bytes:
        if offset + n <= len(window):
            return window[offset:offset + n]
        f.seek(offset)
        return f.read(n)

    if window[:2] != b"\xff\xd8":
        return "not a JPEG (no start-of-image marker)"
    pos, frame, huffman = 2, None, set()
    while True:
        head = at(pos, 4)
        if len(head) < 2 or head[0] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {pos})"
        marker = head[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == 0xD9:
            return "corrupt JPEG header (end of image before any scan)"
        if len(head) < 4:
            return "corrupt JPEG header (segment cut short)"
        (length,) = struct.unpack(">H", head[2:4])
        if length < 2 or pos + 2 + length > size:
            return f"corrupt JPEG header (segment FF{marker:02X} at byte {pos} has length {length}, file has {size})"
        why = None
        if marker == 0xC4:
            why, tables = _dht(at(pos + 4, length - 2))
            huffman |= tables
        elif marker == 0xDB:
            why = _dqt(at(pos + 4, length - 2))
        elif marker in _SOF:
            why, frame = _sof(at(pos + 4, length - 2))
        elif marker == 0xDA:
            return _sos(at(pos + 4, length - 2), frame, huffman)
        if why:
            return f"corrupt JPEG header ({why})"
        pos += 2 + length


def _dht(body: bytes) -> tuple[str | None, set]:
    tables, i = set(), 0
    while i < len(body):
        if i + 17 > len(body):
            return "Huffman table cut short", tables
        tc, th = body[i] >> 4, body[i] & 15
        counts = body[i + 1:i + 17]
        n = sum(counts)
        if tc > 1 or th > 3 or n == 0 or n > 256 or i + 17 + n > len(body):
            return "bogus Huffman table definition", tables
        code = 0  # canonical Huffman: the codes of each length must fit in that many bits (libjpeg's check)
        for bits, count in enumerate(counts, 1):
            code += count
            if code >= 1 << bits:
                return "bogus Huffman table (too many codes)", tables
            code <<= 1
        tables.add((tc, th))
        i += 17 + n
    return None, tables


def _dqt(body: bytes) -> str | None:
    i = 0
    while i < len(body):
        pq, tq = body[i] >> 4, body[i] & 15
        if pq > 1 or tq > 3 or i + 1 + 64 * (pq + 1) > len(body):
            return "bogus quantization table"
        i += 1 + 64 * (pq + 1)
    return None if body else "empty quantization table segment"


def _sof(body: bytes) -> tuple[str | None, dict | None]:
    if len(body) < 6:
        return "frame header cut short", None
    precision, h, w, nc = body[0], *struct.unpack(">HH", body[1:5]), body[5]
    if precision not in (8, 12, 16) or w == 0 or h == 0 or nc not in (1, 3, 4) or len(body) != 6 + 3 * nc:
        return f"bogus frame header ({w}x{h}, {nc} components, {precision}-bit)", None
    return None, {body[6 + 3 * k] for k in range(nc)}


def _sos(body: bytes, frame: set | None, huffman: set) -> str | None:
    if frame is None:
        return "corrupt JPEG header (scan before any frame header)"
    ns = body[0] if body else 0
    if not 1 <= ns <= 4 or len(body) != 4 + 2 * ns:
        return "corrupt JPEG header (bogus scan header)"
    for k in range(ns):
        cid, tables = body[1 + 2 * k], body[2 + 2 * k]
        if cid not in frame:
            return f"corrupt JPEG header (scan names component {cid}, not in the frame)"
        # Tables the scan needs must be defined, unless none is (then decoders use the standard tables: MJPEG).
        if huffman and ((0, tables >> 4) not in huffman and (1, tables & 15) not in huffman):
            return "corrupt JPEG header (scan uses an undefined Huffman table)"
    return None
