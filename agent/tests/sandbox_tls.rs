//! The upstream TLS front under the agent (sandbox mode): with `[tls] enabled`, a web service
//! moves to loopback at its port + 10000 and a supervised `exoagent front` takes its public port,
//! serving the certificate the agent generated (TLS and plain HTTP on one port), publishing the
//! certificate's fingerprint, restarted alone after kill -9 (the service keeps running), adopted
//! with its certificate by a new agent, and refusing plain HTTP once `require = true`.
//!
//! The service is RStudio with `tests/rstudio/rserver_peer.py` standing in for `rserver` (a test
//! double: RStudio Server cannot be installed here); the front, the agent, rustls and the
//! certificate are the real ones.

mod common;

use std::time::Duration;

use common::{repo_root, Sandbox};

const BROWSER: &str =
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36";

fn config(require: bool) -> String {
    format!(
        "[tls]\nenabled = true\nrequire = {require}\n\
         [services.rstudio]\nenabled = true\nport = @PORT@\nbind = \"127.0.0.1\"\nrserver = \"{}\"\n",
        repo_root().join("tests/rstudio/rserver_peer.py").display()
    )
}

fn pinned_client(cert_pem: &[u8]) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem).unwrap())
        .tls_info(true)
        .user_agent(BROWSER)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn plain_get(url: &str) -> reqwest::blocking::Response {
    reqwest::blocking::Client::builder()
        .user_agent(BROWSER)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(url)
        .send()
        .unwrap()
}

fn front_pid(status: &serde_json::Value) -> Option<i64> {
    status["services"][0]["front"]["pid"].as_i64()
}

