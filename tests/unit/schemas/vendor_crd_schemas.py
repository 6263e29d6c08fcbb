"""Turn a CustomResourceDefinition's openAPIV3Schema into the JSON Schema the chart's tests validate with.

    python tests/unit/schemas/vendor_crd_schemas.py CRD.yaml [--version V] [--out FILE]

CRD.yaml holds one CRD (a file from the operator's repository, see README.md for which). The
output, by default next to this script, is named <kind>_<group>_<version>.json in lower case
(e.g. rayservice_ray.io_v1.json); --version picks a served version (default: the storage one).

The conversion (draft 2020-12):
- drops what does not validate: description, default, format, example and every x-kubernetes-*
  key (CEL rules, list types); `nullable: true` becomes a "null" alternative of the type; a Go
  (RE2) pattern's leading inline flag moves before its "^", as Python's re requires;
- closes every object that has `properties` and neither `additionalProperties` nor
  `x-kubernetes-preserve-unknown-fields: true`: CRDs leave that to the API server's pruning,
  which drops a misspelled field silently; here it fails, which is what makes the check useful;
- top level: apiVersion and kind are constants, metadata is checked loosely (name, and string
  maps of labels and annotations: CRD schemas leave metadata to the API server), status is
  dropped (a chart never renders it), and apiVersion, kind, metadata and spec are required;
- moves subtrees repeated in the CRD (pod specs, containers, probes ...) to $defs, referenced
  with $ref, so that the vendored file stays small.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DROP = {"description", "default", "format", "example"}
MIN_SHARED = 400  # characters of JSON: smaller repeated subtrees stay inline

LOOSE_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def python_pattern(pattern: str) -> str | None:
    """A CRD pattern (Go RE2) as a pattern Python's re (jsonschema's) accepts, or None to drop it.
    RE2 takes inline flags anywhere, Python only at the start: "^(?i)x" becomes "(?i)^x"."""
    m = re.match(r"^\^(\(\?[a-zA-Z]+\))", pattern)
    if m:
        pattern = m.group(1) + "^" + pattern[m.end():]
    try:
        re.compile(pattern)
    except re.error as exc:
        print(f"warning: dropped pattern {pattern!r}: {exc}", file=sys.stderr)
        return None
    return pattern


def convert_node(node):
    """One openAPIV3Schema node as JSON Schema (recursively)."""
    if isinstance(node, list):
        return [convert_node(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in DROP or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: convert_node(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = convert_node(value)
        elif key == "pattern":
            pattern = python_pattern(value)
            if pattern is not None:
                out[key] = pattern
        else:  # type, required, enum, minimum, maxItems, ...
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _canonical(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def share_repeats(schema: dict) -> dict:
    """Move subtrees that occur more than once (and are not tiny) to $defs, largest first."""
    defs: dict[str, dict] = {}

    def walk(node, path, seen):
        if isinstance(node, dict):
            text = _canonical(node)
            if len(text) >= MIN_SHARED and "$ref" not in node:
                seen[text] += 1
                names.setdefault(text, path)
            for k, v in node.items():
                walk(v, k if k not in ("items", "properties") else path, seen)
        elif isinstance(node, list):
            for v in node:
                walk(v, path, seen)

    def replace(node, text, ref):
        if isinstance(node, dict):
            if _canonical(node) == text:
                return {"$ref": ref}
            return {k: replace(v, text, ref) for k, v in node.items()}
        if isinstance(node, list):
            return [replace(v, text, ref) for v in node]
        return node

    while True:
        names: dict[str, str] = {}
        seen: Counter = Counter()
        walk({"root": schema, "defs": defs}, "root", seen)
        repeated = [t for t, n in seen.items() if n > 1]
        if not repeated:
            break
        text = max(repeated, key=len)
        base = names[text] or "shared"
        name, i = base, 2
        while name in defs:
            name, i = f"{base}{i}", i + 1
        ref = f"#/$defs/{name}"
        schema = replace(schema, text, ref)
        defs = {k: replace(v, text, ref) for k, v in defs.items()}
        defs[name] = json.loads(text)
    if defs:
        schema["$defs"] = dict(sorted(defs.items()))
    return schema


def crd_schema(crd: dict, version: str | None = None) -> tuple[dict, str]:
    """The JSON Schema of one version of a CRD, and that version's name."""
    versions = crd["spec"]["versions"]
    chosen = next((v for v in versions if v["name"] == version) if version
                  else (v for v in versions if v.get("storage")), None)
    if chosen is None:
        raise SystemExit(f"{crd['metadata']['name']}: no version {version or '(storage)'}; "
                         f"it has {', '.join(v['name'] for v in versions)}")
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    body = convert_node(chosen["schema"]["openAPIV3Schema"])
    props = body.get("properties", {})
    props.pop("status", None)
    props["apiVersion"] = {"const": f"{group}/{chosen['name']}"}
    props["kind"] = {"const": kind}
    props["metadata"] = LOOSE_METADATA
    body["properties"] = props
    body["required"] = ["apiVersion", "kind", "metadata"] + (["spec"] if "spec" in props else [])
    body["additionalProperties"] = False
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "title": f"{kind} ({group}/{chosen['name']}), from the CRD {crd['metadata']['name']}"}
    schema.update(body)
    return share_repeats(schema), chosen["name"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", help="CRD YAML file ('-' for stdin)")
    parser.add_argument("--version", help="served version to convert (default: the storage version)")
    parser.add_argument("--out", help="output file (default: <kind>_<group>_<version>.json next to this script)")
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.crd == "-" else Path(args.crd).read_text()
    crds = [d for d in yaml.safe_load_all(text) if d and d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise SystemExit(f"{args.crd}: expected one CustomResourceDefinition, found {len(crds)}")
    schema, version = crd_schema(crds[0], args.version)
    kind, group = crds[0]["spec"]["names"]["kind"], crds[0]["spec"]["group"]
    out = Path(args.out) if args.out else HERE / f"{kind.lower()}_{group}_{version}.json"
    out.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"{out}: {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
