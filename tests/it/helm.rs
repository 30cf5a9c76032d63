//! The helm chart `helm/framematch`, checked by the real `helm` (STYLE.md §3.6: qdrant-helm runs
//! helm in its tests too): `helm lint --strict` and `helm template` for the default values, the
//! embedded mode, the PostgreSQL mode and every optional resource, with assertions on the
//! rendered manifests (gRPC probes on `grpc.health.v1` with numeric ports, ports, security
//! context, volumes and PVC, secret references). When `kubernetes-validate` (PyPI) is installed,
//! the rendered manifests are also validated offline against strict Kubernetes schemas.
//!
//! helm and kubernetes-validate come from `.ci/run`. Outside CI a missing tool makes the test
//! print `skipping: ...` and pass; under CI (`CI` set) it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_norway::Value;

/// The oldest and newest Kubernetes versions the chart claims (`kubeVersion` in Chart.yaml) and
/// kubernetes-validate 1.37 has schemas for.
const KUBE_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];
/// `helm template` renders for this version (and `Capabilities` checks against it).
const RENDER_KUBE_VERSION: &str = "1.33.0";
const RELEASE: &str = "fm";
const NAMESPACE: &str = "moderation";

fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("helm/framematch")
}

/// Finds a tool on PATH or in Go's bin directory (where `go install` puts helm).
fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    if let Some(gopath) = std::env::var_os("GOPATH") {
        dirs.extend(std::env::split_paths(&gopath).map(|dir| dir.join("bin")));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join("go/bin"));
    }
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The tool, or `None` after saying why the test is skipped; under CI its absence fails.
fn required_tool(name: &str, install: &str) -> Option<PathBuf> {
    if let Some(path) = find_tool(name) {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have {name} (.ci/run installs it: {install})"
    );
    eprintln!("skipping: {name} not found on PATH or in $GOPATH/bin (install: {install})");
    None
}

fn helm() -> Option<PathBuf> {
    required_tool(
        "helm",
        "go install helm.sh/helm/v3/cmd/helm@v3.22.0, see .ci/run",
    )
}

/// `--set` pairs for each mode the chart has.
const EMBEDDED: &[&str] = &[];
const POSTGRES_EXISTING_SECRET: &[&str] = &[
    "store.postgres.enabled=true",
    "store.postgres.existingSecret=framematch-db",
];
const POSTGRES_URL: &[&str] = &[
    "store.postgres.enabled=true",
    "store.postgres.url=postgres://framematch:s3cret@db.internal:5432/framematch",
];
/// PostgreSQL with every optional resource and OTLP on.
const EVERYTHING: &[&str] = &[
    "store.postgres.enabled=true",
    "store.postgres.existingSecret=framematch-db",
    "store.postgres.secretKey=dsn",
    "autoscaling.enabled=true",
    "autoscaling.targetMemoryUtilizationPercentage=80",
    "serviceMonitor.enabled=true",
    "serviceMonitor.labels.release=prometheus",
    "networkPolicy.enabled=true",
    "networkPolicy.egress.enabled=true",
    "networkPolicy.grpcFrom[0].podSelector.matchLabels.app=uploader",
    "networkPolicy.egress.rules[0].ports[0].port=5432",
    "otel.endpoint=http://otel-collector.observability:4317",
    "otel.resourceAttributes=deployment.environment=prod",
    "otel.headersSecret.name=otlp-auth",
];

fn set_args(sets: &[&str]) -> Vec<String> {
    sets.iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

/// Runs `helm template` and returns its output, or the error text when helm refused.
fn template_raw(helm: &Path, sets: &[&str]) -> Result<String, String> {
    let output = Command::new(helm)
        .args(["template", RELEASE])
        .arg(chart_dir())
        .args([
            "--namespace",
            NAMESPACE,
            "--kube-version",
            RENDER_KUBE_VERSION,
        ])
        .args(set_args(sets))
        .output()
        .expect("run helm template");
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).expect("helm prints UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The rendered manifests, one YAML document each.
struct Rendered {
    text: String,
    docs: Vec<Value>,
}

impl Rendered {
    fn of(helm: &Path, sets: &[&str]) -> Self {
        let text = template_raw(helm, sets)
            .unwrap_or_else(|error| panic!("helm template {sets:?} failed:\n{error}"));
        let docs = serde_norway::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("helm renders valid YAML"))
            .filter(|doc| !doc.is_null())
            .collect();
        Self { text, docs }
    }

    fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.docs.iter().map(|d| str_at(d, "kind")).collect();
        kinds.sort();
        kinds
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "one {kind} expected, got {}", found.len());
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} named {name}"))
    }

    /// The StatefulSet or the Deployment: the one workload.
    fn workload(&self) -> &Value {
        let found: Vec<&Value> = self
            .docs
            .iter()
            .filter(|d| d["kind"] == "StatefulSet" || d["kind"] == "Deployment")
            .collect();
        assert_eq!(found.len(), 1, "exactly one workload");
        found[0]
    }

    fn container(&self) -> &Value {
        let containers = seq_at(&self.workload()["spec"]["template"]["spec"], "containers");
        assert_eq!(containers.len(), 1, "one container");
        &containers[0]
    }
}

