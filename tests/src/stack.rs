//! The server side of the end-to-end tests, all on loopback: moto as the real STS-compatible
//! server, behind a small proxy that counts AssumeRole calls and can inject throttling and 5xx;
//! the Kubernetes API emulator; certificates made at run time with rcgen; the real
//! `kiam-server` binary; and a gRPC client with or without a client certificate.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use kiam_proto::kiam_client::KiamClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn emulator() -> PathBuf {
    crate::workspace_bin("kube-emulator")
}
pub const ACCOUNT: &str = "123456789012";

/// A program, run in network namespace `netns` when given (nsenter keeps /sys and the cgroup).
pub fn command(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        None => Command::new(program),
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/var/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            cmd
        }
    }
}

/// Runs `f` on a thread that joined `netns` (threads it starts stay there too).
pub fn in_netns<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(ns) = netns {
                    let file = fs::File::open(format!("/var/run/netns/{ns}")).expect("netns");
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                }
                f()
            })
            .join()
            .expect("netns thread")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_for_port(netns: Option<&str>, port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_netns(netns, || TcpStream::connect(("127.0.0.1", port))).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not start");
        thread::sleep(Duration::from_millis(50));
    }
}

fn binary(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo(default));
    assert!(
        path.is_file(),
        "{} missing ({var}): run `cargo xtask test`, or `cargo xtask setup` and `cargo build`",
        path.display()
    );
    path
}

/// A plain HTTP/1.1 exchange on loopback; returns status and body.
pub fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    http_to(
        (std::net::Ipv4Addr::LOCALHOST, port).into(),
        method,
        path,
        body,
    )
}

/// [`http`] to any address.
pub fn http_to(
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect");
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // Chunked bodies (hyper's default for streams) are not used by the control API.
    (status, body.to_owned())
}

/// moto's STS, and a proxy in front of it.
pub struct Sts {
    moto: Child,
    pub moto_port: u16,
    pub port: u16,
    pub assume_calls: Arc<AtomicUsize>,
    /// AssumeRole requests to answer with this (status, error code) instead of forwarding.
    pub faults: Arc<Mutex<Vec<(u16, &'static str)>>>,
    knobs: Arc<Knobs>,
}

/// What the proxy does to AssumeRole besides counting it.
#[derive(Default)]
struct Knobs {
    /// AssumeRole requests arriving before this wait until then.
    stall_until: Mutex<Option<Instant>>,
    /// Answers say the credentials expire this long after they were issued.
    expire_in: Mutex<Option<Duration>>,
    /// AccessKeyId issued → role ARN asked for (ground truth for what agents serve).
    issued: Mutex<std::collections::HashMap<String, String>>,
    /// AssumeRole requests by role ARN.
    by_role: Mutex<std::collections::HashMap<String, usize>>,
}

impl Sts {
    pub fn start() -> Sts {
        Self::start_in(None, "127.0.0.1")
    }

