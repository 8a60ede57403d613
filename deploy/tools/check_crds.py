"""Validate the custom resources in rendered manifests against their CRD schemas, offline.

Runs in the tools venv (deploy/tools/requirements.txt), which has pydantic models generated from the
upstream CRD OpenAPI schemas: KEDA 2.16 (ScaledObject, TriggerAuthentication) and prometheus-operator
0.80 (ServiceMonitor, PrometheusRule). Each object must validate, and must survive a round trip through
its model unchanged: a field the schema does not know, or a value that only validates by coercion
("3" for 3), shows up as a difference.

Usage: python check_crds.py RENDERED.yaml...   (exit 1 and one line per problem if anything is wrong)
"""

from __future__ import annotations

import sys
from typing import Any

import pydantic
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring

MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
}
BUILT_IN_GROUPS = ("apps/", "batch/", "policy/", "networking.k8s.io/", "rbac.authorization.k8s.io/")


def differences(given: Any, kept: Any, path: str = "") -> list[str]:
    if isinstance(given, dict) and isinstance(kept, dict):
        found = [f"{path}.{key}: not in the schema" for key in given.keys() - kept.keys()]
        for key in given.keys() & kept.keys():
            found += differences(given[key], kept[key], f"{path}.{key}")
        return found
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [d for i, (a, b) in enumerate(zip(given, kept, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    if given != kept or type(given) is not type(kept):
        return [f"{path}: {given!r} is read as {kept!r}"]
    return []


def main(paths: list[str]) -> int:
    problems: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as stream:
            documents = [doc for doc in yaml.safe_load_all(stream) if doc]
        for doc in documents:
            api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            name = f"{path}: {kind}/{doc.get('metadata', {}).get('name', '?')}"
            model = MODELS.get((api_version, kind))
            if model is None:
                if api_version != "v1" and not api_version.startswith(BUILT_IN_GROUPS):
                    problems.append(f"{name}: no schema for {api_version} {kind}")
                continue
            try:
                kept = model.model_validate(doc).model_dump(mode="json", by_alias=True, exclude_unset=True)
            except pydantic.ValidationError as exc:
                problems += [f"{name}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
                continue
            found = differences(doc, kept)
            problems += [f"{name}: {d}" for d in found]
            if not found:
                print(f"ok {name} against {model.__module__}.{model.__name__}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