#[test]
fn a_web_service_behind_the_front_is_served_over_tls_and_plain_and_survives_restarts() {
    let mut sb = Sandbox::new_fronted(&config(false)).with_start_args(&["--no-fixture-identity"]);
    let port = sb.port;
    sb.start_agent();
    let status = sb.wait_complete(120);
    let rstudio = &status["services"][0];
    assert_eq!(rstudio["state"], "ready", "{status}");
    assert_eq!(rstudio["front"]["state"], "ready", "{status}");
    assert_eq!(
        rstudio["url"],
        format!("https://127.0.0.1:{port}/"),
        "{status}"
    );
    let fingerprint = status["tls"]["fingerprint"]
        .as_str()
        .expect("a fingerprint")
        .to_owned();
    assert_eq!(fingerprint.len(), 64, "{status}");
    assert_eq!(status["tls"]["generated"], true);

    // The service listens on loopback above its port; the front owns the port.
    let conf = std::fs::read_to_string(sb.root().join("etc/rstudio/rserver.conf")).unwrap();
    assert!(conf.contains("www-address=127.0.0.1\n"), "{conf}");
    assert!(
        conf.contains(&format!("www-port={}\n", port + 10_000)),
        "{conf}"
    );
    let tls_dir = sb.root().join("var/lib/exoagent/tls");
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(tls_dir.join("key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    let cert_pem = std::fs::read(tls_dir.join("cert.pem")).unwrap();

    // TLS, verified against the generated certificate, which is the published one.
    let client = pinned_client(&cert_pem);
    let response = client
        .get(format!("https://127.0.0.1:{port}/auth-sign-in"))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let served = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("the served certificate")
        .to_vec();
    assert_eq!(exoagent::front::cert::fingerprint(&served), fingerprint);
    // Plain HTTP on the same port.
    assert_eq!(
        plain_get(&format!("http://127.0.0.1:{port}/auth-sign-in")).status(),
        200
    );

    let shown = sb.cli(&["status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("rstudio/tls"), "{shown}");
    assert!(
        shown.contains(&exoagent::front::cert::colon_hex(&fingerprint)),
        "status shows the fingerprint: {shown}"
    );

    // The front killed: restarted on its own, the service untouched.
    let service_pid = rstudio["pid"].as_i64().expect("a service pid");
    let first_front = front_pid(&status).expect("a front pid");
    unsafe { libc::kill(first_front as i32, libc::SIGKILL) };
    let status = sb.wait_for("the front restarted", Duration::from_secs(60), |s| {
        s["services"][0]["front"]["state"] == "ready"
            && front_pid(s).is_some_and(|p| p != first_front)
    });
    assert_eq!(status["services"][0]["pid"].as_i64(), Some(service_pid));
    assert_eq!(
        client
            .get(format!("https://127.0.0.1:{port}/auth-sign-in"))
            .send()
            .unwrap()
            .status(),
        200
    );

    // A new agent with the same configuration (a restart, an upgrade): the front and the
    // service are adopted, neither restarted; the certificate is kept.
    let front_now = front_pid(&status).expect("a front pid");
    sb.kill_agent(libc::SIGTERM);
    sb.start_agent();
    let status = sb.wait_complete(120);
    assert_eq!(front_pid(&status), Some(front_now), "{status}");
    assert_eq!(
        status["services"][0]["pid"].as_i64(),
        Some(service_pid),
        "{status}"
    );
    assert_eq!(status["tls"]["fingerprint"], fingerprint.as_str());

    // A new agent with TLS required: the service is adopted (its spec did not change), the
    // front restarts with the new rule, the certificate is kept.
    sb.kill_agent(libc::SIGTERM);
    sb.rewrite_config(&config(true));
    sb.start_agent();
    let status = sb.wait_complete(120);
    assert_eq!(
        status["services"][0]["pid"].as_i64(),
        Some(service_pid),
        "{status}"
    );
    assert_ne!(front_pid(&status), Some(front_now), "{status}");
    assert_eq!(status["tls"]["fingerprint"], fingerprint.as_str());
    let refused = plain_get(&format!("http://127.0.0.1:{port}/auth-sign-in"));
    assert_eq!(refused.status(), 400);
    let text = refused.text().unwrap();
    assert!(text.contains("requires TLS"), "{text}");
    assert_eq!(
        client
            .get(format!("https://127.0.0.1:{port}/auth-sign-in"))
            .send()
            .unwrap()
            .status(),
        200
    );
    sb.kill_agent(libc::SIGTERM);
}

#[test]
fn a_bad_operator_certificate_stops_the_agent_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let key = dir.path().join("missing-key.pem");
    let mut sb = Sandbox::new_fronted(&format!(
        "[tls]\nenabled = true\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [services.rstudio]\nenabled = true\nport = @PORT@\nrserver = \"/bin/false\"\n",
        cert.display(),
        key.display()
    ));
    sb.start_agent();
    let exit = sb.wait_agent_exit();
    assert!(!exit.success());
    let output = sb.agent_output();
    assert!(output.contains("tls.cert_file"), "{output}");
    assert!(output.contains("cert.pem"), "{output}");
    // Validation failed before provisioning: no certificate directory, no service config.
    assert!(!sb.root().join("var/lib/exoagent/tls").exists());
    assert!(!sb.root().join("etc/rstudio/rserver.conf").exists());
}

/// A CA and a client certificate it signed (PEM), and a client certificate from another CA.
struct ClientPki {
    ca_pem: String,
    client_pem: String,
    client_key_pem: String,
    stranger_pem: String,
    stranger_key_pem: String,
}

fn client_pki() -> ClientPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    };
    let leaf = |issuer: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["uap.test".to_owned()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        (
            params.signed_by(&key, issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (ca_pem, issuer) = ca("UAP client CA");
    let (_, other) = ca("someone else");
    let (client_pem, client_key_pem) = leaf(&issuer);
    let (stranger_pem, stranger_key_pem) = leaf(&other);
    ClientPki {
        ca_pem,
        client_pem,
        client_key_pem,
        stranger_pem,
        stranger_key_pem,
    }
}

#[test]
fn with_a_client_ca_only_clients_with_its_certificates_get_through() {
    let pki = client_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("uap-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let mut sb = Sandbox::new_fronted(&format!(
        "[tls]\nenabled = true\nclient_ca_file = \"{}\"\n\
         [services.rstudio]\nenabled = true\nport = @PORT@\nbind = \"127.0.0.1\"\nrserver = \"{}\"\n",
        ca_file.display(),
        repo_root().join("tests/rstudio/rserver_peer.py").display()
    ))
    .with_start_args(&["--no-fixture-identity"]);
    let port = sb.port;
    sb.start_agent();
    sb.wait_complete(120);
    let cert_pem = std::fs::read(sb.root().join("var/lib/exoagent/tls/cert.pem")).unwrap();
    let url = format!("https://127.0.0.1:{port}/auth-sign-in");
    let with_identity = |cert: &str, key: &str| {
        reqwest::blocking::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&cert_pem).unwrap())
            .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap())
            .user_agent(BROWSER)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let uap = with_identity(&pki.client_pem, &pki.client_key_pem);
    assert_eq!(uap.get(&url).send().unwrap().status(), 200);
    let stranger = with_identity(&pki.stranger_pem, &pki.stranger_key_pem);
    assert!(
        stranger.get(&url).send().is_err(),
        "another CA's client got through"
    );
    let anonymous = pinned_client(&cert_pem);
    assert!(
        anonymous.get(&url).send().is_err(),
        "a client without a certificate got through"
    );
    // Each refusal is in the front's log with the peer's address.
    let log_file = sb.root().join("var/log/exoagent/rstudio-front.log");
    let refused = "refused a client without a certificate from the configured CA";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        if log.matches(refused).count() >= 2 || std::time::Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(log.matches(refused).count(), 2, "front log:\n{log}");
    assert!(log.contains("peer=127.0.0.1:"), "front log:\n{log}");
    sb.kill_agent(libc::SIGTERM);
}
