"""The Kubernetes provider: the inference app as Kubernetes objects.

manifests.py  the objects (Deployment, Service, share volume, Secret, budget, autoscaler)
              as dicts, pure functions of a KubeSpec
render.py     infra/kubernetes/: those objects as numbered YAML files (the Secret's 0600)
provider.py   `tuneserve provision --provider kubernetes`: the spec from infra/ and flags
api.py        the API slice used, through the official client (apply, get, patch, logs, exec)
rollout.py    a rollout read and undone as kubectl does
podshare.py   a storage class's volume as a sync target, through a short-lived pod (exec + tar)
"""
