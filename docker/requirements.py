"""Print the pip requirements of the project, one per line, from pyproject.toml alone.

    python3 requirements.py pyproject.toml [EXTRA ...]

Build-system requirements, `[project] dependencies` and those of each EXTRA. The image installs these in a
layer of their own before the sources are copied, so changing the code rebuilds seconds of image, not the
~4 GB of torch and DALI wheels. Unknown extra: exit 2 naming it and the extras that exist.
"""
import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        data = tomllib.load(f)
    project = data["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ValueError(f"{pyproject}: no extra {', '.join(map(repr, unknown))} (extras: {', '.join(optional)})")
    reqs = list(data.get("build-system", {}).get("requires", [])) + list(project.get("dependencies", []))
    for extra in extras:
        reqs += optional[extra]
    return reqs


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        print("\n".join(requirements(argv[0], [e for e in argv[1:] if e])))
    except (OSError, ValueError, KeyError) as e:
        print(f"requirements.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
