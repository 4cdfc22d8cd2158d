"""A loopback HTTP STAND-IN for the few Azure REST endpoints the Azure provider calls. It is not
Azure and proves nothing about Azure's behaviour: it records what the real SDK clients send and
answers in the documented wire shapes, so the tests can check that the provider sends the right
requests (ARM deployment body, revision suffix PATCH, file uploads) and reads the answers right.

A deployment is checked and run the way ARM would read the template, as far as tuneserve's
templates need: every parameter without a default must be supplied (the `@secure()` apiKey and
adminKey included: a hand deployment asks for them), no unknown parameter, types and minValue
checked, secure strings non-empty; then the template's own expressions are evaluated
(`arm_eval`: parameters, variables, format, max, sub, uniqueString via tuneserve's
reimplementation, resourceId, reference ...), so the environment's GPU profile, the app's
scale, secrets and env vars and the outputs are what the template computes, not what a test
assumes. Every `secretRef` must name a secret with a value. Output names come back with their
first letter lowercased, as ARM does at times (Azure/azure-dev#512).

ARM (base_url = http://127.0.0.1:PORT):
  HEAD/PUT  /subscriptions/{s}/resourcegroups/{rg}
  PUT       .../providers/Microsoft.Resources/deployments/{name}   -> outputs (Succeeded at once)
  GET       .../providers/Microsoft.App/managedEnvironments/{env}  404 until deployed/seeded
  GET/PATCH .../providers/Microsoft.App/containerApps/{app}        PATCH makes a new revision
  GET       .../containerApps/{app}/revisions/{rev}                Running/Healthy unless told
  POST      .../containerApps/{app}/revisions/{rev}/deactivate
  POST      .../containerApps/{app}/revisions/{rev}/restart        new replicas, later createdTime
  GET       .../containerApps/{app}/revisions/{rev}/replicas
  POST      .../containerApps/{app}/getAuthtoken
  GET       /logstream/...                                         the log stream (per replica)
  GET       /app/health, /app/ready, /app/v1/models                the app's endpoint
  GET/POST  /app/v1/adapters, DELETE /app/v1/adapters/{name}       its admin API (recorded)
The app's endpoint checks keys like `tuneserve serve` given the secrets as TUNESERVE_API_KEY /
TUNESERVE_ADMIN_KEY: /v1 needs either key, the admin routes the admin key. The app's FQDN is
`{app}.stand-in.invalid`; tests point ACA_APP_ENDPOINT at /app here instead, as DNS would.
File REST (Azurite-style account URL http://127.0.0.1:PORT/devstoreaccount1): list directory,
create directory, rename directory, delete (empty) directory, create file, put range, get
properties, download, delete.
Faults (`StandIn.faults`) make chosen calls answer an ARM error, to test the error handling.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse
from xml.sax.saxutils import escape

from tuneserve.deploy import naming

ACCOUNT = "devstoreaccount1"
LOCATION = "westus3"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class Fault:
    """Answer `status` with an ARM error body to the next `times` calls matching."""

    method: str
    pattern: str  # re.search on the path, case-insensitive
    status: int
    code: str
    message: str = "injected by the stand-in"
    times: int = 1


@dataclass
class StandIn:
    port: int = 0
    groups: set[str] = field(default_factory=set)
    requests: list[Recorded] = field(default_factory=list)
    files: dict[str, bytearray] = field(default_factory=dict)  # "share/dir/file" -> bytes
    stamps: dict[str, int] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)  # "share/dir"
    app: dict[str, Any] = field(default_factory=dict)
    environments: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> resource
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # id (lower) -> properties
    secrets: dict[str, str] = field(default_factory=dict)  # the app's secrets, with values
    revisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    replicas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # revision -> list
    replicas_per_revision: int = 1
    fail_next_revision: bool = False
    fail_restart: bool = False
    deactivated: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    clock: int = 0
    adapters: dict[str, str] = field(default_factory=dict)  # loaded through /app/v1/adapters
    faults: list[Fault] = field(default_factory=list)
    stop_streams: threading.Event = field(default_factory=threading.Event)
    deployments: list[dict[str, Any]] = field(default_factory=list)  # evaluated parameters
    outputs: dict[str, Any] = field(default_factory=dict)  # the last deployment's, as sent

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def serving(self) -> str | None:
        return self.app.get("properties", {}).get("latestReadyRevisionName")

    def env_var(self, name: str) -> str | None:
        """An env var of the app's container as a replica would see it (secretRef resolved)."""
        containers = self.app.get("properties", {}).get("template", {}).get("containers") or []
        for var in (containers[0].get("env") or []) if containers else []:
            if var.get("name") == name:
                ref = var.get("secretRef")
                return self.secrets.get(ref) if ref else var.get("value")
        return None

    def seed_environment(self, name: str, gpu_maximum_count: int, rg: str = "rg-1") -> None:
        """An environment that exists before provisioning (e.g. the fine-tuning step's)."""
        self.environments[name] = {
            "id": f"/subscriptions/sub-1/resourceGroups/{rg}/providers/Microsoft.App/"
            f"managedEnvironments/{name}",
            "name": name,
            "location": LOCATION,
            "properties": {
                "provisioningState": "Succeeded",
                "workloadProfiles": [
                    {"workloadProfileType": "Consumption", "name": "Consumption"},
                    {
                        "workloadProfileType": "NC24-A100",
                        "name": "GPU",
                        "minimumCount": 0,
                        "maximumCount": gpu_maximum_count,
                    },
                ],
            },
        }

    def tick(self) -> str:
        """The next moment of the stand-in's clock, as Azure writes a createdTime."""
        self.clock += 1
        return (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.clock)).isoformat()


