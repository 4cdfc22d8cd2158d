"""infra/kubernetes/: the objects of manifests.py as YAML files a user reads, diffs and commits,
numbered in the order `kubectl apply -f infra/kubernetes/` needs them (the namespace before what
lives in it, the claim and Secret before the pods that mount and read them).

The Secret holds the endpoint's keys: its file is written 0600 and ignored by git (a .gitignore
beside it), as the other providers keep the keys in .tuneserve/keys.json.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tuneserve.deploy.atomic import write_atomic
from tuneserve.deploy.k8s import manifests as m
from tuneserve.deploy.keys import EndpointKeys

HEADER = (
    "# Rendered by 'tuneserve provision --provider kubernetes' from "
    "infra/provision/inference.parameters.json;\n"
    "# the next provision rewrites this file: change the parameters or flags, not the file.\n"
)
SECRET_FILE = "20-secret.yaml"


def render(spec: m.KubeSpec, keys: EndpointKeys) -> dict[str, list[m.Obj]]:
    """{file name: the objects it holds}, in apply order."""
    files: dict[str, list[m.Obj]] = {}
    if spec.namespace != "default":
        files["00-namespace.yaml"] = [m.namespace(spec)]
    files["10-storage.yaml"] = m.storage(spec)
    files[SECRET_FILE] = [m.keys_secret(spec, keys.api_key, keys.admin_key)]
    files["30-deployment.yaml"] = [m.deployment(spec)]
    files["40-service.yaml"] = [m.service(spec)]
    files["50-disruption-budget.yaml"] = [m.disruption_budget(spec)]
    if (scaler := m.autoscaler(spec)) is not None:
        files["60-autoscaler.yaml"] = [scaler]
    if (entry := m.ingress(spec)) is not None:
        files["45-ingress.yaml"] = [entry]
    if (monitor := m.service_monitor(spec)) is not None:
        files["70-service-monitor.yaml"] = [monitor]
    return dict(sorted(files.items()))


def to_yaml(objects: list[m.Obj]) -> str:
    return HEADER + yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


def write(folder: Path, files: dict[str, list[m.Obj]]) -> list[Path]:
    """Write the files, and remove ones an earlier provision wrote that are no longer rendered
    (an autoscaler turned off), so that `kubectl apply -f` on the folder matches."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        if old.name not in files and old.read_text(encoding="utf-8").startswith(HEADER):
            old.unlink()
    written = []
    for name, objects in files.items():
        path = folder / name
        write_atomic(path, to_yaml(objects), mode=0o600 if name == SECRET_FILE else None)
        written.append(path)
    ignore = folder / ".gitignore"
    ignore.write_text(f"# the endpoint's keys: not for git\n{SECRET_FILE}\n", encoding="utf-8")
    return written


def read(folder: Path) -> list[m.Obj]:
    """Every object of the folder's YAML files, in file order."""
    objects: list[m.Obj] = []
    for path in sorted(folder.glob("*.yaml")):
        objects += [o for o in yaml.safe_load_all(path.read_text(encoding="utf-8")) if o]
    return objects
