"""What ``predict`` reads: unlabelled images from a folder (recursively) or from a list file, in a stable order.

Every problem that would waste a run is raised here, before a model is run: an empty DATA, a list entry that is
not a readable file, two files with the same id. Files that exist but are not whole images (the same cheap
preflight as training's: size, magic bytes, JPEG end marker, parsed header) are returned as ``bad`` with the
reason; they become rows with an empty prediction, never an error, and never shift another row.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from convnext_fast.data.index import IMG_EXTENSIONS, format_paths

ID_FORMATS = ("relpath", "name", "stem")
LIST_SUFFIXES = (".txt", ".csv", ".lst")


@dataclass
class Inputs:
    """The images of one predict run, sorted by id (the output's row order)."""

    root: Path  # DATA folder, or the folder of the list file (ids are relative to it)
    paths: list[str]  # absolute paths, row order
    ids: list[str]
    bad: dict[str, str] = field(default_factory=dict)  # path -> why it cannot be read (preflight)

    def __len__(self) -> int:
        return len(self.paths)


def image_id(path: str, root: Path, id_format: str) -> str:
    """The id of ``path`` in the output: its path relative to DATA (``/``-separated), its file name, or its stem."""
    if id_format == "relpath":
        return Path(os.path.relpath(path, root)).as_posix()
    if id_format == "name":
        return os.path.basename(path)
    if id_format == "stem":
        return Path(path).stem
    raise ValueError(f"--id-format: expected one of {', '.join(ID_FORMATS)}, got {id_format!r}")


def _walk(root: Path) -> list[str]:
    """Every file below ``root`` whose extension is an image's (ImageFolder's list, any case), hidden ones not."""
    found = []
    for dirpath, dirnames, fnames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.abspath(os.path.join(dirpath, f)) for f in fnames
                  if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    return found


def _read_list(list_file: Path) -> list[str]:
    """Paths from a list file: one per line (``.txt``/``.lst``; blank and ``#`` lines ignored), or a ``.csv`` with a
    header (its ``path`` column, else its first). Relative entries are relative to the list file's folder."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"DATA {list_file}: cannot read the list ({e})") from None
    if list_file.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        col = header.index("path") if "path" in header else 0
        entries = [(n + 2, r[col].strip()) for n, r in enumerate(rows[1:]) if len(r) > col and r[col].strip()]
    else:
        entries = [(n + 1, line.strip()) for n, line in enumerate(text.splitlines())
                   if line.strip() and not line.lstrip().startswith("#")]
    paths, unreadable = [], []
    for line_no, entry in entries:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else list_file.parent / path
        if not (path.is_file() and os.access(path, os.R_OK)):
            unreadable.append(f"line {line_no}: {entry}")
        paths.append(os.path.abspath(path))
    if unreadable:
        raise ValueError(f"DATA {list_file}: {len(unreadable)} entr{'y is' if len(unreadable) == 1 else 'ies are'} "
                         f"not a readable file: {'; '.join(unreadable[:5])}"
                         + (f" (and {len(unreadable) - 5} more)" if len(unreadable) > 5 else ""))
    return paths


def preflight(paths: list[str]) -> dict[str, str]:
    """{path: why} for the files that are not whole images (training's cheap checks; no full decode)."""
    from convnext_fast.data.headers import header_check
    from convnext_fast.data.index import _check_all, cheap_check

    return _check_all(lambda p: cheap_check(p) or header_check(p), paths)


def list_inputs(data: str | Path, *, id_format: str = "relpath") -> Inputs:
    """The images of DATA (a folder searched recursively, class sub-folders allowed and ignored; one image; or a list
    file), sorted by id, with the preflight's bad files. One-line ValueErrors before any work."""
    data = Path(data).expanduser()
    if id_format not in ID_FORMATS:
        raise ValueError(f"--id-format: expected one of {', '.join(ID_FORMATS)}, got {id_format!r}")
    if data.is_dir():
        root, paths = data.resolve(), _walk(data)
        if not paths:
            raise ValueError(f"DATA {data}: no image files found ({', '.join(IMG_EXTENSIONS)}, searched recursively)")
    elif data.is_file() and data.name.lower().endswith(IMG_EXTENSIONS):
        root, paths = data.resolve().parent, [os.path.abspath(data)]
    elif data.is_file():
        if data.suffix.lower() not in LIST_SUFFIXES:
            raise ValueError(f"DATA {data}: expected a folder of images, an image or a list of paths "
                             f"({', '.join(LIST_SUFFIXES)})")
        root, paths = data.resolve().parent, _read_list(data)
        if not paths:
            raise ValueError(f"DATA {data}: the list holds no paths")
    else:
        raise ValueError(f"DATA {data}: no such file or directory")
    ids = [image_id(p, root, id_format) for p in paths]
    order = sorted(range(len(ids)), key=lambda i: (ids[i], paths[i]))
    ids, paths = [ids[i] for i in order], [paths[i] for i in order]
    dupes = sorted({ids[i] for i in range(1, len(ids)) if ids[i] == ids[i - 1]})
    if dupes:
        raise ValueError(f"DATA {data}: {len(dupes)} id(s) name more than one file with --id-format {id_format} "
                         f"(e.g. {', '.join(dupes[:3])}); use --id-format relpath, or list each file once")
    return Inputs(root, paths, ids, preflight(paths))


def describe_bad(bad: dict[str, str]) -> str:
    """The bad files, one per line (at most 20)."""
    return format_paths([f"{p}: {why}" for p, why in sorted(bad.items())])
