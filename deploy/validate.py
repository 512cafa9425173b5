#!/usr/bin/env python3
"""Offline validation of deploy/: renders the kustomize bases and the Helm chart (default and
non-default values, two releases side by side), lints the chart, validates every object against
the Kubernetes OpenAPI schemas (strict: unknown fields fail), and checks that every kiam flag
the manifests pass exists in the binaries' --help; that the chart's values, its schema and its
README agree; that the kustomize alerts are the chart's; that the alerts and the dashboard only
use metrics the binaries register; the pod security of both components; and what the
admission policies admit and refuse, by evaluating their CEL. Run by
`cargo xtask test`.

usage: validate.py KIAM_AGENT_BIN KIAM_SERVER_BIN
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import celpy
import helm_python
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
# Custom resources: no schema ships with kubernetes-validate; their shape is checked by name.
CRD_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
NON_DEFAULT = {
    "fullnameOverride": "platform-iam",
    "clusterDomain": "corp.example",
    "image": {
        "agent": {"repository": "registry.example.com/kiam-agent", "digest": "sha256:" + "a" * 64},
        "server": {"repository": "registry.example.com/kiam-server", "tag": "0.1.0-rc1"},
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "registry"}],
    "server": {
        "replicas": 3,
        "roleBaseArn": "arn:aws:iam::123456789012:role/",
        "assumeRoleArn": "arn:aws:iam::123456789012:role/kiam-gateway",
        "sessionTags": True,
        "defaultRole": "app-default",
        "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kiam-server"},
        "extraArgs": ["--prefetch-workers=8"],
        "priorityClassName": "platform-critical",
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}],
        "nodeMetadataPassthrough": [],
    },
    "agent": {
        "requireImdsv2": True,
        "address": "",
        # A regular expression with ` #` in it: YAML cuts an unquoted argument there.
        "allowRouteRegexp": "^/latest/meta-data/(placement/region|tags/instance/team #1)$",
        "extraArgs": ["--hedge-after=100ms"],
        "startupTaint": True,
    },
    "tls": {"certManager": False},
    "monitoring": {
        "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
    "networkPolicy": {"enabled": False},
    "restrictHostNetwork": {"enabled": True, "exemptNamespaces": ["kube-system", "monitoring"]},
    "logFormat": "text",
}
CHART = DEPLOY / "helm" / "kiam"
REPO = DEPLOY.parent


def fail(message):
    print(f"deploy validation FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def render_chart(values, release="kiam", namespace="kiam"):
    chart = helm_python.chart.Chart.load(str(CHART))
    files = chart.render(values, name=release, namespace=namespace, is_install=True)
    notes = [text for path, text in files.items() if path.endswith("NOTES.txt")]
    if not notes or f"installed as" not in notes[0]:
        fail(f"helm ({release}): NOTES.txt did not render")
    return "\n---\n".join(text for path, text in files.items() if not path.endswith("NOTES.txt"))


def rendered_sets():
    sets = {}
    for overlay in [
        "base",
        "with-cert-manager",
        "with-monitoring",
        "with-startup-taint",
        "with-restricted-host-network",
    ]:
        out = subprocess.run(
            ["kubectl", "kustomize", str(DEPLOY / "kustomize" / overlay)],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            fail(f"kubectl kustomize {overlay}: {out.stderr.strip()}")
        sets[f"kustomize/{overlay}"] = out.stdout
    sets["examples"] = (DEPLOY / "examples" / "namespace-and-pod.yaml").read_text()
    lint = helm_python.chart.lint(str(CHART), strict=True)
    if lint.get("errors"):
        fail(f"helm lint: {lint['errors']}")
    for label, values in [("default", {}), ("non-default", NON_DEFAULT)]:
        sets[f"helm/{label}"] = render_chart(values)
    return sets


def schema_leaves(values, schema, prefix=""):
    """The chart's values, flattened where the schema names the keys (a free-form map, such
    as nodeSelector, is one value); fails where values and schema disagree."""
    leaves = []
    properties = schema.get("properties", {})
    for key, value in values.items():
        path = f"{prefix}{key}"
        sub = properties.get(key)
        if sub is None:
            fail(f"values.yaml: {path} is not in values.schema.json")
        if isinstance(value, dict) and "properties" in sub:
            leaves += schema_leaves(value, sub, path + ".")
        else:
            leaves.append(path)
    for key in properties:
        if key not in values:
            fail(f"values.schema.json: {prefix}{key} is not in values.yaml")
    return leaves


def check_chart_docs():
    """Every value is in the schema and in the chart README's table, and the README documents
    nothing else."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = schema_leaves(values, schema)
    readme = (CHART / "README.md").read_text().split("## Values", 1)[-1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, re.M))
    for leaf in leaves:
        if leaf not in documented:
            fail(f"deploy/helm/kiam/README.md does not document `{leaf}`")
    for extra in sorted(documented - set(leaves)):
        fail(f"deploy/helm/kiam/README.md documents `{extra}`, which values.yaml does not have")
    # The schema is enforced: a typo in a key fails.
    try:
        render_chart({"server": {"replica": 3}})
    except Exception:  # noqa: BLE001 - helm's error type is not exported
        pass
    else:
        fail("values.schema.json accepted an unknown key (server.replica)")


CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "Namespace",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


def check_two_releases():
    """Releases never share an object: two in one namespace share no name, and two of the same
    name in different namespaces share no cluster-wide name (ClusterRole and its binding)."""
    def objects(release, namespace):
        docs = [d for d in yaml.safe_load_all(render_chart({}, release=release, namespace=namespace)) if d]
        for doc in docs:
            labels = doc["metadata"].get("labels") or {}
            for key in ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"]:
                if key not in labels:
                    fail(f"helm ({release}): {doc['kind']} {doc['metadata']['name']} has no {key} label")
        return {(d["kind"], None if d["kind"] in CLUSTER_SCOPED else namespace, d["metadata"]["name"]) for d in docs}
    first = objects("kiam", "kiam")
    for release, namespace in [("kiam-canary", "kiam"), ("kiam", "platform")]:
        clash = first & objects(release, namespace)
        if clash:
            fail(f"releases kiam/kiam and {release}/{namespace} collide: {sorted(clash, key=str)}")


def check_quoting():
    """Arguments reach the binaries as written: the non-default regex with ` #` survives."""
    docs = [d for d in yaml.safe_load_all(render_chart(NON_DEFAULT)) if d]
    agent = next(d for d in docs if d["kind"] == "DaemonSet")
    args = agent["spec"]["template"]["spec"]["containers"][0]["args"]
    want = "--allow-route-regexp=" + NON_DEFAULT["agent"]["allowRouteRegexp"]
    if want not in args:
        fail(f"helm: the agent's args lost part of a value: {args}")
    pull = [d for d in docs if d.get("kind") in ("DaemonSet", "Deployment")]
    for doc in pull:
        spec = doc["spec"]["template"]["spec"]
        if spec.get("imagePullSecrets") != [{"name": "registry"}]:
            fail(f"helm: {doc['kind']} has no imagePullSecrets")
        image = spec["containers"][0]["image"]
        if doc["kind"] == "DaemonSet" and not image.endswith("@sha256:" + "a" * 64):
            fail(f"helm: the agent's image {image} is not pinned by digest")
        if doc["kind"] == "Deployment" and not image.endswith(":0.1.0-rc1"):
            fail(f"helm: the server's image {image} is not the tag asked for")
    host = next(e["value"] for e in agent["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "KIAM_SERVERS")
    if not host.endswith(".svc.corp.example:8443"):
        fail(f"helm: clusterDomain is not used: {host}")


def registered_metrics():
    """Metric names the binaries register, with the suffixes Prometheus sees."""
    names = set()
    for component in ["agent", "server"]:
        source = (REPO / f"kiam-{component}" / "src" / "metrics.rs").read_text()
        # The name is the first string argument of a registration, of a collector's
        # descriptor, or of the agent's scalar() helper (whose first argument is the encoder).
        found = re.findall(r'\b(?:register|encode_descriptor|scalar)\(\s*(?:&mut \w+,\s*)?"([a-z_]+)"', source)
        for name in found:
            full = f"kiam_{component}_{name}"
            names |= {full, full + "_total", full + "_bucket", full + "_count", full + "_sum"}
    return names


def check_alerts_and_dashboard():
    rules = yaml.safe_load((CHART / "files" / "kiam.rules.yaml").read_text())
    kustomized = yaml.safe_load((DEPLOY / "kustomize" / "monitoring" / "prometheusrule.yaml").read_text())
    if kustomized["spec"]["groups"] != rules["groups"]:
        fail("deploy/kustomize/monitoring/prometheusrule.yaml differs from the chart's files/kiam.rules.yaml")
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    for want in ["KiamAgentNotReady", "KiamRefusedConnectionsRising", "KiamAssumeRoleFailures",
                 "KiamCredentialsNearMinValidity", "KiamNoServerReachable"]:
        if want not in alerts:
            fail(f"kiam.rules.yaml has no {want}")
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    known = registered_metrics()
    for expr in exprs:
        for metric in re.findall(r"\bkiam_(?:agent|server)_[a-z_]+", expr):
            if metric not in known:
                fail(f"{metric} (in {expr!r}) is not a metric the binaries register")


def check_pod_security(name, docs):
    """The servers meet Pod Security's restricted level; the agent runs with RuntimeDefault
    seccomp and only the capabilities it needs; the namespace kustomize creates is privileged
    (the agent runs there) and no other is touched."""
    for doc in docs:
        kind = doc.get("kind")
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        where = f"{name}: {kind} {doc.get('metadata', {}).get('name')}"
        if kind == "Namespace" and name.startswith("kustomize/"):
            labels = doc["metadata"].get("labels") or {}
            if labels.get("pod-security.kubernetes.io/enforce") != "privileged":
                fail(f"{where}: the agent's namespace must be labelled privileged")
        if kind not in ("Deployment", "DaemonSet"):
            continue
        pod = spec.get("securityContext") or {}
        if (pod.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            fail(f"{where}: no seccompProfile RuntimeDefault")
        for c in spec.get("containers") or []:
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
                fail(f"{where}: {c['name']} may escalate privileges")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                fail(f"{where}: {c['name']} does not drop all capabilities")
            added = set((sc.get("capabilities") or {}).get("add") or [])
            if kind == "Deployment":
                if added or not pod.get("runAsNonRoot"):
                    fail(f"{where}: the server must run as non-root with no capability (restricted)")
            elif added != {"BPF", "NET_ADMIN", "SYS_ADMIN", "DAC_READ_SEARCH"}:
                fail(f"{where}: the agent adds {sorted(added)}")
        if kind == "Deployment":
            strategy = doc["spec"].get("strategy", {}).get("rollingUpdate", {})
            if strategy.get("maxSurge") not in (0, "0") or strategy.get("maxUnavailable") not in (1, "1"):
                fail(f"{where}: a rollout must replace one server at a time without a surge")
            affinity = spec.get("affinity", {}).get("podAntiAffinity", {})
            if affinity.get("requiredDuringSchedulingIgnoredDuringExecution"):
                fail(f"{where}: required anti-affinity stalls rollouts on small clusters")


def check_no_admin_service(name, docs):
    for doc in docs:
        if doc.get("kind") == "Service":
            ports = {p.get("name") for p in doc["spec"].get("ports", [])}
            if ports != {"grpc"}:
                fail(f"{name}: Service {doc['metadata']['name']} exposes {sorted(ports)}; only gRPC")


def flags_of(binary, *args):
    out = subprocess.run([binary, *args, "--help"], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"{binary} --help: {out.stderr.strip()}")
    return set(re.findall(r"--[a-z0-9-]+", out.stdout)), set(re.findall(r"\[env: (KIAM_[A-Z0-9_]+)", out.stdout))


def check_node_safety(where, pod_spec):
    """The agent's pins must live on the host's bpffs: an init container mounts it when the
    node has none (the only place with bidirectional propagation), the agent sees it with
    HostToContainer; the same init container reserves the agent's port."""
    init = pod_spec.get("initContainers") or []
    prepare = [c for c in init if (c.get("args") or [None])[0] == "prepare-node"]
    if not prepare:
        fail(f"{where}: no init container runs `kiam-agent prepare-node`")
    agent = next(c for c in pod_spec["containers"] if c.get("args", [None])[0] == "run")
    port = next((a.split("=", 1)[1] for a in agent.get("args") or [] if a.startswith("--port=")), "8186")
    if f"--port={port}" not in prepare[0]["args"]:
        fail(f"{where}: prepare-node does not reserve the agent's port {port}")
    for container in pod_spec.get("containers") or []:
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPropagation") == "Bidirectional":
                fail(f"{where}: {container['name']} must not use Bidirectional propagation")
            if mount["mountPath"] == "/sys/fs/bpf" and mount.get("mountPropagation") != "HostToContainer":
                fail(f"{where}: {container['name']} must see the host's /sys/fs/bpf (HostToContainer)")


def check_node_identity(where, pod_spec):
    """The agent proves its node with a projected service-account token, audience kiam, that
    it reads where the manifest mounts it."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    agent = next(c for c in pod_spec["containers"] if c.get("args", [None])[0] == "run")
    env = {e["name"]: e.get("value") for e in agent.get("env") or []}
    token_file = env.get("KIAM_TOKEN_FILE")
    if not token_file:
        fail(f"{where}: the agent reads no KIAM_TOKEN_FILE")
    for mount in agent.get("volumeMounts") or []:
        if token_file.startswith(mount["mountPath"].rstrip("/") + "/"):
            sources = (volumes.get(mount["name"], {}).get("projected") or {}).get("sources") or []
            tokens = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
            name = token_file[len(mount["mountPath"].rstrip("/")) + 1:]
            if any(t.get("path") == name and t.get("audience") for t in tokens):
                return [t["audience"] for t in tokens if t.get("path") == name][0]
    fail(f"{where}: {token_file} is not a projected service-account token")


def check_identity_on(name, docs):
    """Node identity is on: the agent sends a projected token with the audience the servers
    expect, the servers may review it, and nothing turns the check off."""
    kinds = {d.get("kind") for d in docs}
    if "DaemonSet" not in kinds:
        return
    audience = None
    server_audience = "kiam"
    for doc in docs:
        pod_spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        if doc.get("kind") == "DaemonSet":
            audience = check_node_identity(f"{name}: DaemonSet", pod_spec)
        if doc.get("kind") == "Deployment":
            for container in pod_spec.get("containers") or []:
                env = {e["name"]: e.get("value") for e in container.get("env") or []}
                server_audience = env.get("KIAM_AGENT_TOKEN_AUDIENCE", server_audience)
                if "--allow-unidentified-agents" in (container.get("args") or []) or env.get("KIAM_ALLOW_UNIDENTIFIED_AGENTS"):
                    fail(f"{name}: the servers accept agents without node identity")
    if audience != server_audience:
        fail(f"{name}: the agent's token audience {audience!r} is not the servers' {server_audience!r}")
    rules = [r for d in docs if d.get("kind") == "ClusterRole" for r in d.get("rules") or []]
    if not any("authentication.k8s.io" in r.get("apiGroups", []) and "tokenreviews" in r.get("resources", [])
               and "create" in r.get("verbs", []) for r in rules):
        fail(f"{name}: the servers may not create TokenReviews")


def check_probes(name, docs):
    """The kubelet's probes never share the admin listener with pods: they are exec probes
    on the probe socket, which lives in a volume of the container's own."""
    for doc in docs:
        if doc.get("kind") not in ("DaemonSet", "Deployment"):
            continue
        spec = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for container in spec["containers"]:
            where = f"{name}: {doc['kind']} {container['name']}"
            env = {e["name"]: e.get("value") for e in container.get("env") or []}
            socket = env.get("KIAM_PROBE_SOCKET")
            if not socket:
                fail(f"{where}: no KIAM_PROBE_SOCKET")
            mounts = [m for m in container.get("volumeMounts") or []
                      if socket.startswith(m["mountPath"].rstrip("/") + "/")]
            if not mounts or "emptyDir" not in volumes.get(mounts[0]["name"], {}):
                fail(f"{where}: the probe socket {socket} is not in an emptyDir of the container")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                command = (probe.get("exec") or {}).get("command") or []
                if command[1:2] != ["probe"]:
                    fail(f"{where}: {kind} must be `<binary> probe live|ready`, not {probe}")


def check_server_network_policy(name, docs):
    """Where servers are rendered, a NetworkPolicy admits their admin port from Prometheus
    only (on by default in both flavours)."""
    if not any(d.get("kind") == "Deployment" for d in docs):
        return
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    if not policies:
        fail(f"{name}: no NetworkPolicy for the servers")
    for rule in policies[0]["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports") or []}
        if 9620 in ports and not rule.get("from"):
            fail(f"{name}: the servers' admin port is open to every pod")


def admission(policy, request):
    """What the API server's ValidatingAdmissionPolicy plugin decides, by evaluating the
    policy's CEL with cel-python: None when the policy does not match the request, else the
    messages of the validations that failed (empty: admitted)."""
    env = celpy.Environment()

    def evaluate(expression, activation):
        return env.program(env.compile(expression)).evaluate(activation)
    activation = {key: celpy.json_to_cel(value) for key, value in request.items()}
    spec = policy["spec"]
    rules = spec["matchConstraints"]["resourceRules"]
    resource = request["request"]["resource"]
    if not any(resource in r["resources"] and request["request"]["operation"] in r["operations"]
               for r in rules):
        return None
    for condition in spec.get("matchConditions") or []:
        if not evaluate(condition["expression"], activation):
            return None
    variables = {}
    for variable in spec.get("variables") or []:
        activation["variables"] = celpy.celtypes.MapType(variables)
        variables[celpy.celtypes.StringType(variable["name"])] = evaluate(variable["expression"], activation)
    activation["variables"] = celpy.celtypes.MapType(variables)
    return [v["message"].strip() for v in spec["validations"]
            if not evaluate(v["expression"], activation)]


def check_host_network_policy(name, docs):
    """Where the host-network policy is rendered, it refuses exactly the host-network pods
    that keep NET_RAW or run privileged (in any container, init and ephemeral too), outside
    kube-system and kiam's own namespace; and it is bound to deny."""
    policies = [d for d in docs if d.get("kind") == "ValidatingAdmissionPolicy"
                and any("pods" in r["resources"] for r in d["spec"]["matchConstraints"]["resourceRules"])]
    if not policies:
        return
    policy = policies[0]
    bindings = [d for d in docs if d.get("kind") == "ValidatingAdmissionPolicyBinding"
                and d["spec"]["policyName"] == policy["metadata"]["name"]]
    if len(bindings) != 1 or bindings[0]["spec"].get("validationActions") != ["Deny"]:
        fail(f"{name}: the host-network policy is not bound to deny")
    agent = next((d for d in docs if d.get("kind") == "DaemonSet"), None)
    own = (agent or {}).get("metadata", {}).get("namespace", "kiam")
    exempt = {v for e in bindings[0]["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
              if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn"
              for v in e["values"]}
    if not {"kube-system", own} <= exempt:
        fail(f"{name}: the host-network policy binds to kube-system or {own} (exempt: {sorted(exempt)})")

    def container(**security):
        return {"name": "c", "image": "i", **({"securityContext": security} if security else {})}
    drop_raw = {"capabilities": {"drop": ["NET_RAW"]}}
    cases = [
        # (what, host network, containers, init containers, ephemeral containers, admitted)
        ("default capabilities", True, [container()], [], [], False),
        ("drops NET_RAW", True, [container(**drop_raw)], [], [], True),
        ("drops ALL", True, [container(capabilities={"drop": ["ALL"]})], [], [], True),
        ("drops and adds NET_RAW", True,
         [container(capabilities={"drop": ["ALL"], "add": ["NET_RAW"]})], [], [], False),
        ("drops NET_RAW, privileged", True, [container(privileged=True, **drop_raw)], [], [], False),
        ("an init container keeps NET_RAW", True, [container(**drop_raw)], [container()], [], False),
        ("an ephemeral container keeps NET_RAW", True, [container(**drop_raw)], [], [container()], False),
        ("pod network, default capabilities", False, [container()], [], [], True),
    ]
    for what, host, containers, init, ephemeral, admitted in cases:
        pod = {"metadata": {"name": "p", "namespace": "tenant"},
               "spec": {"hostNetwork": host, "containers": containers}}
        if init:
            pod["spec"]["initContainers"] = init
        if ephemeral:
            pod["spec"]["ephemeralContainers"] = ephemeral
        if not host:
            del pod["spec"]["hostNetwork"]
        for operation in ("CREATE", "UPDATE"):
            failed = admission(policy, {
                "request": {"resource": "pods", "operation": operation, "subResource": ""},
                "object": pod, "oldObject": pod if operation == "UPDATE" else None})
            if (not failed) != admitted:
                fail(f"{name}: the host-network policy {'refuses' if failed else 'admits'} a pod "
                     f"that {what} on {operation}")


def check_startup_taint_policy(name, policy, account):
    """The policy that holds the agent to its own node, evaluated on the requests an agent
    could make: only removing the start-up taint from its own node is admitted."""
    taint = {"key": "kiam.rs/agent-not-ready", "effect": "NoSchedule"}
    other = {"key": "example.com/other", "effect": "NoSchedule"}

    def node(name, taints, labels=None):
        metadata = {"name": name, **({"labels": labels} if labels else {})}
        return {"metadata": metadata, "spec": {"taints": taints} if taints else {}}
    own = "node-1"
    cases = [
        # (what, user, subresource, old, new, admitted)
        ("removes the taint from its node", account, "", node(own, [taint, other]), node(own, [other]), True),
        ("removes the last taint", account, "", node(own, [taint]), node(own, []), True),
        ("removes the taint from another node", account, "",
         node("node-2", [taint]), node("node-2", []), False),
        ("removes another taint", account, "", node(own, [taint, other]), node(own, []), False),
        ("adds a taint", account, "", node(own, []), node(own, [other]), False),
        ("changes a label", account, "", node(own, [], {"a": "1"}), node(own, [], {"a": "2"}), False),
        ("changes its node's status", account, "status", node(own, []), node(own, []), False),
    ]
    for what, user, subresource, old, new, admitted in cases:
        failed = admission(policy, {
            "request": {"resource": "nodes" if not subresource else "nodes/status",
                        "operation": "UPDATE", "subResource": subresource,
                        "userInfo": {"username": user,
                                     "extra": {"authentication.kubernetes.io/node-name": [own]}}},
            "object": new, "oldObject": old})
        if failed is None or (not failed) != admitted:
            fail(f"{name}: the own-node policy {'refuses' if failed else 'admits'} an agent that {what}")
    other_user = admission(policy, {
        "request": {"resource": "nodes", "operation": "UPDATE", "subResource": "",
                    "userInfo": {"username": "system:node:node-1", "extra": {}}},
        "object": node(own, []), "oldObject": node(own, [taint])})
    if other_user is not None:
        fail(f"{name}: the own-node policy applies to users other than the agent")


def check_startup_taint(name, docs):
    """Where the agent removes the start-up taint, it may patch nodes, and the admission
    policy that holds it to its own node names the agent's own service account (a renamed
    account or namespace would leave the policy matching nobody)."""
    agent = next((d for d in docs if d.get("kind") == "DaemonSet"), None)
    if agent is None:
        return
    spec = agent["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for c in spec["containers"] for e in c.get("env") or []}
    on = env.get("KIAM_REMOVE_STARTUP_TAINT") == "true"
    policies = [d for d in docs if d.get("kind") == "ValidatingAdmissionPolicy"
                and any("nodes" in r["resources"] for r in d["spec"]["matchConstraints"]["resourceRules"])]
    if not on:
        if policies or spec.get("automountServiceAccountToken") is not False:
            fail(f"{name}: the agent has Kubernetes API access without the start-up taint")
        return
    account = f"system:serviceaccount:{agent['metadata'].get('namespace', 'kiam')}:{spec['serviceAccountName']}"
    if spec.get("automountServiceAccountToken") is not True:
        fail(f"{name}: the start-up taint needs the agent's API token")
    if len(policies) != 1:
        fail(f"{name}: the start-up taint ships without its ValidatingAdmissionPolicy")
    policy = policies[0]
    conditions = [c["expression"] for c in policy["spec"].get("matchConditions") or []]
    if conditions != [f"request.userInfo.username == '{account}'"]:
        fail(f"{name}: the policy matches {conditions}, not the agent's account {account}")
    bindings = [d for d in docs if d.get("kind") == "ValidatingAdmissionPolicyBinding"
                and d["spec"]["policyName"] == policy["metadata"]["name"]]
    if len(bindings) != 1 or bindings[0]["spec"].get("validationActions") != ["Deny"]:
        fail(f"{name}: the policy is not bound to deny")
    check_startup_taint_policy(name, policy, account)
    role_bindings = [d for d in docs if d.get("kind") == "ClusterRoleBinding"
                     and any(s.get("name") == spec["serviceAccountName"] for s in d.get("subjects") or [])]
    if not role_bindings:
        fail(f"{name}: nothing lets the agent patch its node")


def main():
    if len(sys.argv) != 3:
        fail(__doc__.strip().splitlines()[-1])
    agent_bin, server_bin = sys.argv[1], sys.argv[2]
    subcommands = {}

    def flags(binary, subcommand):
        if (binary, subcommand) not in subcommands:
            subcommands[(binary, subcommand)] = flags_of(binary, *([subcommand] if subcommand else []))
        return subcommands[(binary, subcommand)]
    check_chart_docs()
    check_two_releases()
    check_quoting()
    check_alerts_and_dashboard()
    counts = {}
    for name, text in rendered_sets().items():
        docs = [d for d in yaml.safe_load_all(text) if d]
        check_identity_on(name, docs)
        check_startup_taint(name, docs)
        check_host_network_policy(name, docs)
        check_probes(name, docs)
        if name != "helm/non-default":
            check_server_network_policy(name, docs)
        check_pod_security(name, docs)
        check_no_admin_service(name, docs)
        if not docs:
            fail(f"{name}: rendered nothing")
        for doc in docs:
            kind, api = doc.get("kind"), doc.get("apiVersion")
            where = f"{name}: {kind} {doc.get('metadata', {}).get('name')}"
            if (api, kind) in CRD_KINDS:
                if not doc.get("spec") and kind != "Issuer":
                    fail(f"{where}: no spec")
            else:
                try:
                    kubernetes_validate.validate(doc, "1.37.0", strict=True)
                except kubernetes_validate.utils.ValidationError as error:
                    fail(f"{where}: {error.message} at {list(error.path)}")
                except kubernetes_validate.utils.SchemaNotFoundError as error:
                    fail(f"{where}: no schema ({error})")
            pod_spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            if kind == "DaemonSet":
                check_node_safety(where, pod_spec)
            for container in (pod_spec.get("containers") or []) + (pod_spec.get("initContainers") or []):
                args = container.get("args", [])
                agent = kind == "DaemonSet"
                binary = agent_bin if agent else server_bin
                subcommand = args[0] if args and not args[0].startswith("-") else None
                if agent and subcommand is None:
                    fail(f"{where}: {container['name']} runs kiam-agent without a subcommand")
                known_flags, env = flags(binary, subcommand)
                for arg in args:
                    flag = arg.split("=")[0]
                    if flag.startswith("--") and flag not in known_flags:
                        fail(f"{where}: {flag} is not a flag of `{' '.join(filter(None, [binary.rsplit('/', 1)[-1], subcommand]))}`")
                for var in container.get("env", []):
                    if var["name"].startswith("KIAM_") and var["name"] not in env:
                        fail(f"{where}: {var['name']} is not read by the {container['name']}")
            counts[name] = counts.get(name, 0) + 1
    for name, n in counts.items():
        print(f"deploy: {name}: {n} objects valid")
    print("deploy validation passed")


if __name__ == "__main__":
    main()
