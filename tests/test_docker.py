"""The Dockerfile, checked without a Docker engine (none runs in CI)."""

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    args = {}
    for word, rest in _instructions():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_base_image_is_pinned():
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert len(froms) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda m: _args()[m.group(1)], froms[0]).split()[0]
    name, sep, tag = image.rpartition(":")
    assert "@sha256:" in image or (sep and tag and tag != "latest" and "/" not in tag), image
    # The default CUDA major must match the DALI build the image installs.
    cuda_major = re.search(r"cuda:(\d+)\.", image).group(1)
    assert _args()["DALI_EXTRA"] == f"dali-cu{cuda_major}"


def test_runs_as_non_root_user():
    users = [rest for word, rest in _instructions() if word == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    # The user must exist: it is created before it is used.
    assert re.search(rf"useradd\b.*\b{re.escape(users[-1])}\b", DOCKERFILE.read_text())


def test_entrypoint_is_the_console_script():
    entry = [rest for word, rest in _instructions() if word == "ENTRYPOINT"]
    assert len(entry) == 1
    import json

    argv = json.loads(entry[0])  # exec form, so signals (Ctrl-C, SIGTERM) reach the trainer
    assert argv[0] in _pyproject()["project"]["scripts"]


def test_install_line_uses_extras_from_pyproject():
    extras = set(_pyproject()["project"]["optional-dependencies"])
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    installs = re.findall(r"pip install [^&]*?\"\.\[([^\]]+)\]\"", runs)
    assert installs, "the image does not pip install the project"
    for spec in installs:
        for extra in spec.split(","):
            extra = re.sub(r"\$\{(\w+)\}", lambda m: _args()[m.group(1)], extra.strip())
            assert extra in extras, f"Dockerfile installs extra {extra!r}, not defined in pyproject.toml"


def test_copied_sources_are_not_excluded_by_dockerignore():
    ignore = (ROOT / ".dockerignore").read_text().split()
    copied = []
    for word, rest in _instructions():
        if word == "COPY":
            copied += shlex.split(rest)[:-1]
    assert copied
    for path in copied:
        assert (ROOT / path).exists(), path
        assert f"!{path.rstrip('/')}" in [p.rstrip("/") for p in ignore] or f"!{path}" in ignore, path
