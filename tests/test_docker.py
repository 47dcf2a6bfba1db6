"""The Docker image's files, checked without a container engine.

The real build and smoke run (podman, a debootstrapped base with Ubuntu's uid-1000 user, `--help`, an epoch on
the demo as the image's user and as `--user 4321:4321`) is docker/ci-smoke.sh, which .ci/run runs in CI.
"""

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SMOKE = ROOT / "docker" / "ci-smoke.sh"


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


def _env() -> dict[str, str]:
    env = {}
    for word, rest in _instructions():
        if word == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
    return env


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_base_image_is_pinned_and_later_stages_build_on_it():
    froms = [rest.split() for word, rest in _instructions() if word == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: _args()[m.group(1)], froms[0][0])
    name, sep, tag = image.rpartition(":")
    assert "@sha256:" in image or (sep and tag and tag != "latest" and "/" not in tag), image
    stages = [f[2] for f in froms if len(f) == 3 and f[1].upper() == "AS"]
    assert all(f[0] in stages for f in froms[1:]), f"a later stage starts from another image: {froms}"


def test_cuda_major_of_dali_matches_torch_in_every_documented_build():
    # Default: torch from PyPI (CUDA 13 wheels) with DALI for CUDA 13.
    assert _args()["TORCH_INDEX"] == "" and _args()["DALI_EXTRA"] == "dali-cu13"
    # Every other pairing shown to users (docker/README.md, the Dockerfile's comment): cuXY index <-> dali-cuX.
    docs = re.sub(r"\\\n", " ", (ROOT / "docker" / "README.md").read_text() + DOCKERFILE.read_text())
    pairs = re.findall(r"TORCH_INDEX=\S*/cu(\d\d)\d*\b.*?DALI_EXTRA=dali-cu(\d+)|"
                       r"DALI_EXTRA=dali-cu(\d+)\S*\s.*?TORCH_INDEX=\S*/cu(\d\d)\d*\b", docs)
    assert pairs, "no CUDA 12 build command documented"
    for torch_a, dali_a, dali_b, torch_b in pairs:
        assert (torch_a or torch_b) == (dali_a or dali_b), pairs


def test_gpus_reach_the_container_without_a_cuda_base():
    # Without these the NVIDIA Container Toolkit mounts no driver (unset) or only NVML (its default "utility").
    env = _env()
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "all"
    caps = set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(","))
    assert {"compute", "utility", "video"} <= caps or caps == {"all"}, caps  # video: nvJPEG's hardware decoder


def test_runs_as_non_root_user():
    users = [rest for word, rest in _instructions() if word == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    # The user exists: created, or renamed from what holds uid 1000 (Ubuntu 24.04's `ubuntu`).
    text = DOCKERFILE.read_text()
    assert re.search(rf"useradd\b.*\b{re.escape(users[-1])}\b", text)
    assert re.search(rf"usermod\b.*--login {re.escape(users[-1])}\b", text)


def test_entrypoint_is_the_console_script():
    entry = [rest for word, rest in _instructions() if word == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])  # exec form, so signals (Ctrl-C, SIGTERM) reach the trainer
    assert argv[0] in _pyproject()["project"]["scripts"]


def _requirements(*extras: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), str(ROOT / "pyproject.toml"),
                           *extras], capture_output=True, text=True)


def test_image_requirements_come_from_pyproject():
    default_extra = _args()["DALI_EXTRA"]
    assert default_extra in _pyproject()["project"]["optional-dependencies"]
    assert re.search(r"requirements\.py \S*pyproject\.toml \$\{DALI_EXTRA\}", DOCKERFILE.read_text())
    proc = _requirements(default_extra)
    assert proc.returncode == 0, proc.stderr
    reqs = proc.stdout.split()
    project = _pyproject()
    expected = (project["build-system"]["requires"] + project["project"]["dependencies"]
                + project["project"]["optional-dependencies"][default_extra])
    assert reqs == expected
    assert not any(r.startswith("pytest") for r in reqs)  # dev/test extras stay out of the image


def test_unknown_extra_is_one_line_error():
    proc = _requirements("dali-cu99")
    assert proc.returncode == 2
    assert "dali-cu99" in proc.stderr and "dali-cu13" in proc.stderr and "Traceback" not in proc.stderr


def test_copied_sources_are_not_excluded_by_dockerignore():
    ignore = [p.rstrip("/") for p in (ROOT / ".dockerignore").read_text().split()]
    copied = []
    for word, rest in _instructions():
        if word == "COPY" and not rest.startswith("--from="):
            copied += shlex.split(rest)[:-1]
    assert copied
    for path in copied:
        assert (ROOT / path).exists(), path
        assert f"!{path.rstrip('/')}" in ignore, path


def test_ci_runs_the_image_build_and_smoke_run():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*docker/ci-smoke\.sh\b", ci, re.M), ".ci/run no longer builds and runs the image"
    proc = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _apt_mirror(*files: Path) -> str:
    cmd = f"source {shlex.quote(str(SMOKE))}; apt_mirror {' '.join(shlex.quote(str(f)) for f in files)}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("name, text, expected", [
    ("debian.sources", "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
                       "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
                       "Suites: bookworm-security\n", "http://mirror.example/debian"),
    ("disabled.sources", "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n",
     "http://deb.debian.org/debian"),
    ("src.sources", "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n",
     "http://deb.debian.org/debian"),
    ("sources.list", "# deb http://old.example/debian bookworm main\n"
                     "deb http://sec.example/debian-security bookworm-security main\n"
                     "deb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main\n",
     "http://list.example/debian"),
    ("other.list", "deb http://archive.ubuntu.com/ubuntu noble main\n", "http://deb.debian.org/debian"),
])
def test_debootstrap_uses_the_mirror_apt_is_configured_with(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    assert _apt_mirror(tmp_path / name) == expected


def test_first_configured_source_wins(tmp_path):
    (tmp_path / "a.list").write_text("deb http://first.example/debian bookworm main\n")
    (tmp_path / "b.sources").write_text("Types: deb\nURIs: http://second.example/debian\nSuites: bookworm\n")
    assert _apt_mirror(tmp_path / "missing.list", tmp_path / "a.list", tmp_path / "b.sources") == \
        "http://first.example/debian"