    /// moto (listening on `host`) and the proxy (on loopback), in `netns`.
    pub fn start_in(netns: Option<&str>, host: &str) -> Sts {
        let moto_bin = binary("KIAM_MOTO_SERVER", ".venv/bin/moto_server");
        let moto_port = match netns {
            None => free_port(),
            Some(_) => 5000,
        };
        let mut moto = command(netns, moto_bin)
            .args(["-H", host, "-p", &moto_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        crate::track(&moto);
        wait_for_port(netns, moto_port, "moto_server", &mut moto);
        let listener = in_netns(netns, || TcpListener::bind("127.0.0.1:0")).expect("proxy bind");
        let port = listener.local_addr().expect("addr").port();
        let assume_calls = Arc::new(AtomicUsize::new(0));
        let faults = Arc::new(Mutex::new(Vec::new()));
        let knobs = Arc::new(Knobs::default());
        let (calls, f, k) = (assume_calls.clone(), faults.clone(), knobs.clone());
        let ns = netns.map(str::to_owned);
        thread::spawn(move || {
            // Connections to moto are made from this namespace.
            if let Some(ns) = ns {
                let file = fs::File::open(format!("/var/run/netns/{ns}")).expect("netns");
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            }
            for client in listener.incoming().flatten() {
                let (calls, faults, knobs) = (calls.clone(), f.clone(), k.clone());
                thread::spawn(move || proxy(client, moto_port, &calls, &faults, &knobs));
            }
        });
        Sts {
            moto,
            moto_port,
            port,
            assume_calls,
            faults,
            knobs,
        }
    }

    /// STS stalls: AssumeRole requests arriving in the next `duration` are answered after it.
    pub fn stall(&self, duration: Duration) {
        *self.knobs.stall_until.lock().expect("lock") = Some(Instant::now() + duration);
    }

    /// Credentials issued from now on expire `lifetime` after they were issued.
    pub fn expire_in(&self, lifetime: Option<Duration>) {
        *self.knobs.expire_in.lock().expect("lock") = lifetime;
    }

    /// The role ARN an AccessKeyId was issued for.
    pub fn role_of(&self, access_key_id: &str) -> Option<String> {
        self.knobs
            .issued
            .lock()
            .expect("lock")
            .get(access_key_id)
            .cloned()
    }

    /// AssumeRole requests for a role ARN.
    pub fn calls_for(&self, role_arn: &str) -> usize {
        self.knobs
            .by_role
            .lock()
            .expect("lock")
            .get(role_arn)
            .copied()
            .unwrap_or(0)
    }

    pub fn calls(&self) -> usize {
        self.assume_calls.load(Ordering::SeqCst)
    }

    /// Stops moto: every STS call through the proxy fails from now on.
    pub fn kill_moto(&mut self) {
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }

    pub fn inject(&self, faults: &[(u16, &'static str)]) {
        self.faults.lock().expect("lock").extend_from_slice(faults);
    }
}

impl Drop for Sts {
    fn drop(&mut self) {
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}

/// A form field of an STS query request, percent-decoded.
fn form_field(body: &str, name: &str) -> Option<String> {
    let value = body
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))?;
    let mut out = Vec::new();
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The text between `<tag>` and `</tag>`.
fn xml_value<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(&xml[start..end])
}

/// An AssumeRole answer as the knobs want it: the expiry rewritten, the issue recorded.
fn rework_answer(response: Vec<u8>, role: &str, knobs: &Knobs) -> Vec<u8> {
    let text = String::from_utf8_lossy(&response).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return response;
    };
    let mut body = body.to_owned();
    if let Some(key) = xml_value(&body, "AccessKeyId") {
        knobs
            .issued
            .lock()
            .expect("lock")
            .insert(key.to_owned(), role.to_owned());
    }
    let lifetime = *knobs.expire_in.lock().expect("lock");
    if let (Some(lifetime), Some(old)) = (lifetime, xml_value(&body, "Expiration")) {
        let expiry =
            jiff::Timestamp::now() + jiff::SignedDuration::try_from(lifetime).unwrap_or_default();
        let new = expiry.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
        body = body.replacen(old, &new, 1);
    }
    let head: Vec<String> = head
        .split("\r\n")
        .map(|line| match line.split_once(':') {
            Some((name, _)) if name.eq_ignore_ascii_case("content-length") => {
                format!("Content-Length: {}", body.len())
            }
            _ => line.to_owned(),
        })
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}

/// Relays HTTP/1.1 requests one by one, counting AssumeRole, answering injected faults,
/// stalling, rewriting expiries and recording what was issued for which role.
fn proxy(
    client: TcpStream,
    upstream: u16,
    calls: &AtomicUsize,
    faults: &Mutex<Vec<(u16, &str)>>,
    knobs: &Knobs,
) {
    let Ok(writer) = client.try_clone() else {
        return;
    };
    let mut writer = writer;
    let mut reader = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
            let end = line == "\r\n";
            if !line.to_ascii_lowercase().starts_with("connection:") || end {
                head.push(line);
            }
            if end {
                break;
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let form = String::from_utf8_lossy(&body).into_owned();
        let assume_role = form.contains("Action=AssumeRole");
        let role = form_field(&form, "RoleArn").unwrap_or_default();
        if assume_role {
            calls.fetch_add(1, Ordering::SeqCst);
            *knobs
                .by_role
                .lock()
                .expect("lock")
                .entry(role.clone())
                .or_default() += 1;
            let stall = *knobs.stall_until.lock().expect("lock");
            if let Some(until) = stall {
                thread::sleep(until.saturating_duration_since(Instant::now()));
            }
            let fault = {
                let mut faults = faults.lock().expect("lock");
                (!faults.is_empty()).then(|| faults.remove(0))
            };
            if let Some((status, code)) = fault {
                let xml = format!(
                    "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>injected by the test</Message></Error><RequestId>test</RequestId></ErrorResponse>"
                );
                let _ = write!(
                    writer,
                    "HTTP/1.1 {status} Injected\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                    xml.len()
                );
                continue;
            }
        }
        let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
            return;
        };
        let last = head.pop().unwrap_or_default();
        let mut request = head.concat();
        request.push_str("Connection: close\r\n");
        request.push_str(&last);
        if up
            .write_all(request.as_bytes())
            .and_then(|()| up.write_all(&body))
            .is_err()
        {
            return;
        }
        let mut response = Vec::new();
        let _ = up.read_to_end(&mut response);
        if assume_role && response.starts_with(b"HTTP/1.1 200") {
            response = rework_answer(response, &role, knobs);
        }
        if writer.write_all(&response).is_err() {
            return;
        }
    }
}

/// A pod object for the emulator: what the tests vary.
#[derive(Debug, Clone)]
pub struct PodObject<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub uid: Option<&'a str>,
    pub annotations: Value,
    pub labels: Value,
    pub host_network: bool,
    pub service_account: &'a str,
}

impl<'a> PodObject<'a> {
    pub fn new(namespace: &'a str, name: &'a str, node: &'a str) -> Self {
        Self {
            namespace,
            name,
            node,
            uid: None,
            annotations: json!({}),
            labels: json!({}),
            host_network: false,
            service_account: "default",
        }
    }
}

/// Where the kiam agents run in the tests, as in the manifests.
pub const AGENT_NAMESPACE: &str = "kiam";
pub const AGENT_SERVICE_ACCOUNT: &str = "kiam-agent";

/// What a minted service-account token says.
#[derive(Debug, Clone)]
pub struct TokenSpec<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    /// The pod it is bound to: name and UID.
    pub pod: Option<(&'a str, &'a str)>,
    /// The node it names (`None`: an API server before 1.30, which does not say).
    pub node: Option<&'a str>,
    pub audiences: Vec<&'a str>,
    pub expiration_seconds: i64,
}