def start(state: StandIn) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


# --- ARM template expressions ------------------------------------------------------------------


class ArmError(Exception):
    """A template ARM would refuse: (HTTP status, error code, message)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


_TOKEN = re.compile(r"\s*(?:('(?:[^']|'')*')|(-?\d+)|([A-Za-z_][A-Za-z0-9_]*)|(.))")


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            break
        pos = m.end()
        if m.group(1) is not None:
            out.append(("str", m.group(1)[1:-1].replace("''", "'")))
        elif m.group(2) is not None:
            out.append(("int", int(m.group(2))))
        elif m.group(3) is not None:
            out.append(("name", m.group(3)))
        elif m.group(4).strip():
            out.append(("op", m.group(4)))
    return out


@dataclass
class ArmScope:
    """What a template's expressions can see."""

    subscription: str
    resource_group: str
    parameters: dict[str, Any]  # evaluated (lazily, see ArmScope.parameter)
    template: dict[str, Any]
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # id (lower) -> props
    _evaluating: set[str] = field(default_factory=set)

    def parameter(self, name: str) -> Any:
        if name in self.parameters:
            return self.parameters[name]
        spec = self.template.get("parameters", {}).get(name)
        if spec is None:
            raise ArmError("InvalidTemplate", f"parameters('{name}'): no such parameter")
        if "defaultValue" not in spec:
            raise ArmError(
                "InvalidTemplateDeployment",
                f"The value for the template parameter '{name}' is not provided.",
            )
        if name in self._evaluating:
            raise ArmError("InvalidTemplate", f"parameter '{name}' refers to itself")
        self._evaluating.add(name)
        value = arm_value(spec["defaultValue"], self)
        self._evaluating.discard(name)
        self.parameters[name] = value
        return value

    def variable(self, name: str) -> Any:
        variables = self.template.get("variables", {})
        if name not in variables:
            raise ArmError("InvalidTemplate", f"variables('{name}'): no such variable")
        return arm_value(variables[name], self)

    def resource_id(self, kind: str, *names: str) -> str:
        namespace, *types = kind.split("/")
        if len(types) != len(names):
            raise ArmError("InvalidTemplate", f"resourceId('{kind}', ...) needs {len(types)} names")
        path = "/".join(f"{t}/{n}" for t, n in zip(types, names, strict=True))
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/{namespace}/{path}"
        )


