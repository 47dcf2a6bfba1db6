"""Thumbnails of the images a report shows: small JPEGs in DIR/thumbs/, decoded in threads.

A missing or unreadable image does not stop the report: it is returned with its reason and named in the page.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

THUMB_PX = 128  # longest side; the page shows them at ~112 px (sharp on 1x screens, small files)


def _one(src: str, dst: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(src) as im:
            im.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decode at 1/2..1/8 scale, much faster for big images
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            im.save(dst, "JPEG", quality=85)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"{type(e).__name__}: {e}"
    return None


def make_thumbnails(items: Iterable[tuple[int, str]], out_dir: Path) -> tuple[dict[int, str], dict[int, str]]:
    """Write ``out_dir/<i>.jpg`` for each (sample index, image path).

    Returns (written: index -> path relative to the report, failed: index -> reason).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    items = sorted(dict(items).items())
    workers = min(8, (os.cpu_count() or 1) * 2)  # decode and resize release the GIL in PIL
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda it: _one(it[1], out_dir / f"{it[0]}.jpg"), items))
    written, failed = {}, {}
    for (i, _), why in zip(items, reasons):
        if why is None:
            written[i] = f"{out_dir.name}/{i}.jpg"
        else:
            failed[i] = why
    return written, failed
