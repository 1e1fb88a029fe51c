//! The deployment as shipped, checked as far as this machine can without a cluster or a
//! container engine: the Kubernetes objects refer to each other correctly (the tier's resolver
//! finds the replicas' headless Service and may read its EndpointSlices, the sidecars send to the
//! tier, every replica is scraped on its own under the jobs the alerts select), the embedded
//! configs are the shipped ones, and the Dockerfile builds what Cargo needs and runs a command
//! the binary accepts. (`otelcol validate` in the test command checks the Collector configs.)

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::Scratch;

use serde::Deserialize;
use serde_norway::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

/// Every object in the Kubernetes manifests.
fn objects() -> Vec<Value> {
    let mut out = Vec::new();
    for file in [
        "deploy/kubernetes/spanagg.yaml",
        "deploy/kubernetes/tier.yaml",
    ] {
        for doc in serde_norway::Deserializer::from_str(&read(file)) {
            out.push(Value::deserialize(doc).unwrap());
        }
    }
    out
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// The ConfigMap value `key` of `name`.
fn config_map<'a>(objects: &'a [Value], name: &str, key: &str) -> &'a str {
    s(&find(objects, "ConfigMap", name)["data"][key])
}

fn yaml(text: &str) -> Value {
    serde_norway::from_str(text).unwrap()
}

#[test]
fn the_kubernetes_example_config_is_a_valid_spanagg_config() {
    let objects = objects();
    let cfg = config_map(&objects, "spanagg", "spanagg.yaml");
    let dir = Scratch::new();
    let path = dir.path().join("spanagg.yaml");
    std::fs::write(&path, cfg).unwrap();
    let c = spanagg::config::Config::from_file(&path).unwrap();
    assert_eq!(c.grpc_listen.to_string(), "0.0.0.0:4317");
    assert_eq!(c.data_dir, Path::new("/data"));
}

#[test]
fn the_tier_finds_every_replica_and_only_through_the_headless_service() {
    let objects = objects();
    // The tier runs the shipped load_balancing config, byte for byte.
    let tier_cfg = config_map(&objects, "spanagg-tier", "config.yaml");
    assert_eq!(tier_cfg, read("deploy/collector/loadbalancing.yaml"));
    let resolver = &yaml(tier_cfg)["exporters"]["load_balancing"]["resolver"]["k8s"];
    let (svc_name, namespace) = s(&resolver["service"]).split_once('.').unwrap();

    // ... which names a headless Service of the StatefulSet's pods, listing them while they
    // restart, on the port the resolver dials.
    let svc = find(&objects, "Service", svc_name);
    assert_eq!(svc["metadata"]["namespace"], namespace);
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
    let sts = find(&objects, "StatefulSet", "spanagg");
    assert_eq!(
        svc["spec"]["selector"],
        sts["spec"]["template"]["metadata"]["labels"]
    );
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    let grpc_port = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "otlp-grpc")
        .unwrap()["containerPort"]
        .clone();
    assert_eq!(resolver["ports"][0], grpc_port);
    assert!(svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["port"] == grpc_port));

    // No load-balanced Service in front of the replicas: it would split a service's pods over
    // them at random (partial sums) and make scrapes land on a random replica.
    for o in &objects {
        if o["kind"] == "Service" && o["spec"]["selector"] == svc["spec"]["selector"] {
            assert_eq!(
                o["spec"]["clusterIP"], "None",
                "Service {:?} balances over the replicas",
                o["metadata"]["name"]
            );
        }
    }

    // The tier's service account may read the EndpointSlices there.
    let deploy = find(&objects, "Deployment", "spanagg-tier");
    let account = s(&deploy["spec"]["template"]["spec"]["serviceAccountName"]);
    let binding = objects
        .iter()
        .find(|o| {
            o["kind"] == "RoleBinding"
                && o["metadata"]["namespace"] == namespace
                && o["subjects"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|x| x["kind"] == "ServiceAccount" && x["name"] == account)
        })
        .expect("a RoleBinding for the tier's service account");
    let role = find(&objects, "Role", s(&binding["roleRef"]["name"]));
    assert_eq!(role["metadata"]["namespace"], namespace);
    let rule = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["apiGroups"][0] == "discovery.k8s.io" && r["resources"][0] == "endpointslices")
        .expect("a rule for discovery.k8s.io endpointslices");
    for verb in ["get", "list", "watch"] {
        assert!(
            rule["verbs"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v == verb),
            "{verb}"
        );
    }

    // The tier's image is the Collector release the tests build.
    let image = s(&deploy["spec"]["template"]["spec"]["containers"][0]["image"]);
    let pinned = read("tests/otelcol/go.mod")
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("go.opentelemetry.io/collector/otelcol v")
                .map(str::to_owned)
        })
        .unwrap();
    assert_eq!(
        image,
        format!("otel/opentelemetry-collector-contrib:{pinned}")
    );

    // The sidecars send to the tier's Service.
    let sidecar = yaml(&read("deploy/collector/sidecar.yaml"));
    let endpoint = s(&sidecar["exporters"]["otlp_grpc/spanagg"]["endpoint"]);
    let tier_svc = find(&objects, "Service", "spanagg-tier");
    assert_eq!(
        tier_svc["spec"]["selector"],
        deploy["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(
        endpoint,
        format!(
            "spanagg-tier.{}.svc.cluster.local:{}",
            s(&tier_svc["metadata"]["namespace"]),
            tier_svc["spec"]["ports"][0]["port"].as_u64().unwrap()
        )
    );
}

