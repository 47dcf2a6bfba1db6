"""Prediction files: the format follows the output's extension (.csv, .jsonl, .parquet, .npz), or a filled-in
sample submission.

Columns: ``id``, ``label`` (the top class), ``prob`` (its probability), with ``--topk K`` also ``label_2, prob_2
... label_K, prob_K`` (one value per cell: no arrays in CSV cells), with ``--probs`` one column per class (its
name), and ``error`` (why a file has no prediction; empty otherwise). ``.npz`` is eval's ``predictions.npz``
layout (:mod:`convnext_fast.predictions`) with labels -1 (unknown) and one logits slice: the mean over views
(an ensemble's: the log of its mean probabilities).
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from convnext_fast.inference.inputs import ID_FORMATS, image_id
from convnext_fast.inference.run import PredictResult
from convnext_fast.run_files import atomic_write_text

FORMATS = (".csv", ".jsonl", ".parquet", ".npz")


def check_output(out: str | Path, *, sample_submission: str | Path | None = None) -> Path:
    """Refuse, before any work, an output whose format is unknown, whose folder does not exist, or that needs
    pyarrow when it is missing; and a template that is not a readable CSV."""
    out = Path(out).expanduser()
    if sample_submission is not None:
        if out.suffix.lower() != ".csv":
            raise ValueError(f"-o {out}: --sample-submission writes a .csv")
        read_template(sample_submission)
    elif out.suffix.lower() not in FORMATS:
        raise ValueError(f"-o {out}: unknown format {out.suffix!r}; expected one of {', '.join(FORMATS)}")
    if not out.parent.is_dir():
        raise ValueError(f"-o {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"-o {out}: is a directory")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"-o {out}: folder {out.parent} is not writable")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError(f"-o {out}: .parquet needs pyarrow (pip install pyarrow); or write .csv/.jsonl/.npz")
    return out


def table(result: PredictResult, *, topk: int = 1, probs: bool = False,
          skip_bad: bool = False) -> tuple[list[str], list[list]]:
    """(column names, rows) in ``result``'s row order; bad files get empty cells and their reason in ``error``."""
    classes, n_cls = result.classes, len(result.classes)
    if not 1 <= topk <= n_cls:
        raise ValueError(f"--topk {topk}: the model has {n_cls} classes")
    columns = ["id", "label", "prob"] + [f"{name}_{k}" for k in range(2, topk + 1) for name in ("label", "prob")]
    if probs:
        clash = sorted(set(columns + ["error"]) & set(classes))
        if clash:
            raise ValueError(f"--probs: class name(s) {clash} clash with the output's own columns")
        columns += classes
    columns.append("error")
    order = np.argsort(-result.probs, axis=1, kind="stable")[:, :topk] if n_cls else None
    rows = []
    for i, (path, rid) in enumerate(zip(result.inputs.paths, result.inputs.ids)):
        why = result.bad.get(path)
        if why is not None:
            if not skip_bad:
                rows.append([rid] + [None] * (len(columns) - 2) + [why])
            continue
        row: list = [rid]
        for c in order[i]:
            row += [classes[c], float(result.probs[i, c])]
        if probs:
            row += [float(v) for v in result.probs[i]]
        rows.append(row + [""])
    return columns, rows


