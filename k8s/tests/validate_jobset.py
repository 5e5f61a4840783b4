"""Validates JobSet objects offline against JobSet's own API types.

usage: validate_jobset.py OBJECTS.yaml

The types are the pydantic models that the Kubeflow Trainer project generates from the
OpenAPI definitions of jobset.x-k8s.io/v1alpha2 (and of the core Kubernetes types a
JobSet embeds), published on PyPI as `kubeflow-trainer-api` and pinned by
scripts/setup.sh. Two checks, like the API server with strict field validation:

1. every field of the object is one the types declare (a misspelt or unknown field is an
   error, at any depth, pod templates included);
2. the object parses into the models (required fields, strict value types).

Exit status 1 and one `ERROR kind/name: path: message` line per problem when either fails.
"""

import sys
import typing

import pydantic
import yaml
from kubeflow_trainer_api.models.jobset_v1alpha2_job_set import JobsetV1alpha2JobSet

API_VERSION = "jobset.x-k8s.io/v1alpha2"


def model_types(annotation):
    """The pydantic model classes inside a field annotation (Optional, List, Dict unwrapped)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(model_types(arg))
    return found


def is_one_of_wrapper(model):
    """openapi-generator's oneOf wrappers (Quantity, IntOrString) hold a scalar, not fields."""
    return "actual_instance" in model.model_fields


def unknown_fields(value, model, path):
    """Paths of the keys in `value` that `model` does not declare, recursively."""
    if isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            out.extend(unknown_fields(item, model, f"{path}[{i}]"))
        return out
    if not isinstance(value, dict) or is_one_of_wrapper(model):
        return []
    by_alias = {(f.alias or name): f for name, f in model.model_fields.items()}
    out = []
    for key, item in value.items():
        field = by_alias.get(key)
        if field is None:
            out.append(f"{path}.{key}".lstrip("."))
            continue
        inner = model_types(field.annotation)
        if not inner:
            continue
        # A map of objects (Dict[str, Model]) is walked per value.
        origin = typing.get_origin(field.annotation)
        args = typing.get_args(field.annotation)
        is_map = origin is dict or any(typing.get_origin(a) is dict for a in args)
        if is_map and isinstance(item, dict):
            for k, v in item.items():
                out.extend(unknown_fields(v, inner[0], f"{path}.{key}.{k}"))
        else:
            out.extend(unknown_fields(item, inner[0], f"{path}.{key}"))
    return out


def main():
    with open(sys.argv[1]) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    errors = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("apiVersion") != API_VERSION or obj.get("kind") != "JobSet":
            errors.append(f"{name}: not a {API_VERSION} JobSet")
            continue
        for path in unknown_fields(obj, JobsetV1alpha2JobSet, ""):
            errors.append(f"{name}: {path}: unknown field")
        try:
            JobsetV1alpha2JobSet.from_dict(obj)
        except (pydantic.ValidationError, ValueError) as e:
            errors.append(f"{name}: {e}")
    for e in errors:
        print(f"ERROR {e}")
    sys.exit(1 if errors or not objects else 0)


if __name__ == "__main__":
    main()