impl TokenSpec<'_> {
    /// The kiam agent's service account, audience `kiam`, an hour.
    pub fn agent() -> Self {
        Self {
            namespace: AGENT_NAMESPACE,
            service_account: AGENT_SERVICE_ACCOUNT,
            pod: None,
            node: None,
            audiences: vec!["kiam"],
            expiration_seconds: 3600,
        }
    }
}

/// The Kubernetes API emulator.
pub struct Kube {
    child: Child,
    netns: Option<String>,
    pub port: u16,
    /// Its HTTPS listener, when started with one.
    pub tls: Option<std::net::SocketAddr>,
    pub kubeconfig: PathBuf,
}

impl Kube {
    pub fn start(dir: &Path) -> Kube {
        Self::start_in(None, dir)
    }

    pub fn start_in(netns: Option<&str>, dir: &Path) -> Kube {
        Self::launch(netns, dir, "127.0.0.1:0", 1, &[])
    }

    /// With an HTTPS listener on `address` too, serving `cert` (PEM chain) with `key`.
    pub fn start_with_tls(
        netns: Option<&str>,
        dir: &Path,
        address: std::net::SocketAddr,
        cert: &Path,
        key: &Path,
    ) -> Kube {
        let utf8 = |p: &Path| p.to_str().expect("utf-8").to_owned();
        Self::launch(
            netns,
            dir,
            "127.0.0.1:0",
            1,
            &[
                "--tls-listen".into(),
                address.to_string(),
                "--tls-cert".into(),
                utf8(cert),
                "--tls-key".into(),
                utf8(key),
            ],
        )
    }

