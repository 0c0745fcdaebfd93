"""Print pyproject.toml's floors as pins: one ``name==floor`` line per direct dependency and per requirement of the
extras named on the command line, for .ci/floors to install as pip constraints.

A floor is the requirement's ``>=`` bound; a requirement without one is an error (a floor nobody checks is not a
floor). Requirements whose marker does not hold here (e.g. ``tomli; python_version < '3.11'``) are left out. torch
is pinned to ``--torch`` instead (the wheel on disk: its floor would be a multi-GB download), which must lie in the
range pyproject.toml asks for.

    python .ci/floor_pins.py --torch 2.13.0 hf test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare interpreter: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extras: list[str]) -> list[Requirement]:
    """The project's dependencies, then those of each extra, as parsed requirements (markers not yet applied)."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ValueError(f"{PYPROJECT}: no extra {unknown[0]!r}; extras are {sorted(optional)}")
    lines = project["dependencies"] + [line for e in extras for line in optional[e]]
    return [Requirement(line) for line in lines]


def floor(req: Requirement) -> str:
    """The version of ``req``'s ``>=`` bound; ValueError naming the requirement when it has none."""
    bounds = [s.version for s in req.specifier if s.operator == ">="]
    if len(bounds) != 1:
        raise ValueError(f"{PYPROJECT}: requirement {str(req)!r} has no single '>=' floor")
    return bounds[0]


def pins(extras: list[str], torch: str) -> dict[str, str]:
    """{name: version} of every requirement that applies here: its floor, or ``torch`` for torch."""
    out: dict[str, str] = {}
    for req in requirements(extras):
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = torch if req.name == "torch" else floor(req)
        if req.name == "torch" and not req.specifier.contains(torch):
            raise ValueError(f"--torch {torch} is outside pyproject.toml's range {str(req)!r}")
        if out.setdefault(req.name, version) != version:  # e.g. transformers in both `hf` and `test`
            raise ValueError(f"{PYPROJECT}: {req.name} has two floors, {out[req.name]} and {version}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("extras", nargs="*", help="optional-dependency groups whose floors to add")
    p.add_argument("--torch", required=True, help="the torch version to pin instead of its floor")
    args = p.parse_args(argv)
    try:
        for name, version in pins(args.extras, args.torch).items():
            print(f"{name}=={version}")
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
