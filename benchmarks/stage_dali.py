#!/usr/bin/env python3
"""DALI for a GPU machine with no network: a pinned wheelhouse, compressed and cut into parts, reassembled and
installed there with `pip --no-index`, then a smoke test.

  build   (on a machine with network and the project's .venv) pins DALI and the packages it needs from the venv
          (`pip freeze` versions, not ranges), downloads those wheels for the target's Python and platform,
          rewrites each wheel uncompressed (zip STORED: same files and RECORD) so that ONE xz stream over all of
          them compresses the libraries themselves, and cuts that stream into parts of at most --part-mib, each
          in its own folder .device-dali/partN/ (with the manifest), so that one call can carry one part next to
          the checkout. --slim (default) leaves out what JPEG decoding with DALI never loads (see SLIM below).
  install (on the target, python3 only, stdlib only) checks that every part arrived (names the missing ones),
          joins and verifies them (sha256), unpacks the wheels and installs them with `pip install --no-index`,
          then runs benchmarks/dali_smoke.py (--no-smoke to skip).

Why our own packer rather than pip's: pip moves wheels, not parts; the wheels are already deflated, so xz over
them gains ~2 %, over their stored contents ~30 %.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

DALI = "nvidia-dali-cuda130"
STAGE = Path(".device-dali")
CHUNK = "dali.tar.xz."
# Besides DALI, what the GPU check needs that a bare torch machine may lack (the project's rich and matplotlib,
# pytest for `pytest -m gpu`). Every wheel that is not DALI's own NVIDIA stack is installed only where its
# distribution is missing: the target's numpy, packaging, ... are never replaced.
EXTRA = "pytest,pytest-timeout,rich,matplotlib"
# Not staged: what any torch + torchvision machine has (numpy 16 MiB, pillow), and build-time-only packages.
NOT_STAGED = {"numpy", "pillow", "wheel", "setuptools"}
# --slim: what DALI's JPEG path does not load. How we know: `readelf -d` of libdali*.so, backend_impl and
# libnvimgcodec.so lists no NVIDIA library as NEEDED (only DALI's own .libs/, which all stay); libnvimgcodec,
# libnvjpeg.so.13 (nvidia/cu13/lib), libnvcomp.so.5 and NPP are dlopen()ed by name (`strings`), nvimgcodec
# loads each extensions/*.so it finds and nvjpeg_ext dlopens libnvjpeg. So: nvcomp (only fn.experimental.inflate
# and nvtiff use it), nvjpeg2k and nvtiff (JPEG 2000 / TIFF on the GPU) and their nvimgcodec extensions are left
# out; the CPU decoders (libjpeg-turbo, OpenCV for PNG/BMP/WebP, libtiff) stay. Headers, nvimgcodec's tools and
# the C extensions built for other Pythons are dropped, and ELF files are `strip --strip-unneeded`ed.
SLIM_SKIP_WHEELS = {"nvidia-libnvcomp-cu13", "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13"}
SLIM_DROP = re.compile(r"^nvidia/(dali|nvimgcodec)/include/|^nvidia/nvimgcodec/tools/"
                       r"|^nvidia/nvimgcodec/extensions/lib(nvjpeg2k|nvtiff)_ext\.")
CPYTHON_SO = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")
# Walks DALI's requirements (markers evaluated for the target Python, extras followed) in the pinning venv.
CLOSURE_SNIPPET = r"""
import json, sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
env = {"python_version": sys.argv[2], "python_full_version": sys.argv[2] + ".0", "platform_system": "Linux",
       "sys_platform": "linux", "platform_machine": "x86_64", "implementation_name": "cpython"}
seen, todo = {}, [(n, ()) for n in sys.argv[1].split(",") if n]
while todo:
    name, extras = todo.pop()
    d = distribution(name)
    seen[canon(name)] = d.version
    for r in map(Requirement, d.requires or ()):
        if r.marker and not any(r.marker.evaluate({**env, "extra": e}) for e in (*extras, "")):
            continue
        if canon(r.name) not in seen:
            todo.append((r.name, tuple(r.extras)))
