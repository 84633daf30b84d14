#!/usr/bin/env python3
"""A small `helm` command line over the real Helm engine (Helm v4 as a library, PyPI package
`helm-python-sdk`, import name `helm_python`), for machines without the helm binary.
Run it through hack/helm.sh, which provides the library in a project-local virtualenv.

  helm.sh lint CHART [-f VALUES]... [--set K=V]... [--strict] [--kube-version v1.20.2]
  helm.sh template CHART [--name N] [--namespace NS] [-f VALUES]... [--set K=V]... [--include-crds]
  helm.sh install NAME CHART [--namespace NS] [-f VALUES]... [--set K=V]... [--wait] [--timeout S]
  helm.sh uninstall NAME [--namespace NS] [--wait] [--timeout S] [--ignore-not-found]
  helm.sh status NAME [--namespace NS]
  helm.sh to-json < MULTI_DOC.yaml      (a JSON array of the documents, parsed as Helm parses YAML)

`template` prints what `helm template` prints: every object as its own YAML document headed by
`# Source: <template>`, in Helm's install order (Namespace, ServiceAccount, ClusterRole, ...).
Values are merged in order (-f files, then --set), as Helm does. The cluster is the one of
KUBECONFIG (or ~/.kube/config).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

try:
    import helm_python as helm
except ImportError:  # pragma: no cover - explained to the user
    sys.exit("helm.py: the helm_python module is missing; run hack/helm.sh, which installs helm-python-sdk")

# Helm's own install order (pkg/release/util/kind_sorter.go); unknown kinds go last.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
    "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass",
    "PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding",
    "RoleBindingList", "Service", "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


def fail(message: str, code: int = 1) -> None:
    print(f"helm: {message}", file=sys.stderr)
    sys.exit(code)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def user_values(files: list[str], sets: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                deep_merge(values, helm.values_from_yaml(f.read()) or {})
        except OSError as e:
            fail(f"values file {path}: {e}")
        except helm.HelmError as e:
            fail(f"values file {path}: {e}")
    for assignment in sets:
        try:
            deep_merge(values, helm.parse_set_string(assignment))
        except helm.HelmError as e:
            fail(f"--set {assignment}: {e}")
    return values


def split_documents(text: str) -> list[str]:
    docs = re.split(r"(?m)^---[ \t]*$", text)
    out = []
    for doc in docs:
        body = doc.strip("\n")
        # a document of comments and blank lines only is no object
        if any(line.strip() and not line.lstrip().startswith("#") for line in body.splitlines()):
            out.append(body.rstrip() + "\n")
    return out


def kind_of(doc: str) -> str:
    match = re.search(r"(?m)^kind:\s*[\"']?([A-Za-z0-9]+)", doc)
    return match.group(1) if match else ""


def name_of(doc: str) -> str:
    match = re.search(r"(?m)^metadata:\s*\n(?:[ \t]+.*\n)*?[ \t]+name:\s*[\"']?([^\s\"']+)", doc)
    return match.group(1) if match else ""


def render(args: argparse.Namespace) -> list[tuple[str, str]]:
    values = user_values(args.values, args.set)
    try:
        with helm.Chart.load(args.chart) as chart:
            manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
            chart_name = chart.name
    except helm.HelmError as e:
        fail(str(e).strip())
    objects: list[tuple[str, str]] = []
    for source, text in manifests.items():
        base = os.path.basename(source)
        if base == "NOTES.txt" or base.startswith("_"):
            continue
        objects.extend((source, doc) for doc in split_documents(text))
    if args.include_crds:
        crd_dir = os.path.join(args.chart, "crds")
        for base in sorted(os.listdir(crd_dir)) if os.path.isdir(crd_dir) else []:
            if base.endswith((".yaml", ".yml", ".json")):
                with open(os.path.join(crd_dir, base), encoding="utf-8") as f:
                    objects.extend((f"{chart_name}/crds/{base}", doc) for doc in split_documents(f.read()))

    def order(item: tuple[str, str]) -> tuple[int, str, str]:
        kind = kind_of(item[1])
        rank = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
        return rank, kind if rank == len(INSTALL_ORDER) else "", name_of(item[1])

    return sorted(objects, key=order)


def cmd_template(args: argparse.Namespace) -> None:
    out = []
    for source, doc in render(args):
        out.append(f"---\n# Source: {source}\n{doc}")
    sys.stdout.write("".join(out))


def cmd_lint(args: argparse.Namespace) -> None:
    values = user_values(args.values, args.set)
    try:
        report = helm.lint(
            args.chart, values or None, strict=args.strict or None, kube_version=args.kube_version,
            namespace=args.namespace,
        )
    except helm.HelmError as e:
        fail(str(e).strip())
    names = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    worst = 0
    for message in report.get("messages") or []:
        severity = int(message.get("severity", 0))
        worst = max(worst, severity)
        print(f"[{names.get(severity, severity)}] {message.get('path', '')}: {message.get('error', '')}")
    errors = report.get("errors") or []
    for error in errors:
        print(f"[ERROR] {error}")
    failed = bool(errors) or worst >= 3 or (args.strict and worst >= 2)
    print(f"{report.get('total_charts_linted', 0)} chart(s) linted, {'failed' if failed else 'no failures'}")
    if failed:
        sys.exit(1)


def config(namespace: str | None) -> "helm.Config":
    return helm.Config(namespace=namespace or "default")


def cmd_install(args: argparse.Namespace) -> None:
    values = user_values(args.values, args.set)
    with config(args.namespace) as cfg:
        try:
            release = cfg.install(
                args.chart, args.release, values, namespace=args.namespace, wait="watcher" if args.wait else None,
                timeout=args.timeout,
            )
        except helm.HelmError as e:
            fail(f"install {args.release}: {str(e).strip()}")
    print(f"NAME: {release.get('name')}\nNAMESPACE: {release.get('namespace')}\n"
          f"STATUS: {(release.get('info') or {}).get('status', release.get('status'))}\n"
          f"REVISION: {release.get('version', release.get('revision'))}")
    notes = (release.get("info") or {}).get("notes")
    if notes and not args.quiet:
        print("NOTES:\n" + notes)


def cmd_uninstall(args: argparse.Namespace) -> None:
    with config(args.namespace) as cfg:
        try:
            cfg.uninstall(args.release, wait="watcher" if args.wait else None, timeout=args.timeout,
                          ignore_not_found=args.ignore_not_found)
        except helm.HelmError as e:
            fail(f"uninstall {args.release}: {str(e).strip()}")
    print(f'release "{args.release}" uninstalled')


def cmd_status(args: argparse.Namespace) -> None:
    with config(args.namespace) as cfg:
        try:
            release = cfg.status(args.release)
        except helm.HelmError as e:
            fail(f"status {args.release}: {str(e).strip()}")
    release.pop("manifest", None)
    release.pop("chart", None)
    print(json.dumps(release, indent=2, default=str))


def cmd_to_json(_args: argparse.Namespace) -> None:
    docs = []
    for doc in split_documents(sys.stdin.read()):
        try:
            docs.append(helm.values_from_yaml(doc))
        except helm.HelmError as e:
            fail(f"to-json: {str(e).strip()}")
    json.dump(docs, sys.stdout, indent=1)
    sys.stdout.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="helm.sh", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def values_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-f", "--values", action="append", default=[], help="a values YAML file")
        p.add_argument("--set", action="append", default=[], help="K=V, as helm --set")
        p.add_argument("-n", "--namespace", default=None)

    p = sub.add_parser("lint", help="lint a chart")
    p.add_argument("chart")
    values_options(p)
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.add_argument("--kube-version", default=None, help="e.g. v1.20.2")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("template", help="render a chart offline")
    p.add_argument("chart")
    values_options(p)
    p.add_argument("--name", default="release-name")
    p.add_argument("--include-crds", action="store_true")
    p.set_defaults(func=cmd_template)

    p = sub.add_parser("install", help="install a chart into the cluster")
    p.add_argument("release")
    p.add_argument("chart")
    values_options(p)
    p.add_argument("--wait", action="store_true", help="wait until every object is ready")
    p.add_argument("--timeout", type=int, default=300, help="seconds")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the notes")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("uninstall", help="uninstall a release")
    p.add_argument("release")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--ignore-not-found", action="store_true")
    p.set_defaults(func=cmd_uninstall)

    p = sub.add_parser("status", help="show a release")
    p.add_argument("release")
    p.add_argument("-n", "--namespace", default=None)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("to-json", help="multi-document YAML on stdin -> JSON array on stdout")
    p.set_defaults(func=cmd_to_json)

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