/// The jobs the alerts select must be what the shipped scrape configs produce.
fn alert_jobs() -> Vec<String> {
    let rules = read("alerts/spanagg.rules.yml");
    let mut jobs: Vec<String> = rules
        .split("job=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect();
    jobs.sort();
    jobs.dedup();
    jobs
}

#[test]
fn every_replica_is_scraped_on_its_own_under_the_jobs_the_alerts_select() {
    assert_eq!(alert_jobs(), ["spanagg-internal"]);
    let objects = objects();
    let sts = find(&objects, "StatefulSet", "spanagg");
    let monitor = find(&objects, "PodMonitor", "spanagg");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        sts["spec"]["template"]["metadata"]["labels"]
    );
    let mut jobs = Vec::new();
    for ep in monitor["spec"]["podMetricsEndpoints"]
        .as_sequence()
        .unwrap()
    {
        let relabel = ep["relabelings"].as_sequence().unwrap();
        let job = relabel.iter().find(|r| r["targetLabel"] == "job").unwrap();
        jobs.push((s(&ep["path"]).to_owned(), s(&job["replacement"]).to_owned()));
        // Named by pod: a restarted replica is the same instance (the vanished-target alert).
        assert!(relabel.iter().any(|r| r["targetLabel"] == "instance"
            && r["sourceLabels"][0] == "__meta_kubernetes_pod_name"));
    }
    jobs.sort();
    assert_eq!(
        jobs,
        [
            (
                "/internal/metrics".to_owned(),
                "spanagg-internal".to_owned()
            ),
            ("/metrics".to_owned(), "spanagg".to_owned()),
        ]
    );

    // The same for the plain Prometheus config (its syntax is promtool's to check).
    let prom = yaml(&read("deploy/prometheus/prometheus.yml"));
    let mut prom_jobs: Vec<(String, String)> = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|j| {
            let keep = j["relabel_configs"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|r| r["action"] == "keep" && r["regex"] == "spanagg");
            assert!(keep, "{:?} keeps only spanagg pods", j["job_name"]);
            assert_eq!(j["kubernetes_sd_configs"][0]["role"], "pod");
            (
                s(&j["metrics_path"]).to_owned(),
                s(&j["job_name"]).to_owned(),
            )
        })
        .collect();
    prom_jobs.sort();
    assert_eq!(prom_jobs, jobs);
}

/// The instruction lines of the Dockerfile's last stage, and all its COPY sources from the
/// build context.
fn dockerfile() -> (Vec<String>, Vec<String>) {
    let text = read("Dockerfile");
    let mut stage = Vec::new();
    let mut context_sources = Vec::new();
    let mut joined = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        joined.push_str(line.trim_end_matches('\\'));
        if line.ends_with('\\') {
            continue;
        }
        let ins = std::mem::take(&mut joined);
        let ins = ins.trim();
        if ins.starts_with("FROM ") {
            stage.clear();
        }
        if let Some(rest) = ins.strip_prefix("COPY ") {
            if !rest.contains("--from=") {
                let words: Vec<&str> = rest.split_whitespace().collect();
                context_sources.extend(words[..words.len() - 1].iter().map(|w| w.to_string()));
            }
        }
        if !ins.is_empty() {
            stage.push(ins.to_owned());
        }
    }
    (stage, context_sources)
}

#[test]
fn the_image_runs_unprivileged_with_its_state_on_a_volume_and_a_command_spanagg_accepts() {
    let (stage, sources) = dockerfile();
    let get = |word: &str| -> Vec<String> {
        stage
            .iter()
            .filter_map(|l| l.strip_prefix(word).map(|r| r.trim().to_owned()))
            .collect()
    };
    // What the build copies exists, is not ignored, and is all Cargo needs.
    let ignored = read(".dockerignore");
    for src in &sources {
        assert!(root().join(src).exists(), "COPY {src}: missing");
        assert!(
            !ignored
                .lines()
                .any(|l| l.trim() == src.trim_end_matches('/')),
            "{src} is in .dockerignore"
        );
    }
    for needed in ["Cargo.toml", "Cargo.lock", "src", "benches"] {
        assert!(
            sources.iter().any(|s| s == needed),
            "the build needs {needed}"
        );
    }

    let user = get("USER ");
    let uid: u32 = user[0].split(':').next().unwrap().parse().unwrap();
    assert_ne!(uid, 0, "runs as root");
    assert_eq!(get("VOLUME "), [r#"["/data"]"#]);
    let exposed: Vec<u64> = get("EXPOSE ")[0]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();

    // The manifest runs that image as that user, with the data volume where the image wants it.
    let objects = objects();
    let pod = &find(&objects, "StatefulSet", "spanagg")["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"]["runAsUser"].as_u64(),
        Some(uid.into())
    );
    assert_eq!(pod["securityContext"]["fsGroup"].as_u64(), Some(uid.into()));
    let container = &pod["containers"][0];
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(s(&container["image"]), format!("spanagg:{version}"));
    assert!(read("Dockerfile").contains(&format!("docker build -t spanagg:{version} .")));
    let ports: Vec<u64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, exposed);
    assert!(container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|m| m["mountPath"] == "/data"));

    // The default command starts spanagg (its addresses moved to free loopback ports here).
    let cmd: Vec<String> = serde_json::from_str(&get("CMD ")[0]).unwrap();
    assert_eq!(cmd[0], "serve");
    let dir = Scratch::new();
    let args: Vec<String> = cmd
        .iter()
        .map(|a| {
            if a == "/data" {
                dir.path().display().to_string()
            } else if a.starts_with("0.0.0.0:") {
                "127.0.0.1:0".to_owned()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spanagg"))
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let listening = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .any(|l| l.contains("listening: OTLP/gRPC on 127.0.0.1:"));
    child.kill().ok();
    child.wait().ok();
    assert!(listening, "spanagg did not start with {args:?}");
}
