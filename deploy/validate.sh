#!/usr/bin/env bash
# Validates deploy/ offline. From anywhere:
#
#     deploy/validate.sh            (root is needed for the live checks, steps 2b, 5-7)
#
# 1. Renders deploy/ and deploy/monitoring/ with `kubectl kustomize` (configMapGenerator
#    included). Without kubectl: loads every raw YAML file with python3 + PyYAML instead
#    (the generated ConfigMaps are then not checked).
# 2. Validates every rendered manifest against the Kubernetes 1.29 OpenAPI schemas with
#    the PyPI package kubernetes-validate (offline, bundled schemas; --strict rejects
#    unknown fields). deploy/extras/podmonitor.yaml and prometheusrule.yaml are CRD kinds
#    the package has no schema for: the PodMonitor is only loaded and checked for its
#    selector/port, the PrometheusRule for its spec.groups being rules.yml's groups.
# 2b. The secured variants, kustomize Components of deploy/: renders deploy/ with
#    deploy/extras/kube-rbac-proxy/ and with deploy/extras/web-config/ and validates them as
#    in step 2 (and that the two together do not build). Their CRD kinds (PodMonitors,
#    the Prometheus patch, extras/certificate.yaml) are loaded and checked against the
#    rendered DaemonSets: selector, port names and numbers, Secret names and keys, the
#    sidecar's upstream, paths, probes, token and RBAC, the token audience, the mounted
#    web-config.yml and its certificate files. web-config.yml, with a test certificate and
#    bcrypt hash put in, goes through `promtool check web-config`, and, where the exporter
#    build has --web.config.file (and as root), is served by it: /healthz open, /metrics
#    401 without the password, 200 with it, the certificate verified.
# 3. Parses dashboard.json, prometheus.yml (its rule_files shipped in its ConfigMap) and
#    Grafana's provisioning files.
# 4. promtool check rules and promtool test rules on deploy/monitoring/rules.yml and
#    rules_test.yml (skipped, said so, without promtool; tests/run.sh installs it).
# 5. Checks every PromQL expression of the dashboard (and each template variable's query)
#    names only metrics the exporter
#    exposes: from a real scrape of the exporter run in a network namespace this script
#    creates (needs root, `ip`, curl; with --service-labels and --live-latency, so that
#    the per-Service and awaiting-reply panels have series), else from docs/metrics.md. container_* names are
#    cAdvisor's (kubelet), not the exporter's, and are checked against a fixed list.
#    Before the scrape (with nft and conntrack) it sends 5 HTTP requests through a
#    DNAT'd ClusterIP in that namespace, so every histogram has observations.
# 6. If the `prometheus` binary is there too: runs a Prometheus in that namespace
#    scraping the exporter every second (and loading rules.yml), evaluates every
#    dashboard expression through its HTTP API, and fails on any query error or any
#    exporter expression that returns no number (cAdvisor's container_* series cannot
#    exist there and are only listed); then evaluates every rule expression of rules.yml
#    and fails on query errors only.
# 7. The image (as root, with podman and runc): builds the static binary (glibc, crt-static,
#    stripped; in target/static), then deploy/Dockerfile's last stage FROM scratch with
#    podman (its COPY --from=build made a COPY of that binary), checks that the image
#    holds that one file, user 65534:65534 and port 9000, and reports both sizes. Then,
#    in a network namespace it creates: --event-mask must fail at start (no nft), and
#    the image started as uid 65534 and as uid 0 (the DaemonSet's runAsUser), each with
#    --cap-drop=ALL --cap-add=NET_ADMIN, read-only, no-new-privileges, must answer
#    /healthz with 200 within 10 s, run with CapEff NET_ADMIN alone (/proc/PID/status),
#    and serve conntrack_monitoring_ series with the receive buffer forced to 128 MiB.
#    Its containers, image and namespace are removed on exit. Skipped without root, or
#    without podman or runc (then a failure where CI=true).
#
# Environment: EXPORTER (default target/release/conntrack-metrics, built if missing),
# K8S_VERSION (default 1.29), SKIP_LIVE=1 to skip the live part of steps 2b and 5-6,
# NO_KUBECTL=1 to check the raw files as if kubectl were missing, SKIP_IMAGE=1 to skip
# step 7.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
K8S_VERSION=${K8S_VERSION:-1.29}
EXPORTER=${EXPORTER:-$root/target/release/conntrack-metrics}
tmp=$(mktemp -d)
ns=ctmval$$
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    ip netns del "${ns}wc" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }

command -v python3 >/dev/null || fail "python3 is needed"
python3 -c 'import yaml' 2>/dev/null || fail "PyYAML is needed (apt-get install python3-yaml)"

step "1. render"
rendered=()
if [ "${NO_KUBECTL:-0}" != 1 ] && command -v kubectl >/dev/null; then
    for k in "$here" "$here/monitoring"; do
        out=$tmp/$(basename "$k").rendered.yaml
        kubectl kustomize "$k" >"$out" || fail "kubectl kustomize $k"
        echo "kubectl kustomize ${k#"$root"/}: $(grep -c '^kind:' "$out") resources"
        rendered+=("$out")
    done