fn str_at(value: &Value, key: &str) -> String {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {value:?}"))
        .to_string()
}

fn seq_at<'a>(value: &'a Value, key: &str) -> &'a Vec<Value> {
    value[key]
        .as_sequence()
        .unwrap_or_else(|| panic!("{key} is not a list in {value:?}"))
}

/// The container's environment as name -> entry.
fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    seq_at(container, "env").iter().find(|e| e["name"] == name)
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    env(container, name).map(|e| str_at(e, "value"))
}

#[test]
fn chart_passes_helm_lint_strict_in_every_mode() {
    let Some(helm) = helm() else { return };
    for sets in [EMBEDDED, POSTGRES_EXISTING_SECRET, POSTGRES_URL, EVERYTHING] {
        let output = Command::new(&helm)
            .args(["lint", "--strict", "--kube-version", RENDER_KUBE_VERSION])
            .arg(chart_dir())
            .args(set_args(sets))
            .output()
            .expect("run helm lint");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "helm lint --strict {sets:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("0 chart(s) failed"),
            "lint summary: {stdout}"
        );
        assert!(!stdout.contains("[WARNING]"), "lint warnings: {stdout}");
    }
}

#[test]
fn default_values_render_a_single_replica_statefulset_with_a_pvc() {
    let Some(helm) = helm() else { return };
    let r = Rendered::of(&helm, EMBEDDED);
    assert_eq!(
        r.kinds(),
        [
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceAccount",
            "StatefulSet"
        ]
    );
    let sts = r.one("StatefulSet");
    assert_eq!(sts["metadata"]["name"], "fm-framematch");
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(1));
    // Its governing Service exists and is headless.
    let headless = r.named("Service", &str_at(&sts["spec"], "serviceName"));
    assert_eq!(headless["spec"]["clusterIP"], "None");

    // The store: a PVC from the claim template, mounted at /data, named by FRAMEMATCH_DATA_DIR.
    let claims = seq_at(&sts["spec"], "volumeClaimTemplates");
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0]["metadata"]["name"], "data");
    assert_eq!(claims[0]["spec"]["accessModes"][0], "ReadWriteOnce");
    assert_eq!(
        claims[0]["spec"]["resources"]["requests"]["storage"],
        "10Gi"
    );
    assert!(
        claims[0]["spec"]["storageClassName"].is_null(),
        "default class"
    );
    let c = r.container();
    let mounts = seq_at(c, "volumeMounts");
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| str_at(m, "mountPath"))
    };
    assert_eq!(mount("data").as_deref(), Some("/data"));
    assert_eq!(mount("tmp").as_deref(), Some("/tmp"));
    assert_eq!(
        env_value(c, "FRAMEMATCH_DATA_DIR").as_deref(),
        Some("/data")
    );
    assert!(env(c, "FRAMEMATCH_STORE").is_none());
    // /tmp is an emptyDir (the root filesystem is read-only); data is the claim, not a volume.
    let volumes = seq_at(&sts["spec"]["template"]["spec"], "volumes");
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    assert_eq!(volumes[0]["name"], "tmp");
    assert!(volumes[0]["emptyDir"].is_mapping());
    // The server listens on every interface at the ports the Service targets.
    assert_eq!(
        env_value(c, "FRAMEMATCH_LISTEN").as_deref(),
        Some("0.0.0.0:50051")
    );
    assert_eq!(
        env_value(c, "FRAMEMATCH_METRICS_LISTEN").as_deref(),
        Some("0.0.0.0:9090")
    );
    assert_eq!(c["args"][0], "serve");
    assert_eq!(c["image"], "framematch:0.1.0");
    // Resources are set, PDB never blocks a drain of the single pod.
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(
        r.one("PodDisruptionBudget")["spec"]["maxUnavailable"].as_u64(),
        Some(1)
    );
}