def _call(name: str, args: list[Any], scope: ArmScope) -> Any:
    lname = name.lower()
    if lname == "parameters":
        return scope.parameter(args[0])
    if lname == "variables":
        return scope.variable(args[0])
    if lname == "format":
        return re.sub(r"\{(\d+)\}", lambda m: str(args[1 + int(m.group(1))]), args[0])
    if lname == "concat":
        return "".join(str(a) for a in args)
    if lname == "substring":
        return args[0][args[1] : args[1] + args[2]]
    if lname == "uniquestring":
        return naming.unique_string(*args)
    if lname == "resourcegroup":
        return {
            "id": naming.resource_group_id(scope.subscription, scope.resource_group),
            "name": scope.resource_group,
            "location": LOCATION,
        }
    if lname == "subscription":
        return {"subscriptionId": scope.subscription}
    if lname == "max":
        return max(args)
    if lname == "min":
        return min(args)
    if lname == "sub":
        return args[0] - args[1]
    if lname == "add":
        return args[0] + args[1]
    if lname == "join":
        return args[1].join(args[0])
    if lname == "resourceid":
        return scope.resource_id(*args)
    if lname == "reference":
        found = scope.resources.get(str(args[0]).lower())
        if found is None:
            raise ArmError("ResourceNotFound", f"reference('{args[0]}'): not deployed", 404)
        return found
    if lname == "listkeys":
        return {"keys": [{"value": "stand-in-key"}], "primarySharedKey": "stand-in-key"}
    raise ArmError("InvalidTemplate", f"the stand-in does not evaluate {name}()")


def arm_eval(expression: str, scope: ArmScope) -> Any:
    """Evaluate one ARM template expression ("[...]" included)."""
    tokens = _tokens(expression.strip()[1:-1])
    pos = 0

    def peek() -> tuple[str, Any] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(kind: str, value: Any = None) -> Any:
        nonlocal pos
        token = peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            raise ArmError("InvalidTemplate", f"cannot parse {expression!r} at token {pos}")
        pos += 1
        return token[1]

    def expr() -> Any:
        token = peek()
        if token is None:
            raise ArmError("InvalidTemplate", f"cannot parse {expression!r}")
        if token[0] in ("str", "int"):
            value = take(token[0])
        else:
            name = take("name")
            take("op", "(")
            args = []
            while peek() != ("op", ")"):
                args.append(expr())
                if peek() == ("op", ","):
                    take("op", ",")
            take("op", ")")
            value = _call(name, args, scope)
        while peek() in (("op", "."), ("op", "[")):
            if take("op") == ".":
                key = take("name")
                value = _member(value, key, expression)
            else:
                index = expr()
                take("op", "]")
                value = value[index]
        return value

    value = expr()
    if pos != len(tokens):
        raise ArmError("InvalidTemplate", f"cannot parse {expression!r}: trailing tokens")
    return value


def _member(value: Any, key: str, expression: str) -> Any:
    if isinstance(value, dict):
        for k, v in value.items():  # ARM property access ignores case
            if k.lower() == key.lower():
                return v
    raise ArmError("InvalidTemplate", f"{expression}: no property {key!r}")


