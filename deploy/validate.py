#!/usr/bin/env python3
"""Offline validation of deploy/: renders the kustomize bases and the Helm chart (default and
non-default values), lints the chart, validates every object against the Kubernetes OpenAPI
schemas (strict: unknown fields fail), and checks that every kiam flag the manifests pass
exists in the binaries' --help. Run by `cargo xtask test`.

usage: validate.py KIAM_AGENT_BIN KIAM_SERVER_BIN
"""

import re
import subprocess
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
# Custom resources: no schema ships with kubernetes-validate; their shape is checked by name.
CRD_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
NON_DEFAULT = {
    "server": {
        "replicas": 3,
        "roleBaseArn": "arn:aws:iam::123456789012:role/",
        "assumeRoleArn": "arn:aws:iam::123456789012:role/kiam-gateway",
        "sessionTags": True,
        "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kiam-server"},
        "extraArgs": ["--prefetch-workers=8"],
    },
    "agent": {"requireImdsv2": True, "address": "", "extraArgs": ["--hedge-after=100ms"]},
    "tls": {"certManager": False},
    "serviceMonitor": {"enabled": True},
    "logFormat": "text",
}


def fail(message):
    print(f"deploy validation FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def rendered_sets():
    sets = {}
    for overlay in ["base", "with-cert-manager"]:
        out = subprocess.run(
            ["kubectl", "kustomize", str(DEPLOY / "kustomize" / overlay)],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            fail(f"kubectl kustomize {overlay}: {out.stderr.strip()}")
        sets[f"kustomize/{overlay}"] = out.stdout
    sets["examples"] = (DEPLOY / "examples" / "namespace-and-pod.yaml").read_text()
    chart_dir = DEPLOY / "helm" / "kiam"
    lint = helm_python.chart.lint(str(chart_dir), strict=True)
    if lint.get("errors"):
        fail(f"helm lint: {lint['errors']}")
    for label, values in [("default", {}), ("non-default", NON_DEFAULT)]:
        chart = helm_python.chart.Chart.load(str(chart_dir))
        files = chart.render(values, name="kiam", namespace="kiam", is_install=True)
        sets[f"helm/{label}"] = "\n---\n".join(files.values())
    return sets


def flags_of(binary, *args):
    out = subprocess.run([binary, *args, "--help"], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"{binary} --help: {out.stderr.strip()}")
    return set(re.findall(r"--[a-z0-9-]+", out.stdout)), set(re.findall(r"\[env: (KIAM_[A-Z0-9_]+)", out.stdout))


def check_node_safety(where, pod_spec):
    """The agent's pins must live on the host's bpffs: an init container mounts it when the
    node has none (the only place with bidirectional propagation), the agent sees it with
    HostToContainer."""
    init = pod_spec.get("initContainers") or []
    if not any((c.get("args") or [None])[0] == "mount-bpffs" for c in init):
        fail(f"{where}: no init container runs `kiam-agent mount-bpffs`")
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


def main():
    if len(sys.argv) != 3:
        fail(__doc__.strip().splitlines()[-1])
    agent_bin, server_bin = sys.argv[1], sys.argv[2]
    subcommands = {}

    def flags(binary, subcommand):
        if (binary, subcommand) not in subcommands:
            subcommands[(binary, subcommand)] = flags_of(binary, *([subcommand] if subcommand else []))
        return subcommands[(binary, subcommand)]
    counts = {}
    for name, text in rendered_sets().items():
        docs = [d for d in yaml.safe_load_all(text) if d]
        check_identity_on(name, docs)
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