def write(result: PredictResult, out: Path, *, topk: int = 1, probs: bool = False, skip_bad: bool = False) -> int:
    """Write ``out`` in the format of its extension (atomically); returns the number of rows."""
    suffix = out.suffix.lower()
    if suffix == ".npz":
        return _write_npz(result, out, skip_bad)
    columns, rows = table(result, topk=topk, probs=probs, skip_bad=skip_bad)
    if suffix == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows([["" if v is None else v for v in r] for r in rows])
        atomic_write_text(out, buf.getvalue())
    elif suffix == ".jsonl":
        atomic_write_text(out, "".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = {c: [r[j] for r in rows] for j, c in enumerate(columns)}
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            pq.write_table(pa.table(data), tmp)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return len(rows)


def _write_npz(result: PredictResult, out: Path, skip_bad: bool) -> int:
    from convnext_fast.predictions import Predictions

    keep = [i for i, p in enumerate(result.inputs.paths) if not (skip_bad and p in result.bad)]
    meta = {**result.info, "ids": [result.inputs.ids[i] for i in keep],
            "bad": {p: why for p, why in result.bad.items() if not skip_bad}, "logits": "mean over views"
            + (" (ensemble: log of the mean probabilities)" if len(result.info["weights"]) > 1 else "")}
    first_size = result.info["img_sizes"][0][0]
    Predictions(classes=result.classes, labels=np.full(len(keep), -1, np.int64),
                paths=[result.inputs.paths[i] for i in keep], img_sizes=[first_size],
                logits=result.logits[keep][None], meta=meta).save(out)
    return len(keep)


# --- a sample submission -----------------------------------------------------------------------------------------

def read_template(path: str | Path) -> tuple[list[str], list[str]]:
    """(header, ids) of a sample-submission CSV: the first column holds the ids."""
    path = Path(path).expanduser()
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--sample-submission {path}: cannot read it ({e})") from None
    if len(rows) < 2 or len(rows[0]) < 2:
        raise ValueError(f"--sample-submission {path}: expected a header (id column, then a label column or one "
                         f"column per class) and at least one row")
    return rows[0], [r[0].strip() for r in rows[1:] if r]


def _match_ids(result: PredictResult, wanted: list[str], id_format: str | None, template: Path) -> dict[str, int]:
    """{template id: row}; the id format is the one given, else the first of relpath, name, stem that matches every
    template id. Unmatched ids are a one-line error naming them."""
    best: tuple[int, str, dict] | None = None
    for fmt in [id_format] if id_format else ID_FORMATS:
        ids = [image_id(p, result.inputs.root, fmt) for p in result.inputs.paths]
        if len(set(ids)) != len(ids):
            continue
        where = {rid: i for i, rid in enumerate(ids)}
        hits = sum(w in where for w in wanted)
        if hits == len(wanted):
            return where
        if best is None or hits > best[0]:
            best = (hits, fmt, where)
    if best is None:
        raise ValueError(f"--sample-submission {template}: ids of DATA are not unique with --id-format {id_format}")
    missing = [w for w in wanted if w not in best[2]]
    raise ValueError(f"--sample-submission {template}: {len(missing)} of {len(wanted)} ids match no image of DATA "
                     f"(ids as --id-format {best[1]}): {', '.join(missing[:5])}"
                     + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))


def write_submission(result: PredictResult, template: str | Path, out: Path, *, id_format: str | None = None) -> int:
    """Fill the template's rows in its order: its columns after the id are either one label column (the top class)
    or class names (their probabilities). A row whose image could not be read keeps empty cells (warned)."""
    header, wanted = read_template(template)
    rest = header[1:]
    class_cols = [c for c in rest if c in result.classes]
    if len(rest) > 1 and len(class_cols) != len(rest):
        unknown = [c for c in rest if c not in result.classes]
        raise ValueError(f"--sample-submission {template}: columns {unknown[:5]} are not classes of the model "
                         f"(expected an id column, then one label column or one column per class)")
    where = _match_ids(result, wanted, id_format, Path(template))
    col = {c: i for i, c in enumerate(result.classes)}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    blank = []
    for rid in wanted:
        i = where[rid]
        if result.inputs.paths[i] in result.bad:
            blank.append(rid)
            w.writerow([rid] + [""] * len(rest))
        elif len(rest) == 1 and not class_cols:
            w.writerow([rid, result.classes[int(np.argmax(result.probs[i]))]])
        else:
            w.writerow([rid] + [float(result.probs[i, col[c]]) for c in rest])
    atomic_write_text(out, buf.getvalue())
    if blank:
        print(f"convnext-fast predict: warning: {len(blank)} row(s) left empty, their images cannot be read: "
              f"{', '.join(blank[:5])}", file=sys.stderr)
    extra = len(result.inputs) - len(set(where[r] for r in wanted))
    if extra:
        print(f"convnext-fast predict: note: {extra} image(s) of DATA are not in the template (not written)",
              file=sys.stderr)
    return len(wanted)