/// Issue #13 item 1: the decode limits reach the container, and the default decode budget plus
/// the 512 MiB the rest of the server needs under load (bench/memory/run.sh) fits the chart's
/// memory limit.
#[test]
fn decode_limits_reach_the_container_and_fit_the_memory_limit() {
    let Some(helm) = helm() else { return };
    let r = Rendered::of(&helm, EMBEDDED);
    let c = r.container();
    let number = |name: &str| -> u64 {
        env_value(c, name)
            .unwrap_or_else(|| panic!("{name} is set"))
            .parse()
            .expect("a number")
    };
    assert_eq!(number("FRAMEMATCH_MAX_DECODE_BYTES"), 256 << 20);
    let budget = number("FRAMEMATCH_DECODE_MEMORY");
    assert_eq!(budget, 1 << 30);
    let limit = str_at(&c["resources"]["limits"], "memory");
    let limit_bytes: u64 = match limit.strip_suffix("Gi") {
        Some(gi) => gi.parse::<u64>().expect("Gi") << 30,
        None => {
            limit
                .strip_suffix("Mi")
                .expect("Mi or Gi")
                .parse::<u64>()
                .expect("Mi")
                << 20
        }
    };
    assert!(
        budget + (512 << 20) <= limit_bytes,
        "decodeMemory {budget} + 512 MiB must fit the memory limit {limit}"
    );
    let mut sets = EMBEDDED.to_vec();
    sets.extend([
        "server.decodeMemory=536870912",
        "server.maxDecodeBytes=1000",
    ]);
    let set = Rendered::of(&helm, &sets);
    assert_eq!(
        env_value(set.container(), "FRAMEMATCH_DECODE_MEMORY").as_deref(),
        Some("536870912")
    );
    assert_eq!(
        env_value(set.container(), "FRAMEMATCH_MAX_DECODE_BYTES").as_deref(),
        Some("1000")
    );
}

