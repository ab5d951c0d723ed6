//! The control service over real gRPC on loopback: CA node authorization, validation with the
//! last good version kept, deltas to many clients with ACKs, resume after restarts, renewal.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use sinew_control::{
    ca::CaService,
    discovery::Registry,
    source::FileSource,
    tokens::{SharedTokens, Tokens},
};
use sinew_control_client::{
    CertConfig, ClientConfig, ClientTls, ConfigView, ControlSettings, Credentials,
    request_certificate, start_certificate, start_certificate_following, start_config,
};
use sinew_identity::{Ca, SpiffeId};
use tokio::{sync::watch, task::JoinHandle};

const TOKEN_1: &str = "node-1-token-0123456789";

const BASE: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {sinew.io/dataplane-mode: ambient}
---
apiVersion: sinew.io/v1alpha1
kind: Workload
metadata: {name: reviews-1, namespace: shop, labels: {app: reviews}}
spec: {serviceAccount: reviews, node: node-1, ips: [198.18.1.10]}
---
apiVersion: sinew.io/v1alpha1
kind: Workload
metadata: {name: ratings-1, namespace: shop, labels: {app: ratings}}
spec: {serviceAccount: ratings, node: node-2, ips: [198.18.2.10]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIPs: [198.19.0.10]
  ports: [{port: 9080}]
  selector: {app: reviews}
";

fn policy(sa: &str) -> String {
    format!(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: reviews, namespace: shop}}\nspec:\n  action: DENY\n  rules: [{{from: [{{source: {{serviceAccounts: [shop/{sa}]}}}}]}}]\n"
    )
}

struct Control {
    addr: SocketAddr,
    /// Trust bundle when serving TLS.
    roots: Option<String>,
    registry: Arc<Registry>,
    errors: Arc<std::sync::Mutex<Vec<sinew_model::ConfigError>>>,
    tokens: SharedTokens,
    tasks: Vec<JoinHandle<()>>,
}

impl Control {
    async fn start(config: &Path, ca_dir: &Path, addr: SocketAddr) -> Self {
        Self::start_with(config, ca_dir, addr, false).await
    }

    async fn start_with(config: &Path, ca_dir: &Path, addr: SocketAddr, tls: bool) -> Self {
        Self::start_ttl(config, ca_dir, addr, tls, Duration::from_secs(3600)).await
    }

