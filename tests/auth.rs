//! Bearer tokens on the real binary: each door (ingest over gRPC and HTTP, the read API and
//! Flight, the scrape) opens only with its own token; a missing, wrong (same or other length)
//! or other door's token gets 401 / UNAUTHENTICATED, is counted, changes nothing, and never
//! appears in the log. Health and readiness stay open.

#![allow(clippy::unwrap_used)]

mod common;

use common::{cart_delta, http, now_ns, Spanagg};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use prost::Message;

const INGEST: &str = "ingest-7f3a9c1e5b2d";
const READ: &str = "read-0c8e4a6f2b91";
const SCRAPE: &str = "scrape-5d1b7e3c9a40";

/// A spanagg with a token file per door.
fn guarded() -> Spanagg {
    // The token files live in the process's own directory, removed with it.
    let dir = common::temp_dir();
    let mut yaml = String::from("auth:\n");
    for (key, token) in [("ingest", INGEST), ("read", READ), ("scrape", SCRAPE)] {
        let path = dir.join(key);
        // A final newline, as editors and `kubectl create secret --from-file` leave it.
        std::fs::write(&path, format!("{token}\n")).unwrap();
        yaml.push_str(&format!("  {key}_token_file: {}\n", path.display()));
    }
    Spanagg::start_in(dir, &yaml)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Every way to get a door's token wrong, with the reason it is counted under.
fn wrong_for(token: &str, other_door: &str) -> Vec<(Option<String>, &'static str)> {
    let mut same_length = token.to_owned().into_bytes();
    same_length[token.len() - 1] ^= 1;
    vec![
        (None, "missing"),
        (Some(format!("Basic {token}")), "missing"),
        (
            Some(bearer(&String::from_utf8(same_length).unwrap())),
            "wrong",
        ),
        (Some(bearer(&token[..token.len() - 3])), "wrong"),
        (Some(bearer(&format!("{token}x"))), "wrong"),
        (Some(bearer(other_door)), "wrong"),
    ]
}

fn get(s: &Spanagg, path: &str, authorization: Option<&str>) -> u16 {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http(s.http, "GET", path, &headers, &[]).0
}

fn denied(s: &Spanagg, door: &str, reason: &str) -> f64 {
    let auth = bearer(SCRAPE);
    let (_, _, text) = http(
        s.http,
        "GET",
        "/internal/metrics",
        &[("Authorization", &auth)],
        &[],
    );
    let sample = format!("spanagg_auth_failures_total{{door=\"{door}\",reason=\"{reason}\"}}");
    common::sample_value(&String::from_utf8(text).unwrap(), &sample).unwrap()
}

#[test]
fn each_door_opens_only_with_its_own_token() {
    let s = guarded();
    let scrape = bearer(SCRAPE);
    let body =
        cart_delta("pod-a", 3, [1, 1, 1, 0, 0], 30.0, now_ns() - 5_000_000_000).encode_to_vec();

    // Ingest over OTLP/HTTP: refused before the body is read, nothing applied.
    for (auth, _) in wrong_for(INGEST, READ) {
        let mut headers = vec![];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let (status, reply_headers, reply) = s.post_otlp("application/x-protobuf", &headers, &body);
        assert_eq!(status, 401, "{auth:?}");
        assert!(reply_headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("www-authenticate") && v.starts_with("Bearer")));
        // An OTLP client reads a google.rpc.Status: code 16, UNAUTHENTICATED.
        assert_eq!(reply.first(), Some(&0x08));
        assert_eq!(reply.get(1), Some(&16));
    }
    // Without the token, a wrong Content-Type is not even looked at: the answer is 401.
    let (status, _, _) = s.post_otlp("text/plain", &[], &body);
    assert_eq!(status, 401, "the token is checked first");
    let scraped = |s: &Spanagg| {
        let (status, _, text) = http(
            s.http,
            "GET",
            "/metrics",
            &[("Authorization", &scrape)],
            &[],
        );
        assert_eq!(status, 200);
        String::from_utf8(text).unwrap()
    };
    assert!(!scraped(&s).contains("traces_span_metrics_calls_total{"));
    let (status, _, _) = s.post_otlp(
        "application/x-protobuf",
        &[("Authorization", &bearer(INGEST))],
        &body,
    );
    assert_eq!(status, 200);
    assert!(scraped(&s).contains("traces_span_metrics_calls_total{"));
    assert_eq!(denied(&s, "ingest", "missing"), 3.0);
    assert_eq!(denied(&s, "ingest", "wrong"), 4.0);

    // Ingest over gRPC, and Flight: UNAUTHENTICATED without the right token.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let req = cart_delta("pod-b", 1, [1, 0, 0, 0, 0], 1.0, now_ns() - 5_000_000_000);
        for (auth, _) in wrong_for(INGEST, SCRAPE) {
            let mut client = MetricsServiceClient::connect(format!("http://{}", s.grpc))
                .await
                .unwrap();
            let mut r = tonic::Request::new(req.clone());
            if let Some(a) = &auth {
                r.metadata_mut().insert("authorization", a.parse().unwrap());
            }
            let err = client.export(r).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{auth:?}");
        }
        let mut client = MetricsServiceClient::connect(format!("http://{}", s.grpc))
            .await
            .unwrap();
        let mut r = tonic::Request::new(req);
        r.metadata_mut()
            .insert("authorization", bearer(INGEST).parse().unwrap());
        client.export(r).await.unwrap();

        let channel = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut flight = arrow_flight::flight_service_client::FlightServiceClient::new(channel);
        let ticket = || arrow_flight::Ticket {
            ticket: b"snapshot".to_vec().into(),
        };
        let err = flight.do_get(ticket()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut r = tonic::Request::new(ticket());
        r.metadata_mut()
            .insert("authorization", bearer(INGEST).parse().unwrap());
        assert_eq!(
            flight.do_get(r).await.unwrap_err().code(),
            tonic::Code::Unauthenticated,
            "the ingest token does not open the read API"
        );
        let mut r = tonic::Request::new(ticket());
        r.metadata_mut()
            .insert("authorization", bearer(READ).parse().unwrap());
        assert!(flight.do_get(r).await.is_ok());
    });
    // Its idle connections closed, so the stop below does not wait for them.
    drop(rt);
    assert_eq!(denied(&s, "ingest", "wrong"), 8.0);
    assert_eq!(denied(&s, "read", "missing"), 1.0);
    assert_eq!(denied(&s, "read", "wrong"), 1.0);

    // The read API and the scrape, each with its own token only.
    for path in ["/api/v1/snapshot", "/api/v1/cardinality"] {
        for (auth, _) in wrong_for(READ, SCRAPE) {
            assert_eq!(get(&s, path, auth.as_deref()), 401, "{path} {auth:?}");
        }
        assert_eq!(get(&s, path, Some(&bearer(READ))), 200, "{path}");
    }
    for path in ["/metrics", "/internal/metrics"] {
        for (auth, _) in wrong_for(SCRAPE, READ) {
            assert_eq!(get(&s, path, auth.as_deref()), 401, "{path} {auth:?}");
        }
        assert_eq!(get(&s, path, Some(&scrape)), 200, "{path}");
    }
    // Probes need no secret.
    for path in ["/-/healthy", "/-/ready"] {
        assert_eq!(get(&s, path, None), 200, "{path}");
    }

    let log = s.log_text();
    for token in [INGEST, READ, SCRAPE] {
        assert!(!log.contains(token), "a token reached the log");
        assert!(!log.contains(&token[..token.len() - 3]));
    }
    s.stop();
}

#[test]
fn a_token_file_that_cannot_be_used_stops_the_start() {
    let dir = common::Scratch::new();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    for (file, why) in [
        (empty, "holds no token"),
        (dir.path().join("absent"), "cannot read"),
    ] {
        let err =
            common::serve_refuses(&format!("auth:\n  ingest_token_file: {}\n", file.display()));
        assert!(
            err.contains("auth.ingest_token_file") && err.contains(why),
            "{err}"
        );
    }
}