    fn launch(
        netns: Option<&str>,
        dir: &Path,
        listen: &str,
        initial_rv: u64,
        extra: &[String],
    ) -> Kube {
        let mut child = command(netns, emulator())
            .args(["--listen", listen, "--initial-rv", &initial_rv.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start kube-emulator");
        crate::track(&child);
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut tls = None;
        let port: u16 = loop {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read address");
            match line.trim().split_once(' ') {
                Some(("tls", address)) => tls = address.parse().ok(),
                Some(("listening", address)) => {
                    break address
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or_else(|| panic!("unexpected emulator output {line:?}"));
                }
                _ => panic!("unexpected emulator output {line:?}"),
            }
        };
        let kubeconfig = dir.join("kubeconfig");
        fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: emu\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: emu\n  context:\n    cluster: emu\n    user: emu\nusers:\n- name: emu\n  user: {{}}\ncurrent-context: emu\n"
            ),
        )
        .expect("kubeconfig");
        Kube {
            child,
            netns: netns.map(str::to_owned),
            port,
            tls,
            kubeconfig,
        }
    }

    fn http(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        in_netns(self.netns.as_deref(), || {
            http(self.port, method, path, body)
        })
    }

    /// A kubeconfig for this API server that authenticates with `token` (as a pod's mounted
    /// service-account token does), written to `path`.
    pub fn kubeconfig_with_token(&self, path: &Path, token: &str) -> PathBuf {
        let port = self.port;
        fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: emu\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: emu\n  context:\n    cluster: emu\n    user: sa\nusers:\n- name: sa\n  user:\n    token: {token}\ncurrent-context: emu\n"
            ),
        )
        .expect("kubeconfig");
        path.to_owned()
    }

    /// Creates or replaces node `name` with `taints`.
    pub fn node(&self, name: &str, taints: Value) {
        self.put(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"taints": taints}}));
    }

    /// Node `name` as stored.
    pub fn get_node(&self, name: &str) -> Value {
        let (status, body) = self.http("GET", &format!("/_emulator/objects/nodes/-/{name}"), None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("json")
    }

    /// A JSON patch of node `name` sent with `token`: the status and the answer.
    pub fn patch_node(&self, name: &str, token: &str, patch: &Value) -> (u16, Value) {
        let body = patch.to_string();
        let request = format!(
            "PATCH /api/v1/nodes/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json-patch+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let port = self.port;
        let raw = in_netns(self.netns.as_deref(), || {
            use std::io::{Read as _, Write as _};
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            stream.write_all(request.as_bytes()).expect("send");
            let mut raw = String::new();
            stream.read_to_string(&mut raw).expect("read");
            raw
        });
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// Stops the API server (the emulator process).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts an empty API server on the same address, its resourceVersions past every
    /// earlier one (watches from before must relist), as after a restart with a new store.
    pub fn restart_empty(&mut self) {
        self.stop();
        let dir = self
            .kubeconfig
            .parent()
            .unwrap_or(Path::new("."))
            .to_owned();
        let listen = format!("127.0.0.1:{}", self.port);
        let started = Kube::launch(self.netns.as_deref(), &dir, &listen, 1_000_000, &[]);
        // The old value is a dead process; `started` takes its place.
        *self = started;
    }

    pub fn put(&self, object: Value) -> Value {
        let (status, body) = self.http("PUT", "/_emulator/objects", Some(&object));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("json")
    }

    pub fn namespace(&self, name: &str, annotations: Value) {
        self.put(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": annotations}}));
    }

    /// Creates or updates a running pod; returns its UID.
    pub fn pod(&self, ns: &str, name: &str, node: &str, annotations: Value) -> String {
        self.pod_with_uid(ns, name, node, None, annotations)
    }

    /// The same, with the UID given (to match a test pod's cgroup).
    pub fn pod_with_uid(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        uid: Option<&str>,
        annotations: Value,
    ) -> String {
        self.put_pod(&PodObject {
            uid,
            annotations,
            ..PodObject::new(ns, name, node)
        })
    }

    /// Creates or updates a running pod shaped by `pod`; returns its UID.
    pub fn put_pod(&self, pod: &PodObject<'_>) -> String {
        let mut metadata = json!({"name": pod.name, "namespace": pod.namespace,
            "annotations": pod.annotations, "labels": pod.labels});
        if let Some(uid) = pod.uid {
            metadata["uid"] = json!(uid);
        }
        let stored = self.put(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": metadata,
            "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account,
                     "hostNetwork": pod.host_network,
                     "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"}}));
        stored["metadata"]["uid"].as_str().expect("uid").to_owned()
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let (status, body) = self.http(
            "DELETE",
            &format!("/_emulator/objects/pods/{ns}/{name}"),
            None,
        );
        assert_eq!(status, 200, "{body}");
    }

    pub fn control(&self, what: &str) {
        let (status, body) = self.http("POST", &format!("/_emulator/{what}"), None);
        assert_eq!(status, 200, "{body}");
    }

    pub fn events(&self) -> Vec<Value> {
        let (_, body) = self.http("GET", "/_emulator/events", None);
        serde_json::from_str(&body).unwrap_or_default()
    }

    pub fn requests(&self) -> Value {
        let (_, body) = self.http("GET", "/_emulator/requests", None);
        serde_json::from_str(&body).unwrap_or_default()
    }

    /// Fills the emulator with a synthetic cluster (see [`crate::bench::scale`]).
    pub fn generate(&self, shape: &crate::bench::scale::ClusterShape) {
        let body = serde_json::to_value(shape).expect("shape");
        let (status, answer) = self.http("POST", "/_emulator/generate", Some(&body));
        assert_eq!(status, 200, "{answer}");
    }

    /// TokenReviews the emulator has answered (or failed).
    pub fn token_reviews(&self) -> u64 {
        self.requests()["create tokenreviews"].as_u64().unwrap_or(0)
    }

    /// Answers the next `count` TokenReviews with 503 (0: none).
    pub fn fail_token_reviews(&self, count: u64) {
        let (status, body) = self.http(
            "POST",
            "/_emulator/fail-token-reviews",
            Some(&json!({"count": count})),
        );
        assert_eq!(status, 200, "{body}");
    }

    /// A service-account token, as the kubelet gets one for a pod.
    pub fn mint_token(&self, spec: &TokenSpec<'_>) -> String {
        let mut body = json!({"namespace": spec.namespace, "serviceAccount": spec.service_account,
            "audiences": spec.audiences, "expirationSeconds": spec.expiration_seconds});
        if let Some((name, uid)) = spec.pod {
            body["podName"] = json!(name);
            body["podUid"] = json!(uid);
        }
        if let Some(node) = spec.node {
            body["nodeName"] = json!(node);
        }
        let (status, answer) = self.http("POST", "/_emulator/tokens", Some(&body));
        assert_eq!(status, 200, "{answer}");
        let answer: Value = serde_json::from_str(&answer).expect("json");
        answer["token"].as_str().expect("token").to_owned()
    }

    /// The kiam agent pod of `node` (namespace `kiam`, service account `kiam-agent`); returns
    /// its name and UID.
    pub fn agent_pod(&self, node: &str) -> (String, String) {
        let name = format!("kiam-agent-{node}");
        let mut pod = PodObject::new(AGENT_NAMESPACE, &name, node);
        pod.service_account = AGENT_SERVICE_ACCOUNT;
        pod.host_network = true;
        let uid = self.put_pod(&pod);
        (name, uid)
    }

    /// The projected token the kubelet gives `node`'s agent pod (audience `kiam`, an hour).
    pub fn agent_token(&self, node: &str) -> String {
        let (name, uid) = self.agent_pod(node);
        self.mint_token(&TokenSpec {
            pod: Some((&name, &uid)),
            node: Some(node),
            ..TokenSpec::agent()
        })
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PEM files for one test: a CA, the server's certificate, agent certificates.
pub struct Certs {
    pub dir: PathBuf,
}

pub struct Pem {
    pub cert: String,
    pub key: String,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("ca cert");
    (params, key, cert.pem())
}

fn leaf(
    issuer: &Issuer<'_, &KeyPair>,
    cn: &str,
    dns: &[&str],
    uris: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Pem {
    let mut params =
        CertificateParams::new(dns.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    for uri in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*uri).try_into().expect("uri")));
    }
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// Writes a development PKI to `dir`: `ca.pem`, `server.pem`/`server-key.pem` (for
/// `server_names`), `agent-shared.pem`/`-key.pem` (no node identity) and, per node,
/// `agent-<node>.pem`/`-key.pem` carrying `spiffe://kiam/node/<node>`.
pub fn write_dev_pki(dir: &Path, server_names: &[&str], nodes: &[&str]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let (ca_params, ca_key, ca_pem) = ca("kiam development CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let write = |name: &str, pem: &Pem| -> std::io::Result<()> {
        fs::write(dir.join(format!("{name}.pem")), &pem.cert)?;
        let key = dir.join(format!("{name}-key.pem"));
        fs::write(&key, &pem.key)?;
        fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
    };
    fs::write(dir.join("ca.pem"), &ca_pem)?;
    let server = leaf(
        &issuer,
        "kiam-server",
        server_names,
        &[],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    write("server", &server)?;
    for node in nodes {
        let uri = format!("{}{node}", kiam_proto::certificate::NODE_URI_PREFIX);
        let agent = leaf(
            &issuer,
            "kiam-agent",
            &[],
            &[&uri],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        write(&format!("agent-{node}"), &agent)?;
    }
    let shared = leaf(
        &issuer,
        "kiam-agent",
        &[],
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    write("agent-shared", &shared)
}

/// Writes the API server's PKI to `dir`: `ca.pem`, and `server.pem`/`server-key.pem` for
/// `address` and the `kubernetes.default.svc` names (what in-cluster clients verify).
pub fn write_api_server_pki(dir: &Path, address: std::net::IpAddr) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let (ca_params, ca_key, ca_pem) = ca("kubernetes (emulator)");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let address = address.to_string();
    let server = leaf(
        &issuer,
        "kube-apiserver",
        &[
            address.as_str(),
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        &[],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    fs::write(dir.join("ca.pem"), ca_pem)?;
    fs::write(dir.join("server.pem"), server.cert)?;
    fs::write(dir.join("server-key.pem"), server.key)
}

impl Certs {
    /// The tests' PKI: the development one for `localhost`/`kiam-server` and nodes `node-1`
    /// and `node-2`, plus `agent-other-ca` from an unrelated CA.
    pub fn new(dir: &Path) -> Certs {
        write_dev_pki(dir, &["localhost", "kiam-server"], &["node-1", "node-2"]).expect("PKI");
        let (other_params, other_key, _) = ca("another CA");
        let other = Issuer::from_params(&other_params, &other_key);
        let stranger = leaf(
            &other,
            "kiam-agent",
            &[],
            &["spiffe://kiam/node/node-1"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        fs::write(dir.join("agent-other-ca.pem"), &stranger.cert).expect("write");
        fs::write(dir.join("agent-other-ca-key.pem"), &stranger.key).expect("write");
        Certs {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).expect("read pem")
    }
}

/// A running kiam-server.
pub struct Server {
    child: Child,
    netns: Option<String>,
    pub port: u16,
    pub admin_port: u16,
    pub log: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, certs: &Certs, sts: &Sts, kube: &Kube, extra: &[&str]) -> Server {
        Self::start_in(
            None,
            (free_port(), free_port()),
            dir,
            certs,
            sts,
            kube,
            extra,
        )
    }

    pub fn start_in(
        netns: Option<&str>,
        ports: (u16, u16),
        dir: &Path,
        certs: &Certs,
        sts: &Sts,
        kube: &Kube,
        extra: &[&str],
    ) -> Server {
        let server = Self::spawn_in(netns, ports, dir, certs, sts, kube, extra);
        server.wait_ready();
        server
    }

    /// Starts a server without waiting for it to be ready.
    pub fn spawn_in(
        netns: Option<&str>,
        (port, admin_port): (u16, u16),
        dir: &Path,
        certs: &Certs,
        sts: &Sts,
        kube: &Kube,
        extra: &[&str],
    ) -> Server {
        // The tests' defaults, unless the caller sets its own (benchmarks log less and
        // refresh less often).
        let default = |flag: &'static str, value: &'static str| match extra.contains(&flag) {
            true => Vec::new(),
            false => vec![flag, value],
        };
        let log = dir.join(format!("server-{port}.log"));
        let file = fs::File::create(&log).expect("log");
        let bin = std::env::var_os("KIAM_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::workspace_bin("kiam-server"));
        let mut child = command(netns, bin)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .arg("--tls-cert")
            .arg(certs.path("server.pem"))
            .arg("--tls-key")
            .arg(certs.path("server-key.pem"))
            .arg("--tls-ca")
            .arg(certs.path("ca.pem"))
            .args(match extra.contains(&"--role-base-arn-autodetect") {
                true => Vec::new(),
                false => vec![
                    "--role-base-arn".to_owned(),
                    format!("arn:aws:iam::{ACCOUNT}:role/"),
                ],
            })
            .args(["--sts-endpoint", &format!("http://127.0.0.1:{}", sts.port)])
            .args(["--sts-region", "us-east-1"])
            .args(default("--refresh-interval", "1s"))
            .args(["--tls-reload-interval", "1s", "--log-format", "json"])
            .args(default("--log-level", "info,kiam_server=debug"))
            .args(extra)
            .env("KUBECONFIG", &kube.kubeconfig)
            // The server's own identity for moto; nothing may fall back to a metadata service.
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("start kiam-server");
        crate::track(&child);
        wait_for_port(netns, admin_port, "kiam-server", &mut child);
        Server {
            child,
            netns: netns.map(str::to_owned),
            port,
            admin_port,
            log,
        }
    }

    pub fn wait_ready(&self) {
        self.wait_ready_within(Duration::from_secs(30));
    }

    pub fn wait_ready_within(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while in_netns(self.netns.as_deref(), || {
            http(self.admin_port, "GET", "/ready", None)
        })
        .0 != 200
        {
            assert!(
                Instant::now() < deadline,
                "server not ready:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        in_netns(self.netns.as_deref(), || {
            http(self.admin_port, "GET", "/metrics", None)
        })
        .1
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A gRPC client presenting `agent` (`agent-node-1`, `agent-shared`, …), or no
    /// certificate at all.
    pub async fn client(
        &self,
        certs: &Certs,
        agent: Option<&str>,
    ) -> Result<AgentClient, tonic::transport::Error> {
        self.client_with_token(certs, agent, None).await
    }

    /// The same, sending `token` as the agent's bearer token on every call.
    pub async fn client_with_token(
        &self,
        certs: &Certs,
        agent: Option<&str>,
        token: Option<String>,
    ) -> Result<AgentClient, tonic::transport::Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(certs.read("ca.pem")))
            .domain_name("localhost");
        if let Some(agent) = agent {
            tls = tls.identity(Identity::from_pem(
                certs.read(&format!("{agent}.pem")),
                certs.read(&format!("{agent}-key.pem")),
            ));
        }
        let channel = Channel::from_shared(format!("https://localhost:{}", self.port))
            .expect("uri")
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(KiamClient::with_interceptor(channel, Bearer(token)))
    }
}

/// One server with everything it talks to: its own STS (moto), API emulator and
/// certificates, in a temporary directory. Fields drop in order: the server stops first.
pub struct ServerStack {
    pub server: Server,
    pub certs: Certs,
    pub kube: Kube,
    pub sts: Sts,
    pub dir: tempfile::TempDir,
}

impl ServerStack {
    /// Namespace `team` permits `app-.*`; the server runs with `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with(
            |kube| kube.namespace("team", json!({"iam.amazonaws.com/permitted": "app-.*"})),
            extra,
        )
    }

    /// `prepare` fills the emulator (namespaces, pods) before the server starts with `extra`.
    pub fn start_with(prepare: impl FnOnce(&Kube), extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let sts = Sts::start();
        let kube = Kube::start(dir.path());
        prepare(&kube);
        let certs = Certs::new(dir.path());
        let server = Server::start(dir.path(), &certs, &sts, &kube, extra);
        Self {
            server,
            certs,
            kube,
            sts,
            dir,
        }
    }
}

/// Sends a bearer token with every call, as the agent does.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| tonic::Status::internal("token is not a header value"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A test agent's gRPC client.
pub type AgentClient = KiamClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `check` holds, up to `timeout`.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// Whether a server's answer says it knows the pod: anything but "not known yet", which it
/// says until its watch has delivered the pod. For [`retry_until`].
pub fn known<T>(answer: &Result<T, tonic::Status>) -> bool {
    !matches!(answer, Err(s) if kiam_proto::reason_of(s) == kiam_proto::Reason::PodNotKnown)
}

/// Makes `attempt` (a gRPC call, say: the closure may borrow a client mutably) every 25 ms
/// until `done` accepts its result or `timeout` has passed. `Ok` with the accepted result,
/// `Err` with the last one.
pub async fn retry_until<T>(
    timeout: Duration,
    mut attempt: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> Result<T, T> {
    let deadline = Instant::now() + timeout;
    loop {
        let result = attempt().await;
        if done(&result) {
            return Ok(result);
        }
        if Instant::now() >= deadline {
            return Err(result);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Like [`eventually`], for a check that is itself asynchronous (a gRPC call, say).
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check().await
}