    /// With `ttl` as the CA's default certificate lifetime.
    async fn start_ttl(
        config: &Path,
        ca_dir: &Path,
        addr: SocketAddr,
        tls: bool,
        ttl: Duration,
    ) -> Self {
        let ca = Arc::new(Ca::load_or_generate(ca_dir, "cluster.local").unwrap());
        let roots = tls.then(|| ca.bundle().concat());
        let server_tls = tls.then(|| sinew_control::server_tls(ca.clone()).unwrap());
        // node-<i> holds the token "node-<i>-token-0123456789".
        let lines: String =
            (0..50).map(|i| format!("node-{i} node-{i}-token-0123456789\n")).collect();
        let tokens = Tokens::parse("tokens", &lines).unwrap();
        let (source, first) = FileSource::new(config, Some(&ca_dir.join("last-good.json")));
        let errors = source.errors();
        let (tx, rx) = watch::channel(Arc::new(first));
        let ca = CaService::new(ca, tokens, rx.clone(), ttl);
        let tokens = ca.tokens();
        let registry = Arc::new(Registry::default());
        // After a stop, the aborted server lets go of the port a moment later.
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("binding {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let reg = registry.clone();
        let tasks = vec![
            tokio::spawn(source.run(tx)),
            tokio::spawn(async move {
                sinew_control::serve(listener, server_tls, rx, ca, reg).await.unwrap();
            }),
        ];
        Self { addr, roots, registry, errors, tokens, tasks }
    }

    fn endpoint(&self) -> String {
        let scheme = if self.roots.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn stop(self) -> SocketAddr {
        for t in &self.tasks {
            t.abort();
        }
        self.addr
    }
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::write(dir.path().join("config/base.yaml"), BASE).unwrap();
        std::fs::write(dir.path().join("config/policy.yaml"), policy("ratings")).unwrap();
        Self { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn client(&self, control: &Control, name: &str) -> ClientConfig {
        ClientConfig {
            endpoint: control.endpoint(),
            name: name.into(),
            role: "agent".into(),
            cache_dir: self.dir.path().join("cache").join(name),
            credentials: token(&format!("{name}-token-0123456789")),
        }
    }
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn policy_version(view: &ConfigView) -> Option<String> {
    view.resources.get("AuthorizationPolicy/shop/reviews").map(|h| h.version.clone())
}

fn denied_sa(view: &ConfigView) -> Option<String> {
    match view.resources.get("AuthorizationPolicy/shop/reviews")?.resource.as_ref() {
        sinew_model::Resource::AuthorizationPolicy(p) => {
            p.spec.rules[0].from[0].source.service_accounts.first().cloned()
        }
        _ => None,
    }
}

fn token(t: &str) -> Credentials {
    Credentials { token: (!t.is_empty()).then(|| t.to_owned()), token_file: None, tls: None }
}

fn cert_config(control: &Control, tok: &str, sa: &str, cache: &Path) -> CertConfig {
    CertConfig {
        endpoint: control.endpoint(),
        credentials: token(tok),
        identity: SpiffeId::new("cluster.local", "shop", sa).unwrap(),
        ttl: None,
        cache_dir: cache.to_path_buf(),
    }
}

#[tokio::test]
async fn ca_signs_only_identities_scheduled_on_the_callers_node() {
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let cache = s.dir.path().join("certs");
    let svid =
        request_certificate(&cert_config(&control, TOKEN_1, "reviews", &cache)).await.unwrap();
    assert!(svid.cert_pem.contains("BEGIN CERTIFICATE"));

    let err =
        request_certificate(&cert_config(&control, TOKEN_1, "ratings", &cache)).await.unwrap_err();
    let sinew_control_client::ClientError::Status(status) = err else { panic!("{err}") };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(status.message().contains(
        "node node-1 runs no workload with identity spiffe://cluster.local/ns/shop/sa/ratings"
    ));

    // Sinew's own namespace is reserved, even for a Workload scheduled on the node.
    std::fs::write(
        s.config().join("system.yaml"),
        "apiVersion: sinew.io/v1alpha1\nkind: Workload\nmetadata: {name: fake, namespace: sinew-system}\nspec: {serviceAccount: sinew-control, node: node-1, ips: [198.18.1.99]}\n",
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut system = cert_config(&control, TOKEN_1, "reviews", &cache);
    system.identity = SpiffeId::new("cluster.local", "sinew-system", "sinew-control").unwrap();
    let err = request_certificate(&system).await.unwrap_err().to_string();
    assert!(err.contains("namespace sinew-system is reserved"), "{err}");

    for token in ["wrong-token-000000000000", ""] {
        let err = request_certificate(&cert_config(&control, token, "reviews", &cache))
            .await
            .unwrap_err();
        let sinew_control_client::ClientError::Status(status) = err else { panic!("{err}") };
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    }
    control.stop();
}

#[tokio::test]
async fn invalid_resources_are_named_and_the_previous_version_stays_served() {
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let (rx, task) = start_config(s.client(&control, "node-1"));
    let v1 = wait_for("the first configuration", || policy_version(&rx.borrow())).await;

    let cases = [
        (
            "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: reviews, namespace: shop\n",
            "policy.yaml: document 1: -: YAML syntax",
        ),
        (
            "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: reviews, namespace: shop}\nspec:\n  actoin: DENY\n",
            "policy.yaml: AuthorizationPolicy/shop/reviews: spec.actoin: unknown field",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: reviews}]\n  rules: [{backendRefs: [{name: reviews, port: 9080, weight: 9999999}]}]\n---\n",
            "AuthorizationPolicy",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let text = if i == 2 {
            format!("{text}{}", policy("ratings").replace("action: DENY", "action: ALLOW"))
        } else {
            text.to_string()
        };
        std::fs::write(s.config().join("policy.yaml"), &text).unwrap();
        let needle = if i == 2 { "spec.rules[0].backendRefs[0].weight" } else { expected };
        let all: Vec<String> = wait_for("the rejection", || {
            let e: Vec<String> =
                control.errors.lock().unwrap().iter().map(ToString::to_string).collect();
            e.iter().any(|e| e.contains(needle)).then_some(e)
        })
        .await;
        if i == 2 {
            // Out of range: the route is rejected, the valid policy in the same file applies.
            assert!(all.iter().any(|e| e.contains("policy.yaml: HTTPRoute/shop/r: spec.rules[0].backendRefs[0].weight: 9999999 is out of range")), "{all:?}");
            wait_for("the valid policy of the batch", || {
                (policy_version(&rx.borrow()) != Some(v1.clone())).then_some(())
            })
            .await;
        } else {
            assert!(all.iter().any(|e| e.contains(expected)), "{all:?}");
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert_eq!(
                policy_version(&rx.borrow()),
                Some(v1.clone()),
                "a rejected version replaced the good one"
            );
            assert_eq!(denied_sa(&rx.borrow()).as_deref(), Some("shop/ratings"));
        }
    }
    task.abort();
    control.stop();
}

#[tokio::test]
async fn large_resources_go_out_in_responses_bounded_by_size() {
    let s = Setup::new();
    // Four policies of about 700 KiB each: 2.8 MiB in all, more than one response may carry.
    let principals: Vec<String> =
        (0..20_000).map(|i| format!("cluster.local/ns/shop/sa/client-{i:08}")).collect();
    for n in 0..4 {
        std::fs::write(
            s.config().join(format!("big-{n}.yaml")),
            format!(
                "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: big-{n}, namespace: shop}}\nspec:\n  action: ALLOW\n  rules: [{{from: [{{source: {{principals: [{}]}}}}]}}]\n",
                principals.join(", ")
            ),
        )
        .unwrap();
    }
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    assert!(control.errors.lock().unwrap().is_empty());
    let (rx, task) = start_config(s.client(&control, "node-1"));
    wait_for("all four", || {
        (0..4)
            .all(|n| {
                rx.borrow().resources.contains_key(&format!("AuthorizationPolicy/shop/big-{n}"))
            })
            .then_some(())
    })
    .await;
    // 1 MiB per response: at most two of them per response.
    assert!(control.registry.responses_sent.load(Ordering::Relaxed) >= 2);
    task.abort();
    control.stop();
}

#[tokio::test]
async fn a_file_is_read_once_it_holds_still_not_while_it_is_written() {
    use std::io::Write;
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: blog\n  labels: {sinew.io/dataplane-mode: ambient}\n";
    let mut f = std::fs::File::create(s.config().join("blog.yaml")).unwrap();
    // Written a few bytes at a time over about 1.5 s, across several polls: no poll may see
    // (and reject, or serve) a half-written file.
    for chunk in text.as_bytes().chunks(6) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let errors = control.errors.lock().unwrap().clone();
            assert!(errors.is_empty(), "a half-written file was read: {errors:?}");
        }
    }
    drop(f);
    let (rx, task) = start_config(s.client(&control, "node-1"));
    wait_for("the finished file", || rx.borrow().resources.get("Namespace/blog").map(|_| ())).await;
    assert!(control.errors.lock().unwrap().is_empty());
    task.abort();
    control.stop();
}

#[tokio::test]
async fn a_restart_with_a_broken_file_serves_its_last_good_version_and_removes_nothing() {
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let (rx, task) = start_config(s.client(&control, "node-1"));
    let v1 = wait_for("the first configuration", || policy_version(&rx.borrow())).await;
    let addr = control.stop();

    // While control is down, the policy file breaks (YAML) and the base file loses the
    // name of its Service to a bad edit.
    std::fs::write(s.config().join("policy.yaml"), "kind: [\n").unwrap();
    let base = std::fs::read_to_string(s.config().join("base.yaml")).unwrap();
    std::fs::write(s.config().join("base.yaml"), base.replace("{name: reviews,", "{")).unwrap();
    let control = Control::start(&s.config(), &s.ca(), addr).await;
    let errors = control.errors.lock().unwrap().clone();
    let named: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert!(named[0].contains("base.yaml: Service/shop/: metadata.name: missing"), "{named:?}");
    assert!(named.last().unwrap().contains("policy.yaml: document 1: -: YAML syntax"), "{named:?}");
    wait_for("the client to resume", || (control.registry.clients().len() == 1).then_some(()))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Nothing was removed from the client, and nothing had to be resent.
    assert_eq!(policy_version(&rx.borrow()), Some(v1));
    assert!(rx.borrow().resources.contains_key("Service/shop/reviews"));
    assert_eq!(control.registry.resources_sent.load(Ordering::Relaxed), 0);

    // A file removed on purpose while control was down does take its resources along.
    let addr = control.stop();
    std::fs::remove_file(s.config().join("policy.yaml")).unwrap();
    let control = Control::start(&s.config(), &s.ca(), addr).await;
    wait_for("the removal", || policy_version(&rx.borrow()).is_none().then_some(())).await;
    control.stop();
    task.abort();
}

#[tokio::test]
async fn a_rejected_update_is_sent_again_with_the_next_change_and_does_not_count_as_synced() {
    use sinew_api::DiscoveryRequest;
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let (tx, mut responses) = raw_stream(&control).await;
    let keys = |r: &sinew_api::DiscoveryResponse| {
        let mut k: Vec<String> = r.resources.iter().map(|r| r.key.clone()).collect();
        k.sort();
        k
    };
    let first = responses.message().await.unwrap().unwrap();
    assert!(keys(&first).contains(&"AuthorizationPolicy/shop/reviews".to_string()));
    assert_eq!(first.complete, Some(true), "the whole small configuration in one response");
    assert!(!first.trust_bundle.is_empty(), "the CA's roots ride along");
    let reject = |nonce: &str, error: &str| DiscoveryRequest {
        response_nonce: nonce.into(),
        error: error.into(),
        ..Default::default()
    };
    tx.send(reject(&first.nonce, &"x".repeat(10_000))).await.unwrap();
    wait_for("the NACK", || (control.registry.clients()[0].nacks == 1).then_some(())).await;
    let state = control.registry.clients()[0].clone();
    assert_eq!(state.acked_version, 0, "a rejected sync is not complete");
    assert_eq!(state.last_nack.map(|e| e.len()), Some(1024), "the reason is kept bounded");

    // The rest comes again in halves at once; a client that cannot take the policy rejects
    // every part holding it and takes the others: one bad resource no longer holds back the
    // rest.
    const BAD: &str = "AuthorizationPolicy/shop/reviews";
    let mut taken: Vec<String> = Vec::new();
    while taken.len() < keys(&first).len() - 1 {
        let part = responses.message().await.unwrap().unwrap();
        if keys(&part).iter().any(|k| k == BAD) {
            tx.send(reject(&part.nonce, "cannot take the policy")).await.unwrap();
        } else {
            taken.extend(keys(&part));
            tx.send(reject(&part.nonce, "")).await.unwrap();
        }
    }
    taken.sort();
    let others: Vec<String> = keys(&first).into_iter().filter(|k| k != BAD).collect();
    assert_eq!(taken, others);
    assert_eq!(control.registry.clients()[0].acked_version, 0, "still not complete");
    // An unrelated change does not carry the policy again: its version was rejected.
    std::fs::write(
        s.config().join("extra.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n",
    )
    .unwrap();
    let unrelated = responses.message().await.unwrap().unwrap();
    assert_eq!(keys(&unrelated), ["Namespace/extra"]);
    assert_eq!(unrelated.complete, Some(false), "the rejected policy is still missing");
    tx.send(reject(&unrelated.nonce, "")).await.unwrap();

    // The next change carries the rejected policy again, with the change itself (once).
    std::fs::write(s.config().join("policy.yaml"), policy("reviews")).unwrap();
    let second = responses.message().await.unwrap().unwrap();
    assert_eq!(keys(&second), [BAD]);
    assert_eq!(second.complete, Some(true));
    tx.send(reject(&second.nonce, "")).await.unwrap();
    wait_for("the sync", || {
        (control.registry.clients()[0].acked_version == second.system_version).then_some(())
    })
    .await;

    // A rejected removal, then the resource is back: the retry must not remove it again.
    std::fs::remove_file(s.config().join("policy.yaml")).unwrap();
    let removal = responses.message().await.unwrap().unwrap();
    assert_eq!(removal.removed, ["AuthorizationPolicy/shop/reviews"]);
    tx.send(reject(&removal.nonce, "no")).await.unwrap();
    std::fs::write(s.config().join("policy.yaml"), policy("ratings")).unwrap();
    let back = responses.message().await.unwrap().unwrap();
    assert!(keys(&back).contains(&"AuthorizationPolicy/shop/reviews".to_string()));
    assert!(back.removed.is_empty(), "{:?}", back.removed);
    control.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_receive_a_policy_change_as_a_delta_and_ack_it() {
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let clients: Vec<_> =
        (0..50).map(|i| start_config(s.client(&control, &format!("node-{i}")))).collect();
    wait_for("50 clients with the first configuration", || {
        clients.iter().all(|(rx, _)| policy_version(&rx.borrow()).is_some()).then_some(())
    })
    .await;
    let sent_before = control.registry.resources_sent.load(Ordering::Relaxed);
    std::fs::write(s.config().join("policy.yaml"), policy("admin")).unwrap();
    wait_for("every client to hold the change", || {
        clients
            .iter()
            .all(|(rx, _)| denied_sa(&rx.borrow()).as_deref() == Some("shop/admin"))
            .then_some(())
    })
    .await;
    // A delta: one resource per client, not the whole configuration.
    assert_eq!(control.registry.resources_sent.load(Ordering::Relaxed) - sent_before, 50);
    let new_version = clients[0].0.borrow().system_version;
    wait_for("50 ACKs of the new version", || {
        let c = control.registry.clients();
        (c.len() == 50 && c.iter().all(|c| c.acked_version == new_version)).then_some(())
    })
    .await;
    for (_, t) in clients {
        t.abort();
    }
    control.stop();
}

#[tokio::test]
async fn restarts_resume_without_a_full_resend_and_clients_serve_their_cache() {
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let (rx, task) = start_config(s.client(&control, "node-1"));
    let v1 = wait_for("the first configuration", || policy_version(&rx.borrow())).await;
    let addr = control.stop();

    // Control comes back on the same address: the client resumes, nothing is resent.
    let control = Control::start(&s.config(), &s.ca(), addr).await;
    wait_for("the client to resume", || (control.registry.clients().len() == 1).then_some(()))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        control.registry.resources_sent.load(Ordering::Relaxed),
        0,
        "a resumed client got a resend"
    );
    assert_eq!(policy_version(&rx.borrow()), Some(v1.clone()));
    let addr = control.stop();
    task.abort();

    // A client restarted while control is down serves its cached configuration...
    let (rx2, task2) = start_config(ClientConfig {
        endpoint: format!("http://{addr}"),
        ..s.client(&Control::dummy(addr), "node-1")
    });
    assert!(rx2.borrow().from_cache);
    assert_eq!(policy_version(&rx2.borrow()), Some(v1));
    // ...and its cached certificate.
    let control = Control::start(&s.config(), &s.ca(), addr).await;
    let cache = s.dir.path().join("certs");
    let (cert_rx, cert_task) = start_certificate(cert_config(&control, TOKEN_1, "reviews", &cache));
    let first = wait_for("a certificate", || cert_rx.borrow().clone()).await;
    cert_task.abort();
    control.stop();
    let (cert_rx, cert_task) =
        start_certificate(cert_config(&Control::dummy(addr), TOKEN_1, "reviews", &cache));
    assert_eq!(
        cert_rx.borrow().as_deref(),
        Some(first.as_ref()),
        "the cached certificate must serve at once"
    );
    cert_task.abort();
    task2.abort();
}

#[tokio::test]
async fn a_short_lived_certificate_is_renewed_before_it_expires() {
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let mut cfg = cert_config(&control, TOKEN_1, "reviews", &s.dir.path().join("certs"));
    cfg.ttl = Some(Duration::from_secs(4));
    let (mut rx, task) = start_certificate(cfg);
    let first = wait_for("a certificate", || rx.borrow_and_update().clone()).await;
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("renewed in time")
        .unwrap();
    let second = rx.borrow().clone().unwrap();
    assert_ne!(first.cert_pem, second.cert_pem);
    assert!(second.issued < first.expires, "renewed only after the old one expired");
    task.abort();
    control.stop();
}

impl Control {
    /// Stands for a control service that is not running (for clients that must not reach it).
    fn dummy(addr: SocketAddr) -> Self {
        Self {
            addr,
            roots: None,
            registry: Arc::default(),
            errors: Arc::default(),
            tokens: SharedTokens::default(),
            tasks: vec![],
        }
    }
}

#[tokio::test]
async fn an_oversized_signing_request_is_refused_before_anything_else() {
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let mut ca = sinew_api::ca_client::CaClient::connect(control.endpoint()).await.unwrap();
    let huge = sinew_api::SignRequest {
        csr_pem: "A".repeat(100 * 1024),
        identity: "spiffe://cluster.local/ns/shop/sa/reviews".into(),
        ttl_seconds: 0,
    };
    let err = ca.sign(huge).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    assert!(err.message().contains("message length too large"), "{err}");
    // The service keeps serving others.
    let node = SpiffeId::new("cluster.local", "shop", "reviews").unwrap();
    request_certificate(&CertConfig {
        endpoint: control.endpoint(),
        credentials: token(TOKEN_1),
        identity: node,
        ttl: None,
        cache_dir: s.dir.path().join("certs"),
    })
    .await
    .unwrap();
    control.stop();
}

#[tokio::test]
async fn a_node_keeps_reaching_control_past_its_first_certificates_lifetime() {
    let s = Setup::new();
    let addr = "127.0.0.1:0".parse().unwrap();
    let ttl = Duration::from_secs(3);
    let control = Control::start_ttl(&s.config(), &s.ca(), addr, true, ttl).await;
    let settings = ControlSettings {
        endpoint: control.endpoint(),
        node: "node-1".into(),
        token: Some(TOKEN_1.into()),
        token_file: None,
        roots_pem: control.roots.clone(),
        cache_dir: s.dir.path().join("node-1"),
    };
    let node_id = SpiffeId::node("cluster.local", "node-1").unwrap();
    let mut credentials = settings.node_credentials(&node_id, watch::channel(None).1).await;
    // The node certificate alone from here on: no token to fall back on.
    credentials.token = None;
    let cfg = CertConfig {
        endpoint: control.endpoint(),
        credentials,
        identity: SpiffeId::new("cluster.local", "shop", "reviews").unwrap(),
        ttl: None,
        cache_dir: s.dir.path().join("workloads"),
    };
    request_certificate(&cfg).await.expect("with the first node certificate");
    // Past the first node certificate's lifetime: the renewed one is presented.
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    request_certificate(&cfg).await.expect("with a renewed node certificate");
    control.stop();
}

/// For tests that sign over TLS: a signing request for (credentials, identity), and TLS
/// settings presenting an identity (or none).
#[allow(clippy::type_complexity)]
fn signing(
    control: &Control,
    s: &Setup,
) -> (
    impl Fn(Credentials, SpiffeId) -> CertConfig + use<>,
    impl Fn(Option<(String, String)>) -> Option<ClientTls> + use<>,
) {
    let (endpoint, cache) = (control.endpoint(), s.dir.path().join("certs"));
    let roots = control.roots.clone().expect("a control with TLS");
    let with = move |credentials, identity| CertConfig {
        endpoint: endpoint.clone(),
        credentials,
        identity,
        ttl: None,
        cache_dir: cache.clone(),
    };
    let tls = move |identity| Some(ClientTls::new(roots.clone(), identity));
    (with, tls)
}

#[tokio::test]
async fn a_node_bootstraps_with_its_token_then_authenticates_with_its_own_certificate() {
    let s = Setup::new();
    let control =
        Control::start_with(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap(), true).await;
    let (with, tls) = signing(&control, &s);
    // 1. Bootstrap: the token gets the node its own certificate, over TLS.
    let node_id = SpiffeId::node("cluster.local", "node-1").unwrap();
    let bootstrap = Credentials { token: Some(TOKEN_1.into()), token_file: None, tls: tls(None) };
    let node_cert = request_certificate(&with(bootstrap.clone(), node_id.clone())).await.unwrap();
    // A token cannot get another node's identity.
    let other = SpiffeId::node("cluster.local", "node-2").unwrap();
    let err = request_certificate(&with(bootstrap, other)).await.unwrap_err().to_string();
    assert!(
        err.contains("cannot have spiffe://cluster.local/ns/sinew-system/sa/node.node-2"),
        "{err}"
    );

    // 2. From then on, no token: the node certificate authenticates, for the CA and discovery.
    let own = Credentials {
        token: None,
        token_file: None,
        tls: tls(Some((node_cert.cert_pem.clone(), node_cert.key_pem.clone()))),
    };
    let reviews = SpiffeId::new("cluster.local", "shop", "reviews").unwrap();
    request_certificate(&with(own.clone(), reviews)).await.unwrap();
    let ratings = SpiffeId::new("cluster.local", "shop", "ratings").unwrap();
    let err = request_certificate(&with(own.clone(), ratings)).await.unwrap_err().to_string();
    assert!(err.contains("node node-1 runs no workload"), "{err}");
    let (rx, task) =
        start_config(ClientConfig { credentials: own.clone(), ..s.client(&control, "node-1") });
    wait_for("configuration over mTLS", || policy_version(&rx.borrow())).await;

    // Taken out of the token file, the node is revoked: its own certificate no longer works,
    // and the discovery stream it has open ends.
    control.tokens.replace(Tokens::parse("tokens", "node-2 node-2-token-0123456789\n").unwrap());
    let reviews = SpiffeId::new("cluster.local", "shop", "reviews").unwrap();
    let err = request_certificate(&with(own, reviews)).await.unwrap_err().to_string();
    assert!(err.contains("node node-1 is no longer in the token file (revoked)"), "{err}");
    wait_for("the open stream to end", || (!rx.borrow().connected).then_some(())).await;
    wait_for("no client left", || control.registry.clients().is_empty().then_some(())).await;
    task.abort();

    // Without a certificate or a token: refused. An untrusted server: refused by the client.
    let anonymous = Credentials { token: None, token_file: None, tls: tls(None) };
    let err = request_certificate(&with(anonymous, node_id.clone())).await.unwrap_err().to_string();
    assert!(err.contains("no client certificate and no bootstrap token"), "{err}");
    let stranger = Ca::generate("cluster.local").unwrap();
    let wrong_roots = Credentials {
        token: Some(TOKEN_1.into()),
        token_file: None,
        tls: Some(ClientTls::new(stranger.root_pem().into(), None)),
    };
    assert!(request_certificate(&with(wrong_roots, node_id)).await.is_err());
    control.stop();
}

#[tokio::test]
async fn a_replaced_token_revokes_the_node_certificates_obtained_before() {
    let s = Setup::new();
    let control =
        Control::start_with(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap(), true).await;
    let (with, tls) = signing(&control, &s);
    let node_id = SpiffeId::node("cluster.local", "node-1").unwrap();
    let reviews = SpiffeId::new("cluster.local", "shop", "reviews").unwrap();
    let bootstrap = Credentials { token: Some(TOKEN_1.into()), token_file: None, tls: tls(None) };
    let leaked = request_certificate(&with(bootstrap, node_id.clone())).await.unwrap();
    let own = |cert: &sinew_control_client::Svid, token: Option<&str>| Credentials {
        token: token.map(str::to_owned),
        token_file: None,
        tls: tls(Some((cert.cert_pem.clone(), cert.key_pem.clone()))),
    };
    // A node certificate cannot sign its own successor: that takes the token.
    let err = request_certificate(&with(own(&leaked, None), node_id.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("issued only against the node's bootstrap token"), "{err}");
    request_certificate(&with(own(&leaked, None), reviews.clone())).await.unwrap();

    let (rx, task) = start_config(ClientConfig {
        credentials: own(&leaked, None),
        ..s.client(&control, "node-1")
    });
    wait_for("configuration with the certificate", || policy_version(&rx.borrow())).await;

    // The token leaked and is replaced: certificates obtained before (more than the second
    // certificate times are rounded to) no longer authenticate, and the stream one opened
    // ends.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    const NEW: &str = "node-1-new-token-0123456789";
    control.tokens.replace(Tokens::parse("tokens", &format!("node-1 {NEW}\n")).unwrap());
    wait_for("the stream to end", || (!rx.borrow().connected).then_some(())).await;
    task.abort();
    let err = request_certificate(&with(own(&leaked, None), reviews.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("certificate predates its current token"), "{err}");
    // The node itself has the new token: it still gets through, and bootstraps anew. A
    // running agent reads it from its token file, which the operator updated.
    request_certificate(&with(own(&leaked, Some(NEW)), reviews.clone())).await.unwrap();
    let file = s.dir.path().join("token");
    std::fs::write(&file, format!("{NEW}\n")).unwrap();
    let rotated = Credentials {
        token: Some(TOKEN_1.into()),
        token_file: Some(file),
        tls: tls(Some((leaked.cert_pem.clone(), leaked.key_pem.clone()))),
    };
    request_certificate(&with(rotated, reviews.clone())).await.unwrap();
    let bootstrap = Credentials { token: Some(NEW.into()), token_file: None, tls: tls(None) };
    let fresh = request_certificate(&with(bootstrap, node_id)).await.unwrap();
    request_certificate(&with(own(&fresh, None), reviews)).await.unwrap();
    control.stop();
}

#[tokio::test]
async fn the_trust_bundle_is_published_and_certificates_follow_it() {
    let s = Setup::new();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let (rx, task) = start_config(s.client(&control, "node-1"));
    // Every response carries the CA's roots, and the first says the sync is complete.
    let published = wait_for("the trust bundle", || rx.borrow().trust_bundle.clone()).await;
    let ca = Ca::load_or_generate(&s.ca(), "cluster.local").unwrap();
    assert_eq!(published[..], ca.bundle()[..]);
    assert!(rx.borrow().synced, "one response holds the whole small configuration");

    // A certificate is renewed at once when the bundle changes, and only once for a bundle
    // its renewal does not bring (no loop).
    let (bundle_tx, bundle_rx) = watch::channel(None);
    let cfg = cert_config(&control, TOKEN_1, "reviews", &s.dir.path().join("certs"));
    let (mut certs, cert_task) = start_certificate_following(cfg, bundle_rx, Duration::ZERO);
    let first = wait_for("a certificate", || certs.borrow_and_update().clone()).await;
    // The bundle it came with: nothing to do.
    bundle_tx.send_replace(Some(first.bundle.clone().into()));
    assert!(tokio::time::timeout(Duration::from_secs(2), certs.changed()).await.is_err());
    bundle_tx.send_replace(Some(vec![published[0].clone(), "another root".to_string()].into()));
    tokio::time::timeout(Duration::from_secs(5), certs.changed())
        .await
        .expect("renewed when the bundle changed")
        .unwrap();
    assert_ne!(certs.borrow_and_update().as_ref().unwrap().cert_pem, first.cert_pem);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), certs.changed()).await.is_err(),
        "renewed again for a bundle control does not serve"
    );
    cert_task.abort();
    task.abort();
    control.stop();
}

#[tokio::test]
async fn a_sync_in_slices_is_complete_only_with_its_last() {
    use sinew_api::DiscoveryRequest;
    let s = Setup::new();
    let many: String = (0..600)
        .map(|i| {
            format!(
                "apiVersion: sinew.io/v1alpha1\nkind: Workload\nmetadata: {{name: w{i}, namespace: shop}}\nspec: {{serviceAccount: w, node: node-1, ips: [\"198.18.{}.{}\"]}}\n---\n",
                10 + i / 200,
                1 + i % 200
            )
        })
        .collect();
    std::fs::write(s.config().join("many.yaml"), many).unwrap();
    let control = Control::start(&s.config(), &s.ca(), "127.0.0.1:0".parse().unwrap()).await;
    let (tx, mut responses) = raw_stream(&control).await;
    let mut slices = Vec::new();
    loop {
        let r = responses.message().await.unwrap().unwrap();
        tx.send(DiscoveryRequest { response_nonce: r.nonce.clone(), ..Default::default() })
            .await
            .unwrap();
        let done = r.complete == Some(true);
        slices.push((r.resources.len(), r.complete));
        if done {
            break;
        }
        assert!(slices.len() < 5, "{slices:?}");
    }
    // 600 workloads and the rest: two slices, only the last complete.
    assert_eq!(slices.len(), 2, "{slices:?}");
    assert_eq!(slices[0], (500, Some(false)));
    control.stop();
}

/// A discovery stream driven by hand, as node-1's agent: the sender for its requests (the
/// first, naming the client, already sent) and the responses.
async fn raw_stream(
    control: &Control,
) -> (
    tokio::sync::mpsc::Sender<sinew_api::DiscoveryRequest>,
    tonic::Streaming<sinew_api::DiscoveryResponse>,
) {
    use sinew_api::{ClientInfo, DiscoveryRequest, discovery_client::DiscoveryClient};
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        client: Some(ClientInfo { name: "node-1".into(), role: "agent".into() }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert(sinew_api::AUTHORIZATION, format!("Bearer {TOKEN_1}").parse().unwrap());
    let mut client = DiscoveryClient::connect(control.endpoint()).await.unwrap();
    (tx, client.stream(request).await.unwrap().into_inner())
}
