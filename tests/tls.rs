//! TLS on the real binary, with certificates made here: every listener speaks TLS (1.2 or 1.3)
//! with the configured certificate; with `tls.client_ca_file` a client needs a certificate from
//! that CA (not another CA's, not an expired one, not none); plaintext to a TLS port gets no
//! answer; an OTLP export over gRPC with TLS is applied; and new certificates are served after
//! SIGHUP while a connection opened before keeps working.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{cart_delta, now_ns, Spanagg};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

struct Pem {
    cert: String,
    key: String,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, name: &str, expired: bool) -> Pem {
    let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    p.distinguished_name.push(DnType::CommonName, name);
    if expired {
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A client config trusting `server_ca`, presenting `client` if given.
fn client(
    server_ca: &CertifiedIssuer<'static, KeyPair>,
    client: Option<&Pem>,
) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match client {
        None => b.with_no_client_auth(),
        Some(c) => b
            .with_client_auth_cert(
                vec![der(&c.cert)],
                PrivateKeyDer::from_pem_slice(c.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    }
}

/// An HTTP/1.1 GET over TLS on an open connection; the status and the server's certificate.
fn get(
    conn: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    path: &str,
) -> std::io::Result<u16> {
    write!(conn, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    conn.flush()?;
    let mut reader = BufReader::new(conn);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let (mut length, mut chunked) = (0usize, false);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let line = line.to_ascii_lowercase();
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        chunked |= line.starts_with("transfer-encoding:") && line.contains("chunked");
    }
    // The whole body, so the next request on this connection starts at its own status line
    // (`/metrics` is streamed: chunked, no length).
    loop {
        if chunked {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            length = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
        }
        let mut body = vec![0; length + if chunked { 2 } else { 0 }];
        reader.read_exact(&mut body)?;
        if !chunked || length == 0 {
            break;
        }
    }
    status
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {status:?}")))
}

fn connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// The certificate new connections to `addr` are served, polled until it is `want` or
/// `within` passed (the last one seen then).
fn served_within(
    addr: SocketAddr,
    config: impl Fn() -> rustls::ClientConfig,
    want: &CertificateDer<'static>,
    within: Duration,
) -> Option<CertificateDer<'static>> {
    let started = std::time::Instant::now();
    let mut served = None;
    while started.elapsed() < within {
        let mut c = connect(addr, config());
        if get(&mut c, "/-/healthy").is_ok() {
            served = Some(c.conn.peer_certificates().unwrap()[0].clone());
            if served.as_ref() == Some(want) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    served
}

fn write_pem(dir: &Path, name: &str, pem: &Pem) -> (String, String) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pem.cert).unwrap();
    std::fs::write(&key, &pem.key).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

#[test]
fn every_listener_speaks_tls_and_checks_client_certificates() {
    let dir = std::env::temp_dir().join(format!("spanagg-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server_ca = ca("server CA");
    let client_ca = ca("client CA");
    let other_ca = ca("someone else's CA");
    let server = leaf(&server_ca, "spanagg", false);
    let good = leaf(&client_ca, "sidecar", false);
    let foreign = leaf(&other_ca, "intruder", false);
    let expired = leaf(&client_ca, "old sidecar", true);
    let (cert, key) = write_pem(&dir, "server", &server);
    let ca_file = dir.join("clients.crt");
    std::fs::write(&ca_file, client_ca.pem()).unwrap();
    let s = Spanagg::start(&format!(
        "tls:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {}\n",
        ca_file.display()
    ));

    // Both HTTP listeners answer over TLS to a client with a certificate from the client CA.
    for addr in [s.http, s.otlp_http] {
        let mut c = connect(addr, client(&server_ca, Some(&good)));
        let path = if addr == s.http {
            "/-/healthy"
        } else {
            "/v1/metrics"
        };
        let status = get(&mut c, path).unwrap();
        assert!(status == 200 || status == 405, "{addr}: {status}");
        let served = c.conn.peer_certificates().unwrap()[0].clone();
        assert_eq!(served, der(&server.cert));
        assert!(matches!(
            c.conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3 | rustls::ProtocolVersion::TLSv1_2)
        ));
    }
    // No certificate, another CA's, an expired one: no handshake, no answer.
    for (what, cfg) in [
        ("no client certificate", client(&server_ca, None)),
        (
            "a certificate from another CA",
            client(&server_ca, Some(&foreign)),
        ),
        ("an expired certificate", client(&server_ca, Some(&expired))),
    ] {
        let mut c = connect(s.http, cfg);
        assert!(get(&mut c, "/-/healthy").is_err(), "{what} was let in");
    }
    // Plaintext to a TLS port gets nothing it could take for an answer.
    let mut tcp = TcpStream::connect(s.http).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = Vec::new();
    let _ = tcp.read_to_end(&mut reply);
    assert!(!String::from_utf8_lossy(&reply).contains("200 OK"));

    // An OTLP export over gRPC with TLS (HTTP/2 by ALPN) is applied.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = Arc::new(client(&server_ca, Some(&good)));
        let addr = s.grpc;
        let mut config_h2 = (*config).clone();
        config_h2.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config_h2));
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let name = ServerName::IpAddress(addr.ip().into());
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            }))
            .await
            .unwrap();
        let mut c = opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient::new(channel);
        c.export(cart_delta("pod-a", 4, [1, 1, 1, 1, 0], 40.0, now_ns() - 5_000_000_000))
            .await
            .unwrap();
    });
    drop(rt);

    // New certificates on SIGHUP; the connection opened before keeps working.
    let mut before = connect(s.http, client(&server_ca, Some(&good)));
    assert_eq!(get(&mut before, "/metrics").unwrap(), 200);
    let renewed = leaf(&server_ca, "spanagg renewed", false);
    write_pem(&dir, "server", &renewed);
    // kill(1), so the test needs no signal binding of its own.
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let served = served_within(
        s.http,
        || client(&server_ca, Some(&good)),
        &der(&renewed.cert),
        Duration::from_millis(100 * 50),
    );
    assert_eq!(
        served,
        Some(der(&renewed.cert)),
        "the renewed certificate is served"
    );
    assert_eq!(
        get(&mut before, "/metrics").unwrap(),
        200,
        "an old connection survives"
    );
    let metrics = {
        let mut c = connect(s.http, client(&server_ca, Some(&good)));
        write!(
            c,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let _ = c.read_to_string(&mut text);
        text
    };
    assert!(
        metrics.contains("traces_span_metrics_calls_total{"),
        "the gRPC export was applied"
    );
    assert!(s.log_text().contains("TLS certificates reloaded"));

    // A renewal caught half written: the certificate in use stays, the failure is said, and
    // the file is read again (not only on its next change) once it is whole.
    let (cert_path, _) = write_pem(&dir, "server", &renewed);
    std::fs::write(&cert_path, &renewed.cert[..renewed.cert.len() / 2]).unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    std::thread::sleep(Duration::from_millis(500));
    assert!(s.log_text().contains("TLS reload failed"));
    let mut c = connect(s.http, client(&server_ca, Some(&good)));
    assert_eq!(get(&mut c, "/-/healthy").unwrap(), 200, "still serving");
    assert_eq!(c.conn.peer_certificates().unwrap()[0], der(&renewed.cert));
    let broken_mtime = std::fs::metadata(&cert_path).unwrap().modified().unwrap();
    let third = leaf(&server_ca, "spanagg third", false);
    write_pem(&dir, "server", &third);
    // The same modification time as the broken file: only the retry can pick it up.
    std::fs::File::options()
        .write(true)
        .open(&cert_path)
        .unwrap()
        .set_modified(broken_mtime)
        .unwrap();
    let key_path = dir.join("server.key");
    std::fs::File::options()
        .write(true)
        .open(&key_path)
        .unwrap()
        .set_modified(broken_mtime)
        .unwrap();
    let served = served_within(
        s.http,
        || client(&server_ca, Some(&good)),
        &der(&third.cert),
        Duration::from_millis(100 * 100),
    );
    assert_eq!(
        served,
        Some(der(&third.cert)),
        "the failed reload is tried again"
    );
    drop(before);
    s.stop();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_certificate_without_its_key_stops_the_start() {
    let err = common::serve_refuses("tls:\n  cert_file: /etc/spanagg/tls.crt\n");
    assert!(err.contains("tls.cert_file needs tls.key_file"), "{err}");
}

#[test]
fn a_sighup_never_ends_the_process() {
    // No TLS: a SIGHUP (a renewal hook fired at the wrong pod) has nothing to reload.
    let s = Spanagg::start("");
    for _ in 0..2 {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &s.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.get("/-/healthy").0, 200, "still running");
    assert!(s.log_text().contains("SIGHUP: no TLS configured"));
    s.stop();
}
