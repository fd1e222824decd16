#!/usr/bin/env python3
"""Validates every object of a multi-document YAML file (kubectl kustomize
output) against the published schemas of one Kubernetes version, in strict
mode (unknown fields are errors), with the kubernetes-validate package.

Prints one JSON object per document:
  {"kind", "apiVersion", "name", "result": "valid" | "invalid" | "no-schema", "error"}
For kinds it has no schema for (custom resources), "no-schema" is reported
explicitly and the object's metadata is still validated against ObjectMeta.
The caller decides which kinds may lack a schema.

Usage: validate_k8s.py KUBERNETES_VERSION FILE
"""
import json
import sys

try:
    import yaml
    import jsonschema
    from referencing import Registry, Resource
    import kubernetes_validate
    import kubernetes_validate.utils as kv
except ImportError as e:  # the Rust test turns this into an install hint
    print(f"missing python module: {e.name}; install with: pip install kubernetes-validate==1.37.0", file=sys.stderr)
    sys.exit(3)


def object_meta_errors(metadata, version):
    schema_dir = "v%s-local-strict" % version
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    schema = {"$id": "https://kubernetes.io/api/custom-resource.json", "$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    registry = Resource.from_contents(defs) @ Registry()
    validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    return [f"metadata: {e.message}" for e in validator.iter_errors(metadata)]


def main():
    version, path = sys.argv[1], sys.argv[2]
    full_version = version if version.count(".") == 2 else version + ".0"
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for doc in docs:
        out = {
            "kind": doc.get("kind"),
            "apiVersion": doc.get("apiVersion"),
            "name": (doc.get("metadata") or {}).get("name"),
        }
        try:
            validated = kv.validate(doc, full_version, strict=True)
            out["result"] = "valid"
            out["schemaVersion"] = validated
        except kv.SchemaNotFoundError as e:
            errors = object_meta_errors(doc.get("metadata") or {}, full_version)
            out["result"] = "invalid" if errors else "no-schema"
            out["error"] = "; ".join(errors) if errors else e.message
        except kv.ValidationError as e:
            out["result"] = "invalid"
            out["error"] = "%s: %s" % ("/".join(str(p) for p in e.path), e.message)
        print(json.dumps(out, sort_keys=True))
    print(json.dumps({"kubernetes_validate": kubernetes_validate.utils.__version__, "documents": len(docs)}))


if __name__ == "__main__":
    main()
