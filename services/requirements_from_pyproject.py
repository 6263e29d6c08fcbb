"""Print the pinned requirements of funchat's base dependencies plus the given extras, one per line,
from pyproject.toml alone, following `funchat[...]` references between extras. The Dockerfiles
install these in a layer of their own, so a change to the sources rebuilds only the small layer
that installs the package itself.

    python requirements_from_pyproject.py pyproject.toml orchestrator > requirements.txt
"""

import re
import sys
import tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    out: list[str] = list(project["dependencies"])
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            own = re.fullmatch(r"funchat\[([^\]]+)\]", req.replace(" ", ""))
            if own:
                todo += own.group(1).split(",")
            elif req not in out:
                out.append(req)
    return out


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        print("\n".join(requirements(tomllib.load(f)["project"], sys.argv[2:])))
