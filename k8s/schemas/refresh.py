"""Writes the ray.io/v1 OpenAPI schemas of KubeRay's CRD files as compact JSON beside this script.

    python k8s/schemas/refresh.py <kuberay checkout>/ray-operator/config/crd/bases
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

CRDS = {"rayjobs": "rayjob", "rayclusters": "raycluster", "raycronjobs": "raycronjob", "rayservices": "rayservice"}


def main(bases: Path) -> None:
    out = Path(__file__).resolve().parent
    for plural, kind in CRDS.items():
        crd = yaml.safe_load((bases / f"ray.io_{plural}.yaml").read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = version["schema"]["openAPIV3Schema"]
        (out / f"{kind}.ray.io_v1.json").write_text(json.dumps(schema, separators=(",", ":")))
        print(f"wrote {kind}.ray.io_v1.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