#[test]
fn embedded_mode_can_use_an_existing_claim_or_a_storage_class() {
    let Some(helm) = helm() else { return };
    let r = Rendered::of(
        &helm,
        &["store.embedded.persistence.existingClaim=framematch-data"],
    );
    let sts = r.one("StatefulSet");
    assert!(sts["spec"]["volumeClaimTemplates"].is_null());
    let volumes = seq_at(&sts["spec"]["template"]["spec"], "volumes");
    let data = volumes
        .iter()
        .find(|v| v["name"] == "data")
        .expect("data volume");
    assert_eq!(
        data["persistentVolumeClaim"]["claimName"],
        "framematch-data"
    );

    let r = Rendered::of(
        &helm,
        &[
            "store.embedded.persistence.storageClassName=fast-ssd",
            "store.embedded.persistence.size=50Gi",
        ],
    );
    let claim = &r.one("StatefulSet")["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["spec"]["storageClassName"], "fast-ssd");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "50Gi");
}

#[test]
fn probes_use_grpc_health_on_the_numeric_grpc_port() {
    let Some(helm) = helm() else { return };
    for (sets, port) in [
        (EMBEDDED.to_vec(), 50051),
        (EVERYTHING.to_vec(), 50051),
        (vec!["server.grpcPort=6000"], 6000),
    ] {
        let r = Rendered::of(&helm, &sets);
        let c = r.container();
        for (probe, service) in [
            ("startupProbe", Some("framematch.v1.Matcher")),
            ("readinessProbe", Some("framematch.v1.Matcher")),
            // Liveness watches the server as a whole: losing PostgreSQL turns only Banks
            // NOT_SERVING, which must not restart a pod that still answers matches.
            ("livenessProbe", None),
        ] {
            let grpc = &c[probe]["grpc"];
            assert!(grpc.is_mapping(), "{probe} is a gRPC probe: {:?}", c[probe]);
            // A gRPC probe's port must be a number: the API has no named ports there.
            assert_eq!(grpc["port"].as_u64(), Some(port), "{probe} port: {grpc:?}");
            assert_eq!(grpc["service"].as_str(), service, "{probe} service");
            for other in ["httpGet", "tcpSocket", "exec"] {
                assert!(c[probe][other].is_null(), "{probe} has {other}");
            }
            assert!(c[probe]["periodSeconds"].as_u64().is_some());
        }
        // The startup probe gives a large index time to load before liveness starts.
        let startup = &c["startupProbe"];
        let budget = startup["periodSeconds"].as_u64().unwrap_or(0)
            * startup["failureThreshold"].as_u64().unwrap_or(0);
        assert!(budget >= 300, "startup budget {budget} s");
        // The container's gRPC port is the probes' port.
        let ports = seq_at(c, "ports");
        let grpc_port = ports
            .iter()
            .find(|p| p["name"] == "grpc")
            .expect("grpc port");
        assert_eq!(grpc_port["containerPort"].as_u64(), Some(port));
        assert_eq!(
            env_value(c, "FRAMEMATCH_LISTEN"),
            Some(format!("0.0.0.0:{port}"))
        );
    }
}

#[test]
fn services_expose_the_grpc_and_metrics_ports() {
    let Some(helm) = helm() else { return };
    for sets in [EMBEDDED, POSTGRES_EXISTING_SECRET] {
        let r = Rendered::of(&helm, sets);
        let service = r.named("Service", "fm-framematch");
        assert_eq!(service["spec"]["type"], "ClusterIP");
        let ports = seq_at(&service["spec"], "ports");
        let port = |name: &str| {
            ports
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("service port {name}"))
        };
        assert_eq!(port("grpc")["port"].as_u64(), Some(50051));
        assert_eq!(port("grpc")["targetPort"], "grpc");
        assert_eq!(port("grpc")["appProtocol"], "kubernetes.io/h2c");
        assert_eq!(port("metrics")["port"].as_u64(), Some(9090));
        assert_eq!(port("metrics")["targetPort"], "metrics");
        // Both Services select the workload's pods.
        let pod_labels = &r.workload()["spec"]["template"]["metadata"]["labels"];
        for svc in r.all("Service") {
            let selector = svc["spec"]["selector"].as_mapping().expect("selector");
            for (key, value) in selector {
                assert_eq!(&pod_labels[key.as_str().expect("label")], value);
            }
        }
        let container_ports: Vec<(String, u64)> = seq_at(r.container(), "ports")
            .iter()
            .map(|p| (str_at(p, "name"), p["containerPort"].as_u64().unwrap_or(0)))
            .collect();
        assert_eq!(
            container_ports,
            [("grpc".to_string(), 50051), ("metrics".to_string(), 9090)]
        );
    }
}

#[test]
fn pods_run_as_non_root_with_a_read_only_root_filesystem() {
    let Some(helm) = helm() else { return };
    for sets in [EMBEDDED, POSTGRES_URL] {
        let r = Rendered::of(&helm, sets);
        let pod = &r.workload()["spec"]["template"]["spec"];
        let psc = &pod["securityContext"];
        assert_eq!(psc["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(psc["runAsUser"].as_u64(), Some(10001));
        // fsGroup makes the embedded data volume writable by that user.
        assert_eq!(psc["fsGroup"].as_u64(), Some(10001));
        assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
        let sc = &r.container()["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(sc["capabilities"]["drop"][0], "ALL");
        // Longer than framematch's own shutdown grace, so it ends streams itself.
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(0);
        let shutdown_ms: u64 = env_value(r.container(), "FRAMEMATCH_SHUTDOWN_GRACE_MS")
            .and_then(|v| v.parse().ok())
            .expect("FRAMEMATCH_SHUTDOWN_GRACE_MS");
        assert!(grace * 1000 > shutdown_ms, "{grace} s vs {shutdown_ms} ms");
    }
}

#[test]
fn the_dockerfile_runs_as_the_charts_user_and_exposes_its_ports() {
    let dockerfile =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
            .expect("Dockerfile");
    assert!(
        dockerfile.contains("\nUSER 10001:10001\n"),
        "non-root numeric user"
    );
    assert!(dockerfile.contains("\nEXPOSE 50051 9090\n"));
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/framematch\"]"));
    assert!(dockerfile.contains("CMD [\"serve\"]"));
    let values = std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml");
    assert!(values.contains("  runAsUser: 10001\n"));
    assert!(values.contains("  repository: framematch\n"));
}

#[test]
fn postgres_mode_renders_a_deployment_reading_the_url_from_an_existing_secret() {
    let Some(helm) = helm() else { return };
    let r = Rendered::of(&helm, POSTGRES_EXISTING_SECRET);
    assert_eq!(
        r.kinds(),
        [
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceAccount"
        ]
    );
    let deployment = r.one("Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0)
    );
    let c = r.container();
    let store = env(c, "FRAMEMATCH_STORE").expect("FRAMEMATCH_STORE");
    assert!(
        store["value"].is_null(),
        "the URL never appears in the pod spec"
    );
    assert_eq!(store["valueFrom"]["secretKeyRef"]["name"], "framematch-db");
    assert_eq!(store["valueFrom"]["secretKeyRef"]["key"], "url");
    assert!(env(c, "FRAMEMATCH_DATA_DIR").is_none());
    // No store volume: only /tmp.
    let volumes = seq_at(&deployment["spec"]["template"]["spec"], "volumes");
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0]["name"], "tmp");
    assert_eq!(seq_at(c, "volumeMounts").len(), 1);
    assert!(!r.text.contains("PersistentVolumeClaim"));
}