def arm_value(value: Any, scope: ArmScope) -> Any:
    """A template value with its expressions evaluated (a string "[...]", not "[[...")."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        if value.startswith("[["):
            return value[1:]
        return arm_eval(value, scope)
    if isinstance(value, dict):
        return {k: arm_value(v, scope) for k, v in value.items()}
    if isinstance(value, list):
        return [arm_value(v, scope) for v in value]
    return value


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "securestring": (str,),
    "int": (int,),
    "bool": (bool,),
    "array": (list,),
    "object": (dict,),
    "secureobject": (dict,),
}


def check_parameters(template: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The supplied parameter values, or ArmError the way ARM refuses a deployment."""
    declared = template.get("parameters", {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ArmError(
            "InvalidTemplate",
            f"The template parameters {', '.join(repr(u) for u in unknown)} are not valid; they "
            "are not present in the original template.",
        )
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        if name not in given:
            if "defaultValue" not in spec:
                raise ArmError(
                    "InvalidTemplateDeployment",
                    f"The value for the template parameter '{name}' is not provided.",
                )
            continue
        entry = given[name]
        if not isinstance(entry, dict) or "value" not in entry:
            raise ArmError("InvalidTemplate", f"parameter '{name}': expected {{'value': ...}}")
        value = entry["value"]
        kind = spec["type"].lower()
        if (
            value is None
            or not isinstance(value, _TYPES[kind])
            or (kind == "int" and isinstance(value, bool))
        ):
            raise ArmError(
                "InvalidTemplate", f"parameter '{name}' must be of type {spec['type']}: {value!r}"
            )
        if kind == "securestring" and not value:
            raise ArmError("InvalidTemplate", f"secure parameter '{name}' is empty")
        if "minValue" in spec and value < spec["minValue"]:
            raise ArmError(
                "InvalidTemplate", f"parameter '{name}' is {value}, below {spec['minValue']}"
            )
        values[name] = value
    return values


def _handler(s: StandIn) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()
    replica_ids = itertools.count(1)

    def new_replicas(revision: str) -> list[dict[str, Any]]:
        return [
            {
                "name": f"{revision}-{next(replica_ids):05d}",
                "properties": {
                    "runningState": "Running",
                    "createdTime": s.tick(),
                    "containers": [{"name": "inference"}],
                },
            }
            for _ in range(s.replicas_per_revision)
        ]

    def add_revision(revision: str, ok: bool = True) -> None:
        s.revisions[revision] = (
            _revision("Running", "Healthy") if ok else _revision("Failed", "Unhealthy")
        )
        s.replicas[revision] = new_replicas(revision)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(
            self,
            code: int,
            body: Any = None,
            headers: dict[str, str] | None = None,
            raw: bytes | None = None,
        ) -> None:
            data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
            self.send_response(code)
            hdrs = {"Content-Type": "application/json", "x-ms-request-id": "1"}
            hdrs.update(headers or {})
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _arm_error(self, status: int, code: str, message: str) -> None:
            self._reply(status, {"error": {"code": code, "message": message}})

        def _error(self, code: int, error_code: str) -> None:
            body = (
                '<?xml version="1.0" encoding="utf-8"?><Error>'
                f"<Code>{error_code}</Code><Message>{error_code}</Message></Error>"
            )
            self._reply(
                code,
                headers={"x-ms-error-code": error_code, "Content-Type": "application/xml"},
                raw=body.encode(),
            )

        def _dispatch(self) -> None:
            url = urlparse(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body: Any = raw
            if raw and "json" in (self.headers.get("Content-Type") or ""):
                body = json.loads(raw)
            if path.startswith("/logstream"):  # outside the lock: a followed stream stays open
                s.requests.append(Recorded(self.command, path, query, body))
                return self._logstream(path, query)
            with lock:
                s.requests.append(Recorded(self.command, path, query, body))
                for fault in s.faults:
                    if (
                        fault.times > 0
                        and fault.method == self.command
                        and re.search(fault.pattern, path, re.IGNORECASE)
                    ):
                        fault.times -= 1
                        return self._arm_error(fault.status, fault.code, fault.message)
                if path.startswith(f"/{ACCOUNT}/"):
                    return self._files(path[len(ACCOUNT) + 2 :], query, raw)
                if path.startswith("/app/"):
                    return self._app(path[4:], body)
                try:
                    return self._arm(path, body)
                except ArmError as exc:
                    return self._arm_error(exc.status, exc.code, exc.message)

        do_GET = do_PUT = do_PATCH = do_POST = do_HEAD = do_DELETE = _dispatch

        def _logstream(self, path: str, query: dict[str, list[str]]) -> None:
            replica = (
                path.split("/replicas/", 1)[1].split("/", 1)[0] if "/replicas/" in path else ""
            )
            follow = query.get("follow", ["false"])[0] == "true"
            if not follow:
                return self._reply(
                    200, raw=b"line one\nline two\n", headers={"Content-Type": "text/plain"}
                )
            # a followed stream: the lines, then held open until the test lets go (or 20 s)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(f"{replica} says one\n{replica} says two\n".encode())
            self.wfile.flush()
            s.stop_streams.wait(20)
            self.close_connection = True

        # -- ARM --

        def _arm(self, path: str, body: Any) -> None:
            low = path.lower()
            m = re.fullmatch(r"/subscriptions/([^/]+)/resourcegroups/([^/]+)", low)
            if m:
                if self.command == "HEAD":
                    return self._reply(204 if m.group(2) in s.groups else 404)
                s.groups.add(m.group(2))
                return self._reply(
                    201, {"id": path, "name": m.group(2), "location": body["location"]}
                )
            if "/providers/microsoft.resources/deployments/" in low and self.command == "PUT":
                parts = path.split("/")
                return self._deploy(path, parts[2], parts[4], body)
            m = re.search(r"/managedenvironments/([^/]+)$", low)
            if m and self.command == "GET":
                env = next((e for n, e in s.environments.items() if n.lower() == m.group(1)), None)
                if env is None:
                    raise ArmError("ResourceNotFound", f"environment {m.group(1)} not found", 404)
                return self._reply(200, env)
            m = re.search(r"/containerapps/([^/]+)(/.*)?$", low)
            if m:
                if not s.app or s.app["name"].lower() != m.group(1):
                    raise ArmError("ResourceNotFound", f"container app {m.group(1)} not found", 404)
                return self._container_app(m.group(2) or "", body)
            raise ArmError("NotFound", path, 404)

        def _deploy(self, path: str, sub: str, rg: str, body: Any) -> None:
            template = body["properties"]["template"]
            given = check_parameters(template, body["properties"].get("parameters") or {})
            scope = ArmScope(sub, rg, dict(given), template, s.resources)
            for name in template.get("parameters", {}):
                scope.parameter(name)  # defaults evaluated; refuses what ARM would refuse
            s.deployments.append(dict(scope.parameters))
            for resource in template.get("resources", []):
                kind = resource["type"]
                name = arm_value(resource["name"], scope)
                props = arm_value(resource.get("properties", {}), scope)
                rid = scope.resource_id(kind, *name.split("/"))
                if kind == "Microsoft.OperationalInsights/workspaces":
                    props = {**props, "customerId": "stand-in-customer"}
                if kind == "Microsoft.App/managedEnvironments":
                    s.environments[name] = {
                        "id": rid,
                        "name": name,
                        "location": LOCATION,
                        "properties": {**props, "provisioningState": "Succeeded"},
                    }
                if kind == "Microsoft.App/containerApps":
                    props = self._create_app(rid, name, props)
                s.resources[rid.lower()] = props
            outputs = {
                # ARM does not keep the case of output names (Azure/azure-dev#512)
                key[0].lower() + key[1:]: {
                    "type": spec["type"],
                    "value": arm_value(spec["value"], scope),
                }
                for key, spec in (template.get("outputs") or {}).items()
            }
            s.dirs.add(str(scope.parameter("fileShareName")))  # the share exists now
            s.outputs = outputs
            return self._reply(
                200,
                {
                    "id": path,
                    "name": path.rsplit("/", 1)[1],
                    "properties": {"provisioningState": "Succeeded", "outputs": outputs},
                },
            )

        def _create_app(self, rid: str, name: str, props: dict[str, Any]) -> dict[str, Any]:
            """Create or update the app from its evaluated template properties; returns what
            `reference()` sees (no secret values, like a GET)."""
            configuration = props.get("configuration") or {}
            given = {x["name"]: x.get("value") for x in configuration.get("secrets") or []}
            for container in props.get("template", {}).get("containers") or []:
                for var in container.get("env") or []:
                    ref = var.get("secretRef")
                    if ref is not None and not given.get(ref):
                        raise ArmError(
                            "ContainerAppSecretRefNotFound",
                            f"env {var['name']}: secretRef {ref!r} names no secret with a value",
                        )
            s.secrets = {k: str(v) for k, v in given.items()}
            configuration = {
                **configuration,
                "secrets": [{"name": k} for k in given],  # a GET shows names only
                "ingress": {
                    **(configuration.get("ingress") or {}),
                    "fqdn": f"{name}.stand-in.invalid",
                },
            }
            first = s.app.get("properties", {}).get("latestRevisionName") or f"{name}--first"
            state = {
                "provisioningState": "Succeeded",
                "runningStatus": "Running",
                "latestRevisionName": first,
                "latestReadyRevisionName": s.serving() or first,
                "eventStreamEndpoint": f"{s.url}/logstream/subscriptions/x/eventstream",
            }
            app_props = {**props, **state, "configuration": configuration}
            s.app = {"id": rid, "name": name, "location": LOCATION, "properties": app_props}
            if first not in s.revisions:
                add_revision(first)
            return app_props

        def _container_app(self, rest: str, body: Any) -> None:
            props = s.app["properties"]
            if rest == "" and self.command == "GET":
                return self._reply(200, s.app)
            if rest == "" and self.command == "PATCH":
                if "configuration" in body["properties"]:
                    raise ArmError("InvalidRequest", "the stand-in expects template-only PATCHes")
                suffix = body["properties"]["template"]["revisionSuffix"]
                if not re.fullmatch(naming.REVISION_SUFFIX.pattern, suffix):
                    raise ArmError("InvalidRevisionSuffix", f"revision suffix {suffix!r}")
                revision = f"{s.app['name']}--{suffix}"
                if revision in s.revisions:
                    raise ArmError("RevisionAlreadyExists", f"revision {revision} exists", 409)
                props["template"] = body["properties"]["template"]
                props["latestRevisionName"] = revision
                add_revision(revision, ok=not s.fail_next_revision)
                if s.fail_next_revision:
                    s.fail_next_revision = False
                else:
                    props["latestReadyRevisionName"] = revision
                return self._reply(200, s.app)
            if rest == "/getauthtoken":
                return self._reply(200, {"properties": {"token": "stand-in-token"}})
            m = re.fullmatch(r"/revisions/([^/]+)(/[a-z]+)?", rest)
            if m:
                named = next((r for r in s.revisions if r.lower() == m.group(1)), None)
                if named is None:
                    raise ArmError("ResourceNotFound", f"revision {m.group(1)} not found", 404)
                if m.group(2) == "/deactivate":
                    s.deactivated.append(named)
                    s.revisions[named]["active"] = False
                    return self._reply(200)
                if m.group(2) == "/restart":
                    s.restarted.append(named)
                    s.replicas[named] = new_replicas(named)
                    if s.fail_restart:
                        s.revisions[named] = _revision("Failed", "Unhealthy")
                    return self._reply(200)
                if m.group(2) == "/replicas":
                    return self._reply(200, {"value": s.replicas.get(named, [])})
                return self._reply(200, {"name": named, "properties": s.revisions[named]})
            raise ArmError("NotFound", rest, 404)

        # -- the app's endpoint --

        def _authorized(self, rest: str) -> bool:
            api, admin = s.env_var("TUNESERVE_API_KEY"), s.env_var("TUNESERVE_ADMIN_KEY")
            if not rest.startswith("/v1") or not (api or admin):
                return True
            given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            if rest.startswith("/v1/adapters"):
                return given == (admin or api)
            return given in (api, admin)

        def _app(self, rest: str, body: Any) -> None:
            if not self._authorized(rest):
                return self._reply(401, {"error": {"message": "Missing or invalid key"}})
            if rest == "/v1/adapters" and self.command == "POST":
                replaced = body["name"] in s.adapters
                s.adapters[body["name"]] = body["path"]
                card = {"name": body["name"], "path": f"/mount/models/{body['path']}", "rank": 8}
                return self._reply(
                    200, {**card, "target_modules": ["q_proj"], "replaced": replaced}
                )
            if rest == "/v1/adapters":
                data = [{"name": n, "path": f"/mount/models/{p}"} for n, p in s.adapters.items()]
                return self._reply(200, {"root": "/mount/models", "data": data, "errors": []})
            if rest.startswith("/v1/adapters/") and self.command == "DELETE":
                name = rest.rsplit("/", 1)[1]
                if s.adapters.pop(name, None) is None:
                    return self._reply(404, {"error": {"message": f"{name} is not loaded"}})
                return self._reply(200, {"name": name, "object": "adapter", "deleted": True})
            if rest == "/health":
                return self._reply(200, {"status": "ok", "revision": s.serving()})
            if rest == "/ready":
                revision = s.serving()
                up = revision is not None and s.revisions[revision]["healthState"] == "Healthy"
                return self._reply(200 if up else 503, {"ready": up})
            if rest == "/v1/models":
                return self._reply(
                    200, {"data": [{"id": "base"}, {"id": "pirate", "parent": "base"}]}
                )
            return self._reply(404)

        # -- File REST --

        def _files(self, rest: str, query: dict[str, list[str]], raw: bytes) -> None:
            rest = rest.rstrip("/")
            restype, comp = query.get("restype", [""])[0], query.get("comp", [""])[0]
            if restype == "directory" and comp == "list" and self.command == "GET":
                if rest not in s.dirs:
                    return self._error(404, "ResourceNotFound")
                prefix = rest + "/"
                entries = []
                for d in sorted(s.dirs):
                    if d.startswith(prefix) and "/" not in d[len(prefix) :]:
                        entries.append(
                            f"<Directory><Name>{escape(d[len(prefix) :])}</Name>"
                            "<Properties /></Directory>"
                        )
                for f, data in sorted(s.files.items()):
                    if f.startswith(prefix) and "/" not in f[len(prefix) :]:
                        entries.append(
                            f"<File><Name>{escape(f[len(prefix) :])}</Name><Properties>"
                            f"<Content-Length>{len(data)}</Content-Length>"
                            f"<LastWriteTime>{_iso(s.stamps[f])}</LastWriteTime><Last-Modified>"
                            f"{formatdate(1_700_000_000 + s.stamps[f], usegmt=True)}"
                            "</Last-Modified></Properties></File>"
                        )
                xml = (
                    '<?xml version="1.0" encoding="utf-8"?><EnumerationResults '
                    f'ServiceEndpoint="{s.url}/{ACCOUNT}/" ShareName="{rest.split("/")[0]}">'
                    f"<Entries>{''.join(entries)}</Entries><NextMarker /></EnumerationResults>"
                )
                return self._reply(
                    200, raw=xml.encode(), headers={"Content-Type": "application/xml"}
                )
            if restype == "directory" and comp == "rename" and self.command == "PUT":
                source = unquote(urlparse(self.headers["x-ms-file-rename-source"]).path)
                source = source.removeprefix(f"/{ACCOUNT}/").rstrip("/")
                if source not in s.dirs:
                    return self._error(404, "ResourceNotFound")
                if rest in s.dirs or rest in s.files:
                    return self._error(409, "ResourceAlreadyExists")

                def moved(path: str) -> str:
                    return rest + path[len(source) :]

                inside = [p for p in s.dirs if p == source or p.startswith(source + "/")]
                s.dirs.difference_update(inside)
                s.dirs.update(moved(p) for p in inside)
                for path in [p for p in s.files if p.startswith(source + "/")]:
                    s.files[moved(path)] = s.files.pop(path)
                    s.stamps[moved(path)] = s.stamps.pop(path)
                return self._reply(200, headers=self._stamp_headers(rest))
            if restype == "directory" and self.command == "DELETE":
                if rest not in s.dirs:
                    return self._error(404, "ResourceNotFound")
                under = rest + "/"
                if any(p.startswith(under) for p in (*s.dirs, *s.files)):
                    return self._error(409, "DirectoryNotEmpty")
                s.dirs.discard(rest)
                return self._reply(202)
            if restype == "directory" and self.command == "PUT":
                if rest in s.dirs:
                    return self._error(409, "ResourceAlreadyExists")
                s.dirs.add(rest)
                return self._reply(201, headers=self._stamp_headers(rest))
            if self.command == "PUT" and comp == "range":
                start, end = (int(x) for x in self.headers["x-ms-range"].split("=")[1].split("-"))
                s.files[rest][start : end + 1] = raw
                s.clock += 1
                s.stamps[rest] = s.clock
                return self._reply(201, headers=self._stamp_headers(rest))
            if self.command == "PUT":
                s.files[rest] = bytearray(int(self.headers["x-ms-content-length"]))
                s.clock += 1
                s.stamps[rest] = s.clock
                return self._reply(201, headers=self._stamp_headers(rest))
            if rest not in s.files:
                return self._error(404, "ResourceNotFound")
            if self.command == "DELETE":
                del s.files[rest]
                return self._reply(202)
            content = bytes(s.files[rest])
            headers = {
                **self._stamp_headers(rest),
                "x-ms-type": "File",
                "Content-Type": "application/octet-stream",
            }
            if self.command == "HEAD":
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                return None
            wanted = self.headers.get("x-ms-range") or self.headers.get("Range")
            if wanted and content:
                lo, _, hi = wanted.split("=")[1].partition("-")
                first, last = int(lo), min(int(hi or len(content) - 1), len(content) - 1)
                headers["Content-Range"] = f"bytes {first}-{last}/{len(content)}"
                return self._reply(206, raw=content[first : last + 1], headers=headers)
            if wanted:  # Azure answers 416 for a range of an empty file
                return self._error(416, "InvalidRange")
            return self._reply(200, raw=content, headers=headers)

        def _stamp_headers(self, rest: str) -> dict[str, str]:
            stamp = s.stamps.get(rest, 0)
            return {
                "ETag": f'"0x{stamp:x}"',
                "Last-Modified": formatdate(1_700_000_000 + stamp, usegmt=True),
                "x-ms-file-last-write-time": _iso(stamp),
            }

    return H


def _iso(stamp: int) -> str:
    return f"2026-01-01T00:00:{stamp % 60:02d}.{stamp:07d}Z"


def _revision(running: str, health: str) -> dict[str, Any]:
    return {
        "provisioningState": "Provisioned" if running != "Failed" else "Failed",
        "runningState": running,
        "healthState": health,
        "active": True,
    }
