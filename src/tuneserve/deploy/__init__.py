"""HOW it reaches a remote machine: the infra/ files, providers (local, azure, kubernetes) behind
one registry, workspace -> share sync, readiness waits. Runs `tuneserve serve` remotely; never
imports engine/ or server/.

    infra.py      pydantic models of infra/*.json; errors with file, line and field
    naming.py     Azure naming rules; uniqueString() and the template's derived names
    scaffold.py   `tuneserve init` (and --demo's AI Toolkit layout)
    base.py       the Provider base class, ProvisionRequest, results, the shared deploy steps
    registry.py   the providers by name: --provider's choices, each provider's provision flags
    workflow.py   provision: pick the provider, build its request, write the config
    keys.py       the endpoint's API and admin keys
    http.py       small HTTP helpers (readiness, status, log streams)
    waiting.py    wait_until: every poll with a deadline
    atomic.py     files replaced in one rename
    transfer.py   chunked copies and their progress bar
    shares.py     SyncTarget (a provider's file share), a local folder as one, folder swaps
    sync.py       changed-files-only sync with a manifest on the share
    build.py      the tuneserve source tree deploy puts on the share
    processes.py  detached process groups: start, check, terminate; their logs (tail, follow)
    local.py      the local provider: a share folder, detached replicas, atomic switch
    proxy.py      the local endpoint: a loopback TCP proxy following a routes file
    azure.py      the Azure Container Apps provider (optional extra)
    k8s/          the Kubernetes provider: the objects, infra/kubernetes/ as YAML, provision
    adapters.py   `tuneserve adapters`: adapter folders onto a share or a server's root, and the
                  servers' admin API (/v1/adapters) told per replica

A new provider: a `base.Provider` subclass (with its ProvisionRequest subclass for its own
flags) added to registry.PROVIDERS.
"""
