"""Turn CustomResourceDefinitions into the JSON schemas kubeconform validates custom resources with.

    python scripts/vendor_crd_schemas.py OUT_DIR CRD.yaml [CRD.yaml ...]

Writes ``OUT_DIR/<group>/<kind>_<version>.json`` (lower-case kind) for the storage version, the layout
``-schema-location 'k8s/schemas/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json'`` reads.
Strict like kubeconform's own converter: an object schema that lists properties and neither allows
unknown fields (``x-kubernetes-preserve-unknown-fields``) nor says what extra keys may hold gets
``additionalProperties: false``, so a misspelt field fails.  Descriptions are dropped to keep the
vendored files small.  ``make test`` never runs this: the output is committed (no network at test time).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

_DROP = {"description"}


def strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if k not in _DROP}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def convert(crd: dict, out_dir: Path) -> list[Path]:
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"].lower()
    written = []
    for version in spec["versions"]:
        if not version.get("storage", False):
            continue  # older served versions: manifests here use the current one
        schema = strict(version["schema"]["openAPIV3Schema"])
        schema.setdefault("properties", {})
        # kubeconform checks apiVersion/kind/metadata itself; make sure the root accepts them.
        for key, sub in (("apiVersion", {"type": "string"}), ("kind", {"type": "string"}), ("metadata", {"type": "object"})):
            schema["properties"].setdefault(key, sub)
        path = out_dir / group / f"{kind}_{version['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0])
    for f in argv[1:]:
        for doc in yaml.safe_load_all(Path(f).read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                for p in convert(doc, out_dir):
                    print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
