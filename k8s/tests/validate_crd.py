"""Validates custom resources against a CRD's openAPIV3Schema, offline.

usage: validate_crd.py CRD.yaml OBJECTS.yaml

Like the API server with strict field validation, a field that the schema does not list is
an error: every object schema with `properties` and neither `additionalProperties` nor
`x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`. Uses PyYAML and
jsonschema (both installed with kubernetes-validate by scripts/setup.sh).
"""

import sys

import jsonschema
import yaml


def strict(schema):
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


def main():
    crd_path, objects_path = sys.argv[1], sys.argv[2]
    with open(crd_path) as f:
        crds = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "CustomResourceDefinition"]
    schemas = {}
    for crd in crds:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schemas[(f"{group}/{v['name']}", kind)] = strict(v["schema"]["openAPIV3Schema"])
    failed = 0
    with open(objects_path) as f:
        for obj in yaml.safe_load_all(f):
            if not obj:
                continue
            key = (obj.get("apiVersion"), obj.get("kind"))
            name = obj.get("metadata", {}).get("name")
            if key not in schemas:
                print(f"ERROR {key[1]}/{name}: no schema for {key[0]} {key[1]} in {crd_path}")
                failed += 1
                continue
            validator = jsonschema.Draft7Validator(schemas[key])
            for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in err.path)
                print(f"ERROR {key[1]}/{name}: {path}: {err.message}")
                failed += 1
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