print(json.dumps(seen))
"""


def log(msg: str) -> None:
    print(f"[stage_dali {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_from_venv(python: str, pyver: str, extra: str = "") -> dict[str, str]:
    """{distribution: version} of DALI, the `extra` distributions and everything they require, as installed in
    the venv of `python`."""
    proc = subprocess.run([python, "-c", CLOSURE_SNIPPET, f"{DALI},{extra}", pyver], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"stage_dali: cannot read {DALI}'s requirements from {python} (is it installed there? "
                         f"`make venv`):\n{proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout)


def download(pins: dict[str, str], pyver: str, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           pyver, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + [f"{n}=={v}" for n, v in sorted(pins.items())], check=True)
    wheels = sorted(dest.glob("*.whl"))
    got = {canon(w.name.split("-")[0]) for w in wheels}
    if missing := sorted(set(pins) - got):
        raise SystemExit(f"stage_dali: pip download did not fetch {missing}")
    return wheels


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _strip(data: bytes) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".so") as f:
        f.write(data)
        f.flush()
        subprocess.run(["strip", "--strip-unneeded", f.name], check=True)
        return Path(f.name).read_bytes()


def restore_wheel(src: Path, dest_dir: Path, *, slim: bool, py_tag: str) -> tuple[Path, int]:
    """Rewrite `src` into dest_dir as a STORED zip; with slim, drop SLIM_DROP files and other Pythons' C
    extensions, strip ELF files, and rewrite RECORD to match. Returns (path, bytes dropped/stripped away)."""
    out = dest_dir / src.name
    saved = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in zin.infolist():
            if info.filename == record_name or info.is_dir():
                continue
            data = zin.read(info)
            if slim:
                m = CPYTHON_SO.search(info.filename)
                if SLIM_DROP.search(info.filename) or (m and m.group(1) != py_tag):
                    saved += len(data)
                    continue
                if data[:4] == b"\x7fELF":
                    stripped = _strip(data)
                    saved += len(data) - len(stripped)
                    data = stripped
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.external_attr = info.external_attr  # keeps the executable bit of libraries and tools
            zout.writestr(zi, data)
            lines.append(_record_line(info.filename, data))
        zout.writestr(zipfile.ZipInfo(record_name, date_time=(2020, 1, 1, 0, 0, 0)),
                      "\n".join(lines + [f"{record_name},,"]) + "\n")
    return out, saved


def pack(wheel_dir: Path, stage: Path, part_mib: float, level: int) -> dict:
    """tar | xz of wheel_dir's wheels, cut into parts of part_mib MiB in stage/partN/; the manifest in each."""
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    blob = stage / "all.tar.xz"
    preset = f"-{level}e" if level >= 9 else f"-{level}"
    if shutil.which("xz"):  # the xz tool uses every core (-T0); Python's lzma only one
        with blob.open("wb") as f:
            xz = subprocess.Popen(["xz", preset, "-T0", "-c"], stdin=subprocess.PIPE, stdout=f)
            with tarfile.open(fileobj=xz.stdin, mode="w|") as tar:
                for w in sorted(wheel_dir.glob("*.whl")):
                    tar.add(w, arcname=w.name)
            xz.stdin.close()
            if xz.wait():
                raise SystemExit(f"stage_dali: xz {preset} failed (exit {xz.returncode})")
    else:
        with lzma.open(blob, "wb", preset=level | (lzma.PRESET_EXTREME if level >= 9 else 0)) as xz, \
                tarfile.open(fileobj=xz, mode="w") as tar:
            for w in sorted(wheel_dir.glob("*.whl")):
                tar.add(w, arcname=w.name)
    size = int(part_mib * 2**20)
    chunks, total = [], hashlib.sha256()
    with blob.open("rb") as f:
        while data := f.read(size):
            total.update(data)
            i = len(chunks) + 1
            (stage / f"part{i}").mkdir()
            name = f"part{i}/{CHUNK}{i:02d}"
            (stage / name).write_bytes(data)
            chunks.append({"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    blob.unlink()
    manifest = {"dali": DALI, "parts": len(chunks), "chunks": chunks, "sha256": total.hexdigest(),
                "wheels": sorted(w.name for w in wheel_dir.glob("*.whl"))}
    for i in range(1, len(chunks) + 1):
        (stage / f"part{i}" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def build(args: argparse.Namespace) -> int:
    t0 = time.time()
    pins = pins_from_venv(args.venv_python, args.pyver, args.extra)
    skip = set(SLIM_SKIP_WHEELS if args.slim else ()) | NOT_STAGED
    pins = {n: v for n, v in pins.items() if n not in skip}
    log(f"pinned from {args.venv_python}: " + " ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
    work = Path(args.cache) / f"py{args.pyver}"
    wheels = download(pins, args.pyver, work / "download")
    t1 = time.time()
    stored = work / "stored"
    shutil.rmtree(stored, ignore_errors=True)
    stored.mkdir(parents=True)
    tag = args.pyver.replace(".", "")
    for w in wheels:
        _, saved = restore_wheel(w, stored, slim=args.slim, py_tag=tag)
        if saved:
            log(f"{w.name}: {saved / 2**20:.1f} MiB left out / stripped")
    t2 = time.time()
    manifest = pack(stored, Path(args.stage), args.part_mib, args.xz_level)
    t3 = time.time()
    downloaded = sum(w.stat().st_size for w in wheels)
    unpacked = sum(w.stat().st_size for w in stored.glob("*.whl"))
    packed = sum(c["bytes"] for c in manifest["chunks"])
    log(f"wheels {downloaded / 2**20:.1f} MiB as downloaded, {unpacked / 2**20:.1f} MiB stored"
        f"{' after --slim' if args.slim else ''}, xz -{args.xz_level}: {packed / 2**20:.1f} MiB in "
        f"{manifest['parts']} part(s) of <= {args.part_mib} MiB; download {t1 - t0:.0f} s, rewrite {t2 - t1:.0f} s, "
        f"xz {t3 - t2:.0f} s")
    for i, c in enumerate(manifest["chunks"], 1):
        last = i == manifest["parts"]
        cmd = ("python3 benchmarks/stage_dali.py install" if last else f"ls -la {args.stage}")
        print(f"  call {i}: carry {args.stage}/part{i} ({c['bytes'] / 2**20:.1f} MiB); run: {cmd}")
    return 0


def _missing_parts(stage: Path) -> tuple[dict, list[str]]:
    manifests = sorted(stage.glob("part*/manifest.json"))
    if not manifests:
        raise SystemExit(f"stage_dali: no {stage}/partN/manifest.json here: carry the parts built by "
                         "`benchmarks/stage_dali.py build` (one per call), then run install")
    manifest = json.loads(manifests[-1].read_text())
    missing = [c["path"] for c in manifest["chunks"]
               if not (stage / c["path"]).is_file() or (stage / c["path"]).stat().st_size != c["bytes"]]
    return manifest, missing


def _installed(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def install(args: argparse.Namespace) -> int:
    t0 = time.time()
    stage = Path(args.stage)
    manifest, missing = _missing_parts(stage)
    if missing:
        raise SystemExit(f"stage_dali: {len(missing)} of {manifest['parts']} parts missing or short: "
                         f"{', '.join(missing)} (carry each partN folder in a call before this one, back to back)")
    total = hashlib.sha256()
    buf = io.BytesIO()
    for c in manifest["chunks"]:
        data = (stage / c["path"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != c["sha256"]:
            raise SystemExit(f"stage_dali: {stage / c['path']} is corrupt (sha256 differs from the manifest)")
        total.update(data)
        buf.write(data)
    assert total.hexdigest() == manifest["sha256"]
    wheels = Path(args.wheelhouse or tempfile.mkdtemp(prefix="dali-wheels-"))
    buf.seek(0)
    with lzma.open(buf) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        tar.extractall(wheels, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(wheels)
    del buf
    log(f"{manifest['parts']} part(s) joined, verified and unpacked into {wheels} in {time.time() - t0:.1f} s")
    own, kept = [], []
    for w in sorted(wheels.glob("*.whl")):
        name = canon(w.name.split("-")[0])
        have = None if name.startswith("nvidia-") else _installed(name)
        if have is None:  # DALI's NVIDIA stack always (the pinned versions); anything else only where missing
            own.append((name, w))
        else:
            kept.append(f"{name} {have}")
    if kept:
        log(f"already installed, kept as they are: {', '.join(kept)}")
    pip = [args.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check"]
    cmd = pip + (["--target", args.target] if args.target else []) + [str(w) for _, w in own]
    proc = subprocess.run(cmd)
    if proc.returncode and not args.target:  # e.g. an externally managed system Python: a folder of its own
        args.target = str(stage / "site")
        log(f"pip install into the environment failed (exit {proc.returncode}); installing into {args.target}")
        proc = subprocess.run(pip + ["--target", args.target] + [str(w) for _, w in own])
    if proc.returncode:
        raise SystemExit(f"stage_dali: pip install --no-index failed (exit {proc.returncode})")
    env = dict(os.environ)
    if args.target:
        # nvImageCodec's nvidia/__init__.py is pkgutil.extend_path: first on PYTHONPATH, ours spans the machine's
        # nvidia/ folders (torch's CUDA libraries) instead of hiding them.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(args.target).resolve()),
                                                        env.get("PYTHONPATH")) if p)
        log(f"installed into {args.target}: export PYTHONPATH={env['PYTHONPATH']} for the commands after this")
    log(f"installed {len(own)} wheel(s) with pip --no-index in {time.time() - t0:.1f} s total")
    if args.no_smoke:
        return 0
    smoke = Path(__file__).with_name("dali_smoke.py")
    return subprocess.run([args.python, "-u", str(smoke), *(["--device", args.device] if args.device else []),
                           *(["--json", args.json] if args.json else [])], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="pin, download, rewrite, compress and cut the wheelhouse into parts")
    b.add_argument("--pyver", default=os.environ.get("PYVER", "3.12"), help="target Python (default 3.12)")
    b.add_argument("--venv-python", default=".venv/bin/python", help="the venv whose versions are pinned")
    b.add_argument("--extra", default=os.environ.get("EXTRA", EXTRA),
                   help=f"distributions staged besides DALI, with their requirements (default {EXTRA})")
    b.add_argument("--part-mib", type=float, default=float(os.environ.get("PART_MIB", 60)),
                   help="size of one part (default 60: a call carries 64 MiB, the checkout ~2 MiB of it)")
    b.add_argument("--xz-level", type=int, default=9, choices=range(0, 10))
    b.add_argument("--slim", action=argparse.BooleanOptionalAction, default=True,
                   help="leave out what JPEG decoding never loads and strip the libraries (default on)")
    b.add_argument("--stage", default=str(STAGE))
    b.add_argument("--cache", default=str(STAGE.parent / ".cache" / "stage-dali"),
                   help="download and rewrite folder (kept between builds)")
    i = sub.add_parser("install", help="on the target: join, verify, pip install --no-index, smoke test")
    i.add_argument("--stage", default=str(STAGE))
    i.add_argument("--python", default=sys.executable)
    i.add_argument("--target", default=None, help="pip --target folder instead of the environment")
    i.add_argument("--wheelhouse", default=None, help="keep the unpacked wheels here (default: a temp folder)")
    i.add_argument("--device", default=None, help="smoke test device (default cuda when available, else cpu)")
    i.add_argument("--json", default=None, help="write the smoke test's result here too")
    i.add_argument("--no-smoke", action="store_true")
    args = parser.parse_args(argv)
    return build(args) if args.cmd == "build" else install(args)


if __name__ == "__main__":
    sys.exit(main())