#[test]
fn postgres_mode_can_create_the_secret_from_a_url() {
    let Some(helm) = helm() else { return };
    let r = Rendered::of(&helm, POSTGRES_URL);
    let secret = r.one("Secret");
    assert_eq!(secret["metadata"]["name"], "fm-framematch-postgres");
    let encoded = str_at(&secret["data"], "url");
    assert_eq!(
        encoded,
        // base64 of postgres://framematch:s3cret@db.internal:5432/framematch
        "cG9zdGdyZXM6Ly9mcmFtZW1hdGNoOnMzY3JldEBkYi5pbnRlcm5hbDo1NDMyL2ZyYW1lbWF0Y2g="
    );
    let store = env(r.container(), "FRAMEMATCH_STORE").expect("FRAMEMATCH_STORE");
    assert_eq!(
        store["valueFrom"]["secretKeyRef"]["name"],
        "fm-framematch-postgres"
    );
    // Changing the URL rolls the pods.
    let annotations = &r.one("Deployment")["spec"]["template"]["metadata"]["annotations"];
    assert!(annotations["checksum/postgres-secret"].is_string());
    assert!(
        !r.text.contains("s3cret"),
        "the password only appears base64-encoded"
    );
}

#[test]
fn optional_hpa_servicemonitor_and_networkpolicy_render_when_enabled() {
    let Some(helm) = helm() else { return };
    let r = Rendered::of(&helm, EVERYTHING);
    assert_eq!(
        r.kinds(),
        [
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
    // The HPA owns the replica count.
    let deployment = r.one("Deployment");
    assert!(deployment["spec"]["replicas"].is_null());
    let hpa = r.one("HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "fm-framematch");
    assert_eq!(hpa["spec"]["minReplicas"].as_u64(), Some(2));
    assert_eq!(seq_at(&hpa["spec"], "metrics").len(), 2, "cpu and memory");
    // The ServiceMonitor scrapes the metrics port of the ClusterIP Service only.
    let sm = r.one("ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm["spec"]["namespaceSelector"]["matchNames"][0], NAMESPACE);
    let headless = r.named("Service", "fm-framematch-headless");
    assert_eq!(
        headless["metadata"]["labels"]["framematch.io/headless"],
        "true"
    );
    assert_eq!(
        sm["spec"]["selector"]["matchExpressions"][0]["key"],
        "framematch.io/headless"
    );
    // NetworkPolicy: gRPC from the uploader only, metrics from anywhere, egress DNS + 5432.
    let np = r.one("NetworkPolicy");
    let ingress = seq_at(&np["spec"], "ingress");
    assert_eq!(ingress[0]["ports"][0]["port"].as_u64(), Some(50051));
    assert_eq!(
        ingress[0]["from"][0]["podSelector"]["matchLabels"]["app"],
        "uploader"
    );
    assert_eq!(ingress[1]["ports"][0]["port"].as_u64(), Some(9090));
    assert!(ingress[1]["from"].is_null());
    let egress = seq_at(&np["spec"], "egress");
    assert_eq!(egress[0]["ports"][0]["port"].as_u64(), Some(53));
    assert_eq!(egress[1]["ports"][0]["port"].as_u64(), Some(5432));
    assert_eq!(seq_at(&np["spec"], "policyTypes").len(), 2);
    // The database key is the one asked for.
    let store = env(r.container(), "FRAMEMATCH_STORE").expect("FRAMEMATCH_STORE");
    assert_eq!(store["valueFrom"]["secretKeyRef"]["key"], "dsn");
}

#[test]
fn otel_settings_reach_the_container() {
    let Some(helm) = helm() else { return };
    let c_default = Rendered::of(&helm, EMBEDDED);
    let c = c_default.container();
    assert!(
        env(c, "OTEL_EXPORTER_OTLP_ENDPOINT").is_none(),
        "OTLP off by default"
    );
    assert_eq!(
        env_value(c, "OTEL_SERVICE_NAME").as_deref(),
        Some("framematch")
    );

    let r = Rendered::of(&helm, EVERYTHING);
    let c = r.container();
    assert_eq!(
        env_value(c, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
        Some("http://otel-collector.observability:4317")
    );
    let attributes = env_value(c, "OTEL_RESOURCE_ATTRIBUTES").expect("attributes");
    assert!(attributes.starts_with("k8s.pod.name=$(POD_NAME),"));
    assert!(attributes.ends_with(",deployment.environment=prod"));
    // $(POD_NAME) only expands when POD_NAME is defined earlier in the list.
    let names: Vec<String> = seq_at(c, "env").iter().map(|e| str_at(e, "name")).collect();
    let position = |name: &str| names.iter().position(|n| n == name).expect(name);
    assert!(position("POD_NAME") < position("OTEL_RESOURCE_ATTRIBUTES"));
    let headers = env(c, "OTEL_EXPORTER_OTLP_HEADERS").expect("headers");
    assert_eq!(headers["valueFrom"]["secretKeyRef"]["name"], "otlp-auth");
}

#[test]
fn values_that_would_break_the_release_are_refused() {
    let Some(helm) = helm() else { return };
    for (sets, expected) in [
        (
            vec!["autoscaling.enabled=true"],
            "autoscaling.enabled needs store.postgres.enabled",
        ),
        (
            vec!["store.postgres.enabled=true"],
            "store.postgres.enabled needs store.postgres.existingSecret",
        ),
        (
            vec!["server.indexEngine=faiss"],
            "value must be one of 'mih', 'exact', 'hnsw'",
        ),
        (
            vec!["replicas=3"],
            "additional properties 'replicas' not allowed",
        ),
        (vec!["server.grpcPort=70000"], "/server/grpcPort"),
        (
            vec!["probes.liveness.service=framematch.v1.Banks2"],
            "/probes/liveness/service",
        ),
        (vec!["store.postgres.url=mysql://x"], "/store/postgres/url"),
        (
            vec!["terminationGracePeriodSeconds=5"],
            "must exceed server.shutdownGraceMs",
        ),
        (
            vec!["podDisruptionBudget.minAvailable=1"],
            "set minAvailable or maxUnavailable, not both",
        ),
    ] {
        let error = template_raw(&helm, &sets)
            .err()
            .unwrap_or_else(|| panic!("{sets:?} should be refused"));
        assert!(error.contains(expected), "{sets:?}: {error}");
    }
}

/// kubernetes-validate, when installed: the rendered manifests against the strict schemas of
/// the oldest and newest Kubernetes the chart supports. It knows no CRDs, so the ServiceMonitor
/// only draws a warning there (its shape is asserted above).
#[test]
fn rendered_manifests_pass_strict_kubernetes_schemas() {
    let Some(helm) = helm() else { return };
    let Some(validator) = required_tool(
        "kubernetes-validate",
        "pip install kubernetes-validate==1.37.0, see .ci/run",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut files = Vec::new();
    for (name, sets) in [
        ("embedded", EMBEDDED),
        ("postgres-url", POSTGRES_URL),
        ("everything", EVERYTHING),
        (
            "existing-claim",
            &["store.embedded.persistence.existingClaim=data"][..],
        ),
        (
            "no-persistence",
            &["store.embedded.persistence.enabled=false"][..],
        ),
    ] {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, Rendered::of(&helm, sets).text).expect("write manifests");
        files.push(path);
    }
    for version in KUBE_VERSIONS {
        let output = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .expect("run kubernetes-validate");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "kubernetes-validate --strict -k {version}:\n{stdout}\n{stderr}"
        );
        // Every built-in resource was checked, not skipped.
        let passed = stdout
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert!(passed >= 25, "only {passed} resources validated:\n{stdout}");
        for line in stdout.lines().chain(stderr.lines()) {
            if line.starts_with("WARN") {
                assert!(
                    line.contains("ServiceMonitor"),
                    "unexpected warning: {line}"
                );
            }
            assert!(!line.starts_with("ERROR"), "{line}");
        }
    }
}

/// Copies the chart, recursively, so a test can add files to the copy.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read chart dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy chart file");
        }
    }
}

/// NOTES.txt is only rendered by `helm install` (which needs a cluster), so a copy of the chart
/// renders it through `tpl` into a document `helm template` can show.
#[test]
fn notes_render_for_every_mode() {
    let Some(helm) = helm() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let chart = dir.path().join("framematch");
    copy_dir(&chart_dir(), &chart);
    std::fs::create_dir_all(chart.join("notes")).expect("notes dir");
    std::fs::copy(
        chart.join("templates/NOTES.txt"),
        chart.join("notes/NOTES.txt"),
    )
    .expect("copy NOTES.txt");
    std::fs::write(
        chart.join("templates/notes-render.yaml"),
        "notes: {{ tpl (.Files.Get \"notes/NOTES.txt\") . | toJson }}\n",
    )
    .expect("write notes-render.yaml");
    for (sets, expected) in [
        (EMBEDDED, "on PVC data-fm-framematch-0 (10Gi)"),
        (
            &["store.embedded.persistence.enabled=false"][..],
            "WARNING: persistence is off",
        ),
        (POSTGRES_URL, "The chart created that Secret"),
        (
            EVERYTHING,
            "dns:///fm-framematch-headless.moderation.svc:50051",
        ),
        (
            EMBEDDED,
            "logs fm-framematch-0 | grep \"bootstrap admin key\"",
        ),
        (
            &["auth.bootstrapAdminKeySecret=fm-admin"][..],
            "the secret in Secret fm-admin (key admin-key)",
        ),
        (
            &["auth.insecureNoAuth=true"][..],
            "WARNING: auth.insecureNoAuth is on",
        ),
    ] {
        let output = Command::new(&helm)
            .args(["template", RELEASE])
            .arg(&chart)
            .args([
                "--namespace",
                NAMESPACE,
                "--kube-version",
                RENDER_KUBE_VERSION,
            ])
            .args(["--show-only", "templates/notes-render.yaml"])
            .args(set_args(sets))
            .output()
            .expect("run helm template");
        assert!(
            output.status.success(),
            "{sets:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let doc: Value = serde_norway::from_slice(&output.stdout).expect("YAML");
        let notes = str_at(&doc, "notes");
        assert!(notes.contains(expected), "{sets:?}: {notes}");
        assert!(notes.contains("grpc.health.v1"), "{notes}");
    }
}

#[test]
fn api_keys_come_from_an_existing_secret_and_auth_is_on_by_default() {
    let Some(helm) = helm() else { return };
    let defaults = Rendered::of(&helm, &[]);
    let c = defaults.container();
    assert!(env(c, "FRAMEMATCH_BOOTSTRAP_ADMIN_KEY").is_none());
    assert!(env(c, "FRAMEMATCH_INSECURE_NO_AUTH").is_none());
    let r = Rendered::of(&helm, &["auth.bootstrapAdminKeySecret=framematch-admin"]);
    let key = env(r.container(), "FRAMEMATCH_BOOTSTRAP_ADMIN_KEY").expect("bootstrap key env");
    assert!(
        key["value"].is_null(),
        "the secret never appears in the pod spec"
    );
    assert_eq!(key["valueFrom"]["secretKeyRef"]["name"], "framematch-admin");
    assert_eq!(key["valueFrom"]["secretKeyRef"]["key"], "admin-key");
    let insecure = Rendered::of(&helm, &["auth.insecureNoAuth=true"]);
    assert_eq!(
        env_value(insecure.container(), "FRAMEMATCH_INSECURE_NO_AUTH").as_deref(),
        Some("true")
    );
    let refused = template_raw(&helm, &["auth.unknown=1"]).expect_err("schema refuses");
    assert!(refused.contains("auth"), "{refused}");
}
