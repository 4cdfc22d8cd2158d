"""HOW it reaches a remote machine: the infra/ files, providers (local, azure), workspace -> share
sync, readiness waits. Runs `tuneserve serve` remotely; never imports engine/ or server/.

    infra.py     pydantic models of infra/*.json; errors with file, line and field
    naming.py    Azure naming rules; uniqueString() and the template's derived names
    scaffold.py  `tuneserve init` (and --demo's AI Toolkit layout)
    base.py      the Provider protocol, ProvisionRequest, results
    http.py      small stdlib HTTP helpers (readiness, status)
    workflow.py  provision: resolve subscription/group/names, call the provider, write the config
    sync.py      changed-files-only sync with a manifest on the share
    build.py     the tuneserve source tree deploy puts on the share
    local.py     the local provider: a share folder, detached replicas, atomic switch
    proxy.py     the local endpoint: a loopback TCP proxy following a routes file
    azure.py     the Azure Container Apps provider (optional extra)
    adapters.py  `tuneserve adapters`: adapter folders onto a share or a server's root, and the
                 servers' admin API (/v1/adapters) told per replica
"""