else
    echo "kubectl not found: checking the raw YAML files (generated ConfigMaps not rendered)"
    for f in "$here"/*.yaml "$here"/monitoring/*.yaml; do
        case $(basename "$f") in kustomization.yaml) continue ;; esac
        rendered+=("$f")
    done
fi
# Every document must load, and have apiVersion, kind and metadata.name.
python3 - "${rendered[@]}" <<'PY'
import sys, yaml
for f in sys.argv[1:]:
    for d in yaml.safe_load_all(open(f)):
        if d is None:
            continue
        for k in ("apiVersion", "kind"):
            assert k in d, f"{f}: a document without {k}"
        assert d.get("metadata", {}).get("name"), f"{f}: {d['kind']} without metadata.name"
print("every document loads")
PY

step "2. kubernetes-validate -k $K8S_VERSION --strict"
if ! command -v kubernetes-validate >/dev/null; then
    echo "installing kubernetes-validate from PyPI"
    python3 -m pip install --quiet kubernetes-validate 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages kubernetes-validate ||
        fail "pip install kubernetes-validate"
fi
# validate_k8s FILE: every resource of FILE valid (also for step 2b).
validate_k8s() {
    local f=$1 docs log passed
    docs=$(python3 -c 'import sys,yaml; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$f")
    log=$tmp/kv.log
    kubernetes-validate -k "$K8S_VERSION" --strict "$f" >"$log" 2>&1 || { cat "$log"; fail "$f does not validate"; }
    passed=$(grep -c ' passed for resource ' "$log" || true)
    grep -v ' passed for resource ' "$log" || true
    [ "$passed" = "$docs" ] || { cat "$log"; fail "$f: $passed of $docs resources validated"; }
    echo "${f#"$tmp"/}: $passed/$docs resources valid"
}
for f in "${rendered[@]}"; do validate_k8s "$f"; done
python3 - "$here/extras/podmonitor.yaml" "$here/daemonset.yaml" <<'PY'
import sys, yaml
pm = yaml.safe_load(open(sys.argv[1]))
ds = yaml.safe_load(open(sys.argv[2]))
assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
labels = ds["spec"]["template"]["metadata"]["labels"]
for k, v in pm["spec"]["selector"]["matchLabels"].items():
    assert labels.get(k) == v, f"PodMonitor selector {k}={v} does not match the DaemonSet's pods"
ports = {p["name"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
for e in pm["spec"]["podMetricsEndpoints"]:
    assert e["port"] in ports, f"PodMonitor port {e['port']} is not a named port of the DaemonSet"
print("extras/podmonitor.yaml: loads; selector and port match the DaemonSet (no CRD schema checked)")
PY
python3 - "$here/extras/prometheusrule.yaml" "$here/monitoring/rules.yml" <<'PY'
import sys, yaml
pr = yaml.safe_load(open(sys.argv[1]))
rules = yaml.safe_load(open(sys.argv[2]))
assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["kind"] == "PrometheusRule"
assert pr["metadata"]["name"] and pr["metadata"]["namespace"]
# Loaded, not compared as text: comments and indentation may differ, the rules may not.
if pr["spec"]["groups"] != rules["groups"]:
    sys.exit("extras/prometheusrule.yaml: spec.groups differ from monitoring/rules.yml's groups "
             "(regenerate it: the command is in its header)")
print("extras/prometheusrule.yaml: loads; spec.groups equal monitoring/rules.yml's groups (no CRD schema checked)")
PY

step "2b. secured variants: components extras/kube-rbac-proxy/ and extras/web-config/"
# Each is a kustomize Component of deploy/ (an overlay cannot live inside its base:
# kustomize reports a cycle). Rendered here as deploy/ with that component added, the
# output of `kustomize edit add component extras/NAME` in deploy/, and validated as in
# step 2; their CRD kinds checked against that rendering.
extras=$here/extras
if [ "${NO_KUBECTL:-0}" != 1 ] && command -v kubectl >/dev/null; then
    # with_components DIR NAME...: a kustomization in DIR of deploy/ plus these components.
    with_components() {
        local d=$1 c
        shift
        mkdir -p "$d"
        { printf 'resources:\n  - %s\ncomponents:\n' "$(realpath --relative-to="$d" "$here")"
          for c in "$@"; do printf '  - %s\n' "$(realpath --relative-to="$d" "$extras/$c")"; done
        } >"$d/kustomization.yaml"
    }
    for c in kube-rbac-proxy web-config; do
        with_components "$tmp/with-$c" "$c"
        kubectl kustomize "$tmp/with-$c" >"$tmp/with-$c.rendered.yaml" || fail "kubectl kustomize: deploy/ with extras/$c"
        echo "deploy/ with component extras/$c: $(grep -c '^kind:' "$tmp/with-$c.rendered.yaml") resources"
        validate_k8s "$tmp/with-$c.rendered.yaml"
    done
    # They are alternatives: together (either order) the build must fail.
    for order in "kube-rbac-proxy web-config" "web-config kube-rbac-proxy"; do
        # shellcheck disable=SC2086
        with_components "$tmp/both" $order
        if kubectl kustomize "$tmp/both" >/dev/null 2>&1; then fail "components $order build together"; fi
    done
    echo "both components together: the build fails, in either order"
    python3 - "$tmp/with-kube-rbac-proxy.rendered.yaml" "$tmp/with-web-config.rendered.yaml" "$extras" <<'PY'
import base64, os, re, sys, yaml
krp_file, wc_file, extras = sys.argv[1:]
def load(f):
    return [d for d in yaml.safe_load_all(open(f)) if d]
def only(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]
def flags(c):
    return dict(a.lstrip("-").split("=", 1) for a in c.get("args", []) if "=" in a)
def mount_of(pod, c, volume_pred):
    """The mountPath in container c of the one volume volume_pred accepts."""
    vols = {v["name"] for v in pod["volumes"] if volume_pred(v)}
    paths = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in vols]
    assert len(paths) == 1, f"{c['name']}: {len(paths)} mounts of such a volume"
    return paths[0]
def projected_secret_items(v, secret):
    return {i["key"]: i["path"] for s in v.get("projected", {}).get("sources", [])
            for i in s.get("secret", {}).get("items", []) if s["secret"]["name"] == secret}
served = [c for c in load(f"{extras}/certificate.yaml") if c["kind"] == "Certificate" and not c["spec"].get("isCA")]
assert len(served) == 1 and all(d["apiVersion"] == "cert-manager.io/v1" for d in load(f"{extras}/certificate.yaml"))
tls_secret, dns_names = served[0]["spec"]["secretName"], served[0]["spec"]["dnsNames"]

def check_podmonitor(f, ds, c):
    """PodMonitor f scrapes container c of ds over verified TLS; its endpoint and port."""
    pm = yaml.safe_load(open(f))
    pod = ds["spec"]["template"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    assert pm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    for k, v in pm["spec"]["selector"]["matchLabels"].items():
        assert pod["metadata"]["labels"].get(k) == v, f"{f}: selector {k}={v} does not match the pods"
    ann = [a for a in pod["metadata"].get("annotations", {}) if a.startswith("prometheus.io/")]
    assert not ann, f"the pods still carry {ann}: a scraper following them gets 401s"
    [ep] = pm["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert ep["port"] in ports, f"{f}: port {ep['port']} is not a named port of container {c['name']}"
    assert ep["scheme"] == "https", f"{f}: scheme {ep['scheme']}"
    tls = ep["tlsConfig"]
    assert not tls.get("insecureSkipVerify"), f"{f}: insecureSkipVerify"
    assert tls["ca"]["secret"] == {"name": tls_secret, "key": "ca.crt"}, f"{f}: CA not {tls_secret}/ca.crt"
    assert tls["serverName"] in dns_names, f"{f}: serverName {tls['serverName']} not in the certificate"
    return ep, ports[ep["port"]]

# kube-rbac-proxy
docs = load(krp_file)
ds = only(docs, "DaemonSet")
pod = ds["spec"]["template"]
spec = pod["spec"]
cs = {c["name"]: c for c in spec["containers"]}
exp, proxy = cs["conntrack-metrics"], cs["kube-rbac-proxy"]
ef, pf = flags(exp), flags(proxy)
d = f"{extras}/kube-rbac-proxy"
ep, port = check_podmonitor(f"{d}/podmonitor.yaml", ds, proxy)
bind = ef["metrics-bind-address"]
host, bind_port = bind.rsplit(":", 1)
assert host == "127.0.0.1", f"the exporter listens on {bind}, not on the loopback"
assert "ports" not in exp, "the exporter declares a port: it listens on the loopback only"
assert pf["upstream"] == f"http://{bind}/", f"--upstream={pf['upstream']}, the exporter is on {bind}"
assert pf["secure-listen-address"] == f"$(HOST_IP):{port}", pf["secure-listen-address"]
assert ep["path"] in pf["allow-paths"].split(","), "--allow-paths does not allow the scraped path"
for p in ("livenessProbe", "readinessProbe"):
    g = exp[p]["httpGet"]
    assert (g.get("host"), str(g["port"]), g.get("scheme", "HTTP")) == ("127.0.0.1", bind_port, "HTTP"), f"exporter {p}: {g}"
    g = proxy[p]["httpGet"]
    assert (g["scheme"], str(g["port"])) == ("HTTPS", pf["proxy-endpoints-port"]), f"kube-rbac-proxy {p}: {g}"
for k in ("tls-cert-file", "tls-private-key-file"):
    m = mount_of(spec, proxy, lambda v: v.get("secret", {}).get("secretName") == tls_secret)
    assert os.path.dirname(pf[k]) == m, f"--{k}={pf[k]} is not in the {tls_secret} mount {m}"
sc = proxy["securityContext"]
assert (sc["runAsNonRoot"], sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"],
        sc["capabilities"], sc["seccompProfile"]["type"]) == (True, False, True, {"drop": ["ALL"]}, "RuntimeDefault"), sc
# The token: in the sidecar only, for a ServiceAccount allowed TokenReview and SubjectAccessReview.
assert spec["automountServiceAccountToken"] is False
token = lambda v: any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
assert mount_of(spec, proxy, token) == "/var/run/secrets/kubernetes.io/serviceaccount"
tokvols = {v["name"] for v in spec["volumes"] if token(v)}
assert not any(m["name"] in tokvols for m in exp.get("volumeMounts", [])), "the exporter mounts the token"
sa = only(docs, "ServiceAccount", spec["serviceAccountName"])
roles = {r["metadata"]["name"]: r["rules"] for r in docs if r["kind"] == "ClusterRole"}
def grants(rules, group, resource, verb):
    return any(group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r["verbs"] for r in rules)
bound = [b["roleRef"]["name"] for b in docs if b["kind"] == "ClusterRoleBinding"
         and {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]} in b["subjects"]]
assert any(grants(roles[r], "authentication.k8s.io", "tokenreviews", "create") and
           grants(roles[r], "authorization.k8s.io", "subjectaccessreviews", "create") for r in bound), \
    f"ServiceAccount {sa['metadata']['name']} may not create tokenreviews and subjectaccessreviews"
assert any(ep["path"] in r.get("nonResourceURLs", []) and "get" in r["verbs"] for rs in roles.values() for r in rs), \
    f"no ClusterRole for scrapers grants get on {ep['path']}"
# The scraper's token: the PodMonitor's scrape class reads it from a projected volume for
# the audience the sidecar accepts (prometheus-patch.yaml).
pm = yaml.safe_load(open(f"{d}/podmonitor.yaml"))
prom = yaml.safe_load(open(f"{d}/prometheus-patch.yaml"))["spec"]
[cls] = [s for s in prom["scrapeClasses"] if s["name"] == pm["spec"]["scrapeClass"]]
cred = cls["authorization"]["credentialsFile"]
[mnt] = [m for m in prom["volumeMounts"] if os.path.dirname(cred) == m["mountPath"]]
[vol] = [v for v in prom["volumes"] if v["name"] == mnt["name"]]
[tok] = [s["serviceAccountToken"] for s in vol["projected"]["sources"] if "serviceAccountToken" in s]
assert tok["path"] == os.path.basename(cred), f"{cred} is not the projected token"
assert tok["audience"] in pf["auth-token-audiences"].split(","), f"audience {tok['audience']} not accepted by the sidecar"
print(f"extras/kube-rbac-proxy: exporter on {bind}, sidecar on $(HOST_IP):{port} -> upstream, probes, "
      f"TLS Secret, token and RBAC, PodMonitor, scrape class and audience consistent")

# web-config
docs = load(wc_file)
ds = only(docs, "DaemonSet")
spec = ds["spec"]["template"]["spec"]
[exp] = [c for c in spec["containers"] if c["name"] == "conntrack-metrics"]
ef = flags(exp)
d = f"{extras}/web-config"
ep, port = check_podmonitor(f"{d}/podmonitor.yaml", ds, exp)
assert ef["metrics-bind-address"] == f"$(HOST_IP):{port}", ef["metrics-bind-address"]
for p in ("livenessProbe", "readinessProbe"):
    g = exp[p]["httpGet"]
    assert g["scheme"] == "HTTPS" and "host" not in g and g["port"] == port, f"{p}: {g}"
path = ef["web.config.file"]
vname = [m["name"] for m in exp["volumeMounts"] if m["mountPath"] == os.path.dirname(path)]
assert vname, f"--web.config.file={path}: nothing is mounted at {os.path.dirname(path)}"
[vol] = [v for v in spec["volumes"] if v["name"] in vname]
secrets = {s["secret"]["name"] for s in vol["projected"]["sources"]}
[cfg_secret] = secrets - {tls_secret}
key = {p: k for k, p in projected_secret_items(vol, cfg_secret).items()}[os.path.basename(path)]
sec = only(docs, "Secret", cfg_secret)
cfg = yaml.safe_load(base64.b64decode(sec["data"][key]))
assert cfg == yaml.safe_load(open(f"{d}/{key}")), f"Secret {cfg_secret} is not {key}"
tls_items = {p: k for k, p in projected_secret_items(vol, tls_secret).items()}
for k, want in (("cert_file", "tls.crt"), ("key_file", "tls.key")):
    f = cfg["tls_server_config"][k]
    assert os.path.dirname(f) == os.path.dirname(path) and tls_items.get(os.path.basename(f)) == want, \
        f"{key}: {k} {f} is not {tls_secret}'s {want} as mounted"
for user, h in cfg["basic_auth_users"].items():
    assert re.fullmatch(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", h), f"{key}: {user}'s password is not a bcrypt hash"
pm = yaml.safe_load(open(f"{d}/podmonitor.yaml"))
ba = pm["spec"]["podMetricsEndpoints"][0]["basicAuth"]
assert ba["username"]["name"] == ba["password"]["name"], "basicAuth: username and password from two Secrets"
print(f"extras/web-config: --web.config.file={path} from Secret {cfg_secret}, its certificate from {tls_secret}, "
      f"bcrypt hashes, HTTPS probes, PodMonitor consistent")
PY
else
    echo "kubectl not found: the components are not rendered, their files only loaded"
    python3 - "$extras"/*/*.yaml "$extras"/*/*.yml "$extras/certificate.yaml" <<'PY'
import sys, yaml
for f in sys.argv[1:]:
    list(yaml.safe_load_all(open(f)))
print(f"{len(sys.argv) - 1} files of deploy/extras load")
PY
    validate_k8s "$extras/kube-rbac-proxy/rbac.yaml"
fi
# web-config.yml as exporter-toolkit reads it (promtool), with a certificate made as
# certificate.yaml's header says and a password hash made as web-config.yml's says; then,
# if this exporter build has --web.config.file, served by it in a network namespace:
# /healthz and /readyz without a password, /metrics 401 without it and 200 with it, its
# certificate verified for the PodMonitor's serverName.
if command -v openssl >/dev/null && command -v htpasswd >/dev/null; then
    wc=$tmp/web-config
    mkdir "$wc"
    name=$(python3 -c 'import sys,yaml; print(yaml.safe_load(open(sys.argv[1]))["spec"]["podMetricsEndpoints"][0]["tlsConfig"]["serverName"])' \
        "$extras/web-config/podmonitor.yaml")
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=$name" \
        -addext "subjectAltName=DNS:$name" -keyout "$wc/tls.key" -out "$wc/tls.crt" 2>/dev/null || fail "openssl req"
    pw=$(head -c 24 /dev/urandom | base64)
    user=$(python3 -c 'import sys,yaml; print(next(iter(yaml.safe_load(open(sys.argv[1]))["basic_auth_users"])))' \
        "$extras/web-config/web-config.yml")
    hash=$(printf '%s\n' "$pw" | htpasswd -niBC 10 "$user") || fail "htpasswd"
    python3 - "$extras/web-config/web-config.yml" "$wc" "$user" "${hash#"$user":}" >"$wc/web-config.yml" <<'PY'
import os, sys, yaml
src, d, user, h = sys.argv[1:]
cfg = yaml.safe_load(open(src))
for k in ("cert_file", "key_file"):
    cfg["tls_server_config"][k] = os.path.join(d, os.path.basename(cfg["tls_server_config"][k]))
cfg["basic_auth_users"] = {user: h}
print(yaml.safe_dump(cfg))
PY
    if command -v promtool >/dev/null; then
        promtool check web-config "$wc/web-config.yml" >"$wc/promtool.log" 2>&1 ||
            { cat "$wc/promtool.log"; fail "promtool check web-config: extras/web-config/web-config.yml"; }
        echo "extras/web-config/web-config.yml (a test certificate and hash put in): promtool check web-config passed"
    else
        echo "SKIPPED: promtool check web-config (promtool not found)"
    fi
    if [ "${SKIP_LIVE:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v curl >/dev/null &&
        [ -x "$EXPORTER" ] && "$EXPORTER" --help 2>/dev/null | grep -q -- '--web.config.file'; then
        ip netns add "${ns}wc"
        ip -n "${ns}wc" link set lo up
        ip netns exec "${ns}wc" "$EXPORTER" --no-sysctl --web.config.file="$wc/web-config.yml" \
            --metrics-bind-address 127.0.0.1:19443 >"$wc/exporter.log" 2>&1 &
        pids+=($!)
        get=(ip netns exec "${ns}wc" curl -sS -o /dev/null -w '%{http_code}' --cacert "$wc/tls.crt"
             --resolve "$name:19443:127.0.0.1")
        url=https://$name:19443
        ok=0
        for _ in $(seq 50); do
            if [ "$("${get[@]}" "$url/readyz" 2>/dev/null)" = 200 ]; then ok=1; break; fi
            sleep 0.2
        done
        [ $ok = 1 ] || { cat "$wc/exporter.log"; fail "the exporter with web-config.yml did not become ready over TLS"; }
        got="$("${get[@]}" "$url/healthz") $("${get[@]}" "$url/metrics") $("${get[@]}" -u "$user:wrong" "$url/metrics")"
        got="$got $("${get[@]}" -u "$user:$pw" "$url/metrics")"
        [ "$got" = "200 401 401 200" ] ||
            fail "web-config: /healthz, /metrics, with a wrong and with the right password: $got (want 200 401 401 200)"
        echo "the exporter serves web-config.yml: /healthz 200, /metrics 401 without or with a wrong password," \
            "200 with it, certificate verified for $name"
    else
        echo "not served by the exporter (needs root, ip, curl, SKIP_LIVE unset, and $EXPORTER built with --web.config.file)"
    fi
else
    echo "SKIPPED: web-config.yml checks (need openssl and htpasswd: apt-get install apache2-utils)"
fi

step "3. configuration files"
python3 - "$here/monitoring" <<'PY'
import json, sys, yaml
d = sys.argv[1]
json.load(open(f"{d}/dashboard.json"))
cfg = yaml.safe_load(open(f"{d}/prometheus.yml"))
assert cfg["scrape_configs"], "prometheus.yml has no scrape_configs"
# Rule files are read beside prometheus.yml: they must be in the same generated ConfigMap.
kust = yaml.safe_load(open(f"{d}/kustomization.yaml"))
shipped = {f.split("=")[-1] for g in kust["configMapGenerator"] if g["name"] == "prometheus-config"
           for f in g["files"]}
for f in cfg.get("rule_files", []):
    assert f in shipped, f"prometheus.yml rule_files {f} is not in the prometheus-config ConfigMap"
for doc in yaml.safe_load_all(open(f"{d}/grafana.yaml")):
    if doc and doc["kind"] == "ConfigMap":
        for k, v in doc["data"].items():
            yaml.safe_load(v)
print("dashboard.json, prometheus.yml and Grafana's provisioning files parse")
PY

# The dashboard's expressions, one a line, Grafana's interval variables made concrete
# and its template variables set to "All" (.*); each query variable's
# label_values(METRIC, LABEL) as the expression `count by (LABEL) (METRIC)`.
python3 - "$here/monitoring/dashboard.json" >"$tmp/exprs.txt" <<'PY'
import json, re, sys
def walk(ps):
    for p in ps:
        yield from walk(p.get("panels", []))
        for t in p.get("targets", []):
            yield t["expr"]
board = json.load(open(sys.argv[1]))
exprs = list(walk(board["panels"]))
for v in board.get("templating", {}).get("list", []):
    if v.get("type") == "query":
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
        if not m:
            sys.exit(f"variable {v['name']}: not label_values(METRIC, LABEL): {q}")
        exprs.append(f"count by ({m.group(2)}) ({m.group(1)})")
for e in exprs:
    for var in ("$service_ip", "$namespace", "$service"):
        e = e.replace(var, ".*")
    print(e.replace("$__rate_interval", "1m").replace("$__interval", "1m"))
PY
echo "$(wc -l <"$tmp/exprs.txt") PromQL expressions in the dashboard"

step "4. alert and recording rules (promtool)"
if command -v promtool >/dev/null; then
    promtool check rules "$here/monitoring/rules.yml" || fail "promtool check rules"
    promtool test rules "$here/monitoring/rules_test.yml" || fail "promtool test rules"
else
    echo "SKIPPED: promtool not found (Debian package prometheus; tests/run.sh installs it)"
fi
# The rule expressions, one a line, for step 6.
python3 - "$here/monitoring/rules.yml" >"$tmp/rule_exprs.txt" <<'PY'
import sys, yaml
for g in yaml.safe_load(open(sys.argv[1]))["groups"]:
    for r in g["rules"]:
        print(" ".join(r["expr"].split()))
PY

step "5. metric names"
live=0
traffic=0
if [ "${SKIP_LIVE:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v curl >/dev/null; then
    live=1
fi
if [ $live = 1 ]; then
    if [ ! -x "$EXPORTER" ]; then
        (cd "$root" && cargo build --release --locked --bin conntrack-metrics) || fail "cargo build"
    fi
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" "$EXPORTER" --no-sysctl --node-name validate --service-labels --live-latency \
        --metrics-bind-address 127.0.0.1:19100 >"$tmp/exporter.log" 2>&1 &
    pids+=($!)
    ok=0
    for _ in $(seq 50); do
        if ip netns exec "$ns" curl -fsS -o /dev/null http://127.0.0.1:19100/readyz 2>/dev/null; then ok=1; break; fi
        sleep 0.2
    done
    [ $ok = 1 ] || { cat "$tmp/exporter.log"; fail "the exporter did not become ready"; }
    # Service traffic, so that every histogram has observations: 10.96.1.10:80 (in the
    # default --svc-subnet) DNAT'd by nftables, as kube-proxy does, to an HTTP server on
    # 10.97.0.1:8080, both on lo; 5 requests, then `conntrack -F` so their DESTROY
    # events come now rather than after TIME_WAIT.
    traffic=0
    if command -v nft >/dev/null && command -v conntrack >/dev/null; then
        ip -n "$ns" addr add 10.96.1.10/32 dev lo
        ip -n "$ns" addr add 10.97.0.1/32 dev lo
        ip netns exec "$ns" sysctl -qw net.netfilter.nf_conntrack_acct=1 \
            net.netfilter.nf_conntrack_timestamp=1
        printf '%s\n' 'table ip ctmvalidate {' \
            ' chain out { type nat hook output priority -100; ip daddr 10.96.1.10 tcp dport 80 dnat to 10.97.0.1:8080; }' \
            '}' | ip netns exec "$ns" nft -f -
        (cd "$tmp" && exec ip netns exec "$ns" python3 -m http.server --bind 10.97.0.1 8080) >/dev/null 2>&1 &
        pids+=($!)
        sleep 1
        for _ in 1 2 3 4 5; do
            ip netns exec "$ns" curl -fsS -o /dev/null --retry 3 --retry-connrefused http://10.96.1.10/ \
                || fail "no answer through the DNAT rule"
        done
        sleep 0.5
        ip netns exec "$ns" conntrack -F >/dev/null 2>&1
        for _ in $(seq 50); do
            ip netns exec "$ns" curl -fsS http://127.0.0.1:19100/metrics >"$tmp/metrics.txt"
            if grep -q '^conntrack_monitoring_service_duration_seconds_count{.*} 5$' "$tmp/metrics.txt"; then
                traffic=1; break
            fi
            sleep 0.2
        done
        [ $traffic = 1 ] || { grep _count "$tmp/metrics.txt"; fail "the exporter did not count the 5 Service flows"; }
        echo "5 flows through a DNAT'd ClusterIP counted by the exporter"
    else
        echo "nft or conntrack missing: no Service traffic, histograms stay empty"
    fi
    ip netns exec "$ns" curl -fsS http://127.0.0.1:19100/metrics >"$tmp/metrics.txt"
    ip netns exec "$ns" curl -fsS -o /dev/null http://127.0.0.1:19100/healthz || fail "/healthz"
    echo "scraped $EXPORTER in network namespace $ns: $(grep -vc '^#' "$tmp/metrics.txt") samples"
    names_src=$tmp/metrics.txt
else
    echo "no live scrape (needs root, ip, curl; SKIP_LIVE unset): names from docs/metrics.md"
    names_src=$root/docs/metrics.md
fi
python3 - "$names_src" "$live" "$tmp/exprs.txt" <<'PY'
import re, sys
src, live, exprs = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
text = open(src).read()
if live:
    known = {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", l).group(0)
             for l in text.splitlines() if l and not l.startswith("#")}
else:
    fams = set(re.findall(r"`(conntrack_monitoring_[A-Za-z0-9_]+)", text))
    known = fams | {f + s for f in fams for s in ("_bucket", "_sum", "_count")}
# cAdvisor's (the kubelet's), scraped by deploy/monitoring/prometheus.yml.
cadvisor = {"container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
            "container_memory_rss"}
bad = []
used = set()
for e in open(exprs).read().splitlines():
    e_nolabels = re.sub(r'\{[^}]*\}', '', e)            # label matchers
    e_nolabels = re.sub(r'\bby\s*\([^)]*\)', '', e_nolabels)  # grouping labels
    for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e_nolabels):
        if n.startswith("conntrack_"):
            used.add(n)
            if n not in known:
                bad.append((n, e))
        elif n.startswith("container_"):
            used.add(n)
            if n not in cadvisor:
                bad.append((n, e))
for n, e in bad:
    print(f"unknown metric {n} in: {e}")
if bad:
    sys.exit(1)
print(f"{len(used)} metric names used, all exposed ({'live scrape' if live else 'docs/metrics.md'}; "
      f"{len(used & cadvisor)} from cAdvisor)")
PY

step "6. every expression against a real Prometheus"
if [ $live = 1 ] && command -v prometheus >/dev/null; then
    cat >"$tmp/prom.yml" <<'YML'
global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: conntrack-metrics
    static_configs: [{targets: ["127.0.0.1:19100"]}]
YML
    # The rule file too: a rule Prometheus cannot load stops it before it is ready.
    printf 'rule_files: ["%s"]\n' "$here/monitoring/rules.yml" >>"$tmp/prom.yml"
    ip netns exec "$ns" prometheus --config.file="$tmp/prom.yml" --storage.tsdb.path="$tmp/tsdb" \
        --web.listen-address=127.0.0.1:19090 >"$tmp/prometheus.log" 2>&1 &
    pids+=($!)
    ok=0
    for _ in $(seq 100); do
        if ip netns exec "$ns" curl -fsS -o /dev/null http://127.0.0.1:19090/-/ready 2>/dev/null; then ok=1; break; fi
        sleep 0.2
    done
    [ $ok = 1 ] || { tail -20 "$tmp/prometheus.log"; fail "Prometheus did not become ready"; }
    # Prometheus applies discovered targets after up to 5 s: wait for the first
    # successful scrape, then a few more so that rate() over 1m has samples.
    ok=0
    for _ in $(seq 60); do
        if ip netns exec "$ns" curl -fsS -G --data-urlencode 'query=up{job="conntrack-metrics"} == 1' \
            http://127.0.0.1:19090/api/v1/query 2>/dev/null | grep -q '"value"'; then ok=1; break; fi
        sleep 0.5
    done
    [ $ok = 1 ] || { tail -20 "$tmp/prometheus.log"; fail "Prometheus never scraped the exporter"; }
    # Keep Service traffic coming while the rates are taken: the kernel socket filter
    # keeps every other event (Prometheus's own scrapes among them) out of the reader,
    # so without it the receive-batch rates would be 0 (NaN quantiles).
    if [ $traffic = 1 ]; then
        # Each flow is then deleted (its DESTROY comes now, not when the kernel's
        # garbage collector gets to it), so the per-Service latency rates have data.
        (while :; do
            ip netns exec "$ns" curl -fsS -o /dev/null http://10.96.1.10/ 2>/dev/null || true
            sleep 0.3
            ip netns exec "$ns" conntrack -D -d 10.96.1.10 >/dev/null 2>&1 || true
        done) &
        pids+=($!)
    fi
    sleep 5
    # evaluate EXPRS RESULTS: each expression of the file EXPRS through the HTTP API, one
    # line of RESULTS each: "error:..." / "0" (no series) / "nan" (series, every value
    # NaN) / the number of series with a number, a tab, the expression.
    evaluate() {
        : >"$2"
        while IFS= read -r e; do
            ip netns exec "$ns" curl -sS -G --data-urlencode "query=$e" \
                http://127.0.0.1:19090/api/v1/query >"$tmp/r.json"
            printf '%s\t%s\n' "$(python3 -c 'import json,sys
r=json.load(open(sys.argv[1]))
if r["status"] != "success": print("error:" + r.get("error", ""))
elif not r["data"]["result"]: print(0)
else:
    n = sum(1 for x in r["data"]["result"] if x["value"][1].lower() != "nan")
    print(n if n else "nan")' "$tmp/r.json")" "$e" >>"$2"
        done <"$1"
    }
    evaluate "$tmp/exprs.txt" "$tmp/results.txt"
    errors=$(grep -c '^error:' "$tmp/results.txt" || true)
    empty=$(grep -c $'^0\t' "$tmp/results.txt" || true)
    nan=$(grep -c $'^nan\t' "$tmp/results.txt" || true)
    total=$(wc -l <"$tmp/results.txt")
    grep -v $'^[1-9][0-9]*\t' "$tmp/results.txt" | sed 's/^/  /' || true
    echo "$total expressions evaluated by $(prometheus --version 2>&1 | head -1):" \
        "$errors errors, $empty without series, $nan only NaN (listed above), the rest return numbers"
    [ "$errors" = 0 ] || fail "PromQL errors"
    # cAdvisor's series cannot exist here; every exporter expression must return
    # series, and numbers when there was Service traffic.
    if grep -v $'^[1-9][0-9]*\t' "$tmp/results.txt" | grep -v container_ >/dev/null; then
        if [ $traffic = 1 ] || grep $'^0\t' "$tmp/results.txt" | grep -v container_ >/dev/null; then
            fail "an exporter expression returned no data"
        fi
    fi
    # The rules' expressions: only query errors fail. No data is expected and passes:
    # most alerts select nothing while all is well, absent() is empty while the exporter
    # is scraped, recording rules over 5m need more than these seconds of samples, and
    # some families the rules use (node_*, service_flows_total, readers_stuck) may not be
    # exposed by this exporter build.
    evaluate "$tmp/rule_exprs.txt" "$tmp/rule_results.txt"
    errors=$(grep -c '^error:' "$tmp/rule_results.txt" || true)
    grep -v $'^[1-9][0-9]*\t' "$tmp/rule_results.txt" | sed 's/^/  /' || true
    echo "$(wc -l <"$tmp/rule_results.txt") rule expressions of rules.yml evaluated: $errors errors" \
        "(without series or only NaN: listed above; that is not a failure)"
    [ "$errors" = 0 ] || fail "PromQL errors in rules.yml"
    # And Prometheus's own evaluation of the loaded rules: every rule's health "ok".
    ip netns exec "$ns" curl -fsS http://127.0.0.1:19090/api/v1/rules >"$tmp/rules.json"
    python3 - "$tmp/rules.json" <<'PY' || fail "a rule of rules.yml failed in Prometheus"
import json, sys
groups = json.load(open(sys.argv[1]))["data"]["groups"]
rules = [r for g in groups for r in g["rules"]]
bad = [r for r in rules if r.get("health") == "err"]
for r in bad:
    print(f"  {r['name']}: {r.get('lastError')}")
print(f"{len(rules)} rules loaded by Prometheus, {len(bad)} with an evaluation error")
sys.exit(1 if bad or not rules else 0)
PY
else
    echo "skipped (needs root, ip, curl and the prometheus binary)"
fi

step "7. the image: the static binary FROM scratch, built with podman and started"
image_skip=
if [ "${SKIP_IMAGE:-0}" = 1 ]; then
    image_skip="SKIP_IMAGE=1"
elif [ "$(id -u)" != 0 ]; then
    image_skip="needs root (a network namespace, podman's storage in /var/lib/containers)"
elif ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v curl >/dev/null; then
    [ "${CI:-}" != true ] || fail "CI must run the image step: podman, runc or curl missing (tests/run.sh installs them)"
    image_skip="podman, runc or curl not found (apt-get install podman runc curl)"
fi
if [ -n "$image_skip" ]; then
    echo "skipped: $image_skip"
else
    image_ns=ctmimg$$
    image_ctr=ctmimg$$
    image_tag=localhost/conntrack-metrics-validate:$$
    image_cleanup() {
        podman rm -f -i -t 0 "$image_ctr-mask" "$image_ctr-65534" "$image_ctr-0" >/dev/null 2>&1 || true
        podman image unmount "$image_tag" >/dev/null 2>&1 || true
        podman rmi -f "$image_tag" >/dev/null 2>&1 || true
        ip netns del "$image_ns" 2>/dev/null || true
    }
    trap 'image_cleanup; cleanup' EXIT
    since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

    # One static binary, in a target dir of its own (the normal one stays as it is); the
    # same build as the Dockerfile's stage `build`.
    triple=$(rustc -vV | sed -n 's/^host: //p')
    t0=$(date +%s.%N)
    (cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=false \
        CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_TARGET_DIR="$root/target/static" \
        cargo build --release --locked --quiet --target "$triple" --bin conntrack-metrics) ||
        fail "the static cargo build"
    build_s=$(since "$t0")
    static=$root/target/static/$triple/release/conntrack-metrics
    needed=$(readelf -d "$static" | grep '(NEEDED)' || true)
    [ -z "$needed" ] || fail "$static is not static: $needed"
    if command -v file >/dev/null; then file -b "$static"; fi
    echo "static binary, stripped: $(stat -c %s "$static") bytes, built in ${build_s}s"

    # deploy/Dockerfile's last stage as it is, but for its COPY --from=build of the same
    # binary, which comes from the build context here.
    mkdir "$tmp/image"
    cp "$static" "$tmp/image/conntrack-metrics"
    awk '/^FROM / { s = "" } { s = s $0 "\n" } END { printf "%s", s }' "$here/Dockerfile" |
        sed 's|^COPY --from=build /conntrack-metrics |COPY conntrack-metrics |' >"$tmp/image/Containerfile"
    [ "$(head -1 "$tmp/image/Containerfile")" = "FROM scratch" ] ||
        fail "deploy/Dockerfile's last stage is not FROM scratch"
    if [ "$(grep -cE '^(RUN|ADD|COPY)' "$tmp/image/Containerfile")" != 1 ] ||
        ! grep -q '^COPY conntrack-metrics /usr/local/bin/conntrack-metrics$' "$tmp/image/Containerfile"; then
        fail "deploy/Dockerfile's last stage must only COPY --from=build /conntrack-metrics /usr/local/bin/"
    fi
    # No RUN step, so no container and no --isolation: the layer is the copied file.
    podman build --quiet --layers=false --pull=never -t "$image_tag" "$tmp/image" >/dev/null ||
        fail "podman build"
    mnt=$(podman image mount "$image_tag") || fail "podman image mount"
    files=$(cd "$mnt" && find . ! -type d)
    podman image unmount "$image_tag" >/dev/null
    [ "$files" = ./usr/local/bin/conntrack-metrics ] || fail "the image holds more than the binary: $files"
    config=$(podman image inspect -f '{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.ExposedPorts}}' "$image_tag")
    [ "$config" = '65534:65534 ["/usr/local/bin/conntrack-metrics"] {"9000/tcp":{}}' ] ||
        fail "image configuration: $config"
    image_bytes=$(podman image inspect -f '{{.Size}}' "$image_tag")
    echo "image $image_tag: $image_bytes bytes, one file ($files), user 65534:65534, port 9000"

    # Started twice, with NET_ADMIN alone: as the Dockerfile's USER 65534 (podman makes an
    # added capability ambient for a non-root user, so it survives the exec), and as uid
    # 0, what deploy/daemonset.yaml's runAsUser: 0 makes of it on Kubernetes (which sets
    # no ambient capability). On machines that are containers themselves, as CI's: runc,
    # since crun refuses a hybrid cgroup layout; cgroupfs, since there is no systemd; and
    # rlimits they can set without CAP_SYS_RESOURCE (podman's default nofile of 1048576
    # stops runc: "error setting rlimits").
    run_image=(podman --runtime runc --cgroup-manager=cgroupfs run --pull=never
        --cap-drop=ALL --cap-add=NET_ADMIN --read-only --read-only-tmpfs=false
        --security-opt no-new-privileges --ulimit nofile=4096:4096 --ulimit nproc=4096:4096
        --network=ns:/run/netns/"$image_ns")
    ip netns add "$image_ns"
    ip -n "$image_ns" link set lo up
    # The flag the image cannot serve fails at start, with its reason.
    if timeout 30 "${run_image[@]}" --rm --name "$image_ctr-mask" --user 65534:65534 "$image_tag" \
        --no-sysctl --event-mask >"$tmp/event-mask.log" 2>&1; then
        fail "--event-mask started in an image without nft"
    fi
    grep -q 'needs the nft binary' "$tmp/event-mask.log" || { cat "$tmp/event-mask.log"; fail "--event-mask: no reason given"; }
    echo "--event-mask exits at start: $(grep 'needs the nft binary' "$tmp/event-mask.log")"
    # The init container's step (deploy/daemonset.yaml): privileged (a writable
    # /proc/sys), uid 0, --sysctls-only turns both sysctls of the namespace on and exits.
    for key in nf_conntrack_acct nf_conntrack_timestamp; do
        ip netns exec "$image_ns" sysctl -qw "net.netfilter.$key=0"
    done
    timeout 30 podman --runtime runc --cgroup-manager=cgroupfs run --pull=never --rm \
        --name "$image_ctr-sysctls" --privileged --user 0:0 --read-only \
        --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --network=ns:/run/netns/"$image_ns" \
        "$image_tag" --sysctls-only >"$tmp/sysctls.log" 2>&1 ||
        { cat "$tmp/sysctls.log"; fail "--sysctls-only in the image"; }
    for key in nf_conntrack_acct nf_conntrack_timestamp; do
        [ "$(ip netns exec "$image_ns" sysctl -n "net.netfilter.$key")" = 1 ] ||
            { cat "$tmp/sysctls.log"; fail "--sysctls-only left $key at 0"; }
    done
    echo "--sysctls-only (the init container, --privileged as uid 0): both sysctls 1, exit 0: $(tr '\n' ' ' <"$tmp/sysctls.log")"
    port=19101
    for uid in 65534 0; do
        ctr=$image_ctr-$uid
        t0=$(date +%s.%N)
        "${run_image[@]}" -d --name "$ctr" --user "$uid:$uid" "$image_tag" \
            --no-sysctl --node-name validate-image --metrics-bind-address "127.0.0.1:$port" >/dev/null ||
            fail "podman run as uid $uid"
        ok=0
        for _ in $(seq 100); do
            code=$(ip netns exec "$image_ns" curl -sS -o /dev/null -w '%{http_code}' \
                "http://127.0.0.1:$port/healthz" 2>/dev/null || true)
            if [ "$code" = 200 ]; then ok=1; break; fi
            sleep 0.1
        done
        [ $ok = 1 ] || { podman logs "$ctr"; fail "uid $uid: /healthz did not answer 200 within 10 s"; }
        healthz_s=$(since "$t0")
        pid=$(podman inspect -f '{{.State.Pid}}' "$ctr")
        echo "--user $uid:$uid: /healthz 200 ${healthz_s}s after podman run; /proc/$pid/status:"
        # CapAmb is 0 there: the exporter clears its ambient set once started.
        grep -E '^(Uid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' "/proc/$pid/status" | sed 's/^/  /'
        [ "$(awk '/^Uid:/ { print $2 $3 $4 $5 }' "/proc/$pid/status")" = "$uid$uid$uid$uid" ] ||
            fail "the container's process does not run as uid $uid"
        [ "$(awk '/^CapEff:/ { print $2 }' "/proc/$pid/status")" = 0000000000001000 ] ||
            fail "uid $uid: the container's process has not CAP_NET_ADMIN alone in effect"
        ip netns exec "$image_ns" curl -fsS "http://127.0.0.1:$port/metrics" >"$tmp/image-metrics.txt" ||
            fail "uid $uid: /metrics"
        series=$(grep -c '^conntrack_monitoring_' "$tmp/image-metrics.txt" || true)
        [ "$series" -gt 0 ] || fail "uid $uid: /metrics has no conntrack_monitoring_ series"
        # SO_RCVBUFFORCE, which needs CAP_NET_ADMIN, got the default 64 MiB (doubled).
        grep -q '^conntrack_monitoring_netlink_receive_buffer_bytes{.*} 134217728$' "$tmp/image-metrics.txt" ||
            fail "uid $uid: the receive buffer was not forced to 128 MiB"
        echo "  $series conntrack_monitoring_ samples on /metrics, receive buffer 128 MiB"
        port=$((port + 1))
    done
fi

echo
echo "deploy/ validation passed"
