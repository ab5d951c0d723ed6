//! The node agent's local API: what enrolls and un-enrolls pods on a node.
//!
//! One JSON object per line over a Unix socket, request then response, as many as the caller
//! likes on one connection. The `sinew` CLI, the tests and (later) the chained CNI plugin all
//! speak it through [`Client`], so the shape follows what a CNI ADD carries: the pod's UID, its
//! network namespace path, and its cgroup, given or discovered from the UID.
#![forbid(unsafe_code)]

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/sinew/agent.sock";

/// The largest request line the agent reads; longer lines are refused.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A pod as the caller knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    /// Kubernetes pod UID (or any node-unique id in local mode): `[A-Za-z0-9._-]`, 1..=128.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace; only pods in the mesh are captured (of an enrolled namespace,
    /// unless their Workload says otherwise).
    pub namespace: String,
    /// Service account, the identity the pod will hold.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Path of the pod's network namespace, such as `/var/run/netns/<name>`.
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory; discovered from the UID when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
}

fn default_service_account() -> String {
    "default".into()
}

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Add a pod (idempotent for the same spec).
    Enroll {
        /// The pod.
        pod: PodSpec,
    },
    /// Remove a pod and everything attached for it.
    Unenroll {
        /// The pod's UID.
        uid: String,
    },
    /// The agent's pods and counters.
    Status {},
    /// Why `source` may or may not reach `destination` under the policies in force.
    Explain {
        /// A workload (`<namespace>/<name>`) or an address.
        source: String,
        /// `<address>:<port>` (a workload or a service VIP).
        destination: String,
        /// For a service behind a waypoint: the request's method (default `GET`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        method: Option<String>,
        /// For a service behind a waypoint: the request's path (default `/`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// For a service behind a waypoint: the request's host (default: the service's
        /// hostname).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// For a service behind a waypoint: the request's other headers, each `Name: value`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<String>,
    },
}

/// A pod as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// What the caller sent, with the cgroup filled in.
    pub spec: PodSpec,
    /// True when the pod's traffic goes through the agent.
    pub captured: bool,
    /// Why it is not captured, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Connection counters since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// Connections captured leaving a pod.
    pub outbound: u64,
    /// Connections captured arriving at a pod.
    pub inbound: u64,
    /// Connections open now.
    pub active: u64,
    /// Captured connections whose upstream could not be reached.
    pub upstream_errors: u64,
    /// Captured connections whose original destination could not be recovered.
    pub original_dst_errors: u64,
    /// Connections carried over HBONE (outbound, mutual TLS).
    #[serde(default)]
    pub hbone_outbound: u64,
    /// Tunnelled connections accepted on HBONE (inbound).
    #[serde(default)]
    pub hbone_inbound: u64,
    /// TLS connections opened toward other agents (pooled: far fewer than `hbone_outbound`).
    #[serde(default)]
    pub hbone_connections_opened: u64,
    /// Connections refused by authorization (including STRICT plaintext refusals).
    #[serde(default)]
    pub denied: u64,
    /// Live connections closed because a policy change no longer admits them.
    #[serde(default)]
    pub closed_by_policy: u64,
}

/// The agent's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Every pod the agent knows, captured or not.
    pub pods: Vec<PodStatus>,
    /// Connection counters.
    pub counters: Counters,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// The pod is known to the agent now.
    Enrolled(PodStatus),
    /// The pod is gone, with everything attached for it.
    Unenrolled {
        /// The pod's UID.
        uid: String,
    },
    /// Answer to [`Request::Status`].
    Status(AgentStatus),
    /// Answer to [`Request::Explain`]: the decision and every policy considered, as JSON.
    Explanation(serde_json::Value),
    /// The request was refused and nothing changed.
    Error {
        /// What was wrong, naming the field or resource.
        message: String,
    },
}

/// Failures talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach the agent at {path}: {source}{}", connect_hint(source))]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading or writing failed mid-request.
    #[error("talking to the agent at {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The agent's answer was not a response.
    #[error("the agent at {path} sent an unreadable response: {source}")]
    Decode {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// The agent refused the request.
    #[error("the agent refused: {0}")]
    Refused(String),
    /// The request cannot be encoded (a path that is not UTF-8, say).
    #[error("cannot send the request: {0}")]
    Encode(serde_json::Error),
}

/// What a failed connect most likely means.
fn connect_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => " (the local API is root's: run as root)",
        _ => " (is sinew-agent running?)",
    }
}

/// A blocking client of the local API.
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the agent listening at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self { path: path.as_ref().to_path_buf(), timeout: Duration::from_secs(30) }
    }

    /// Sends one request; an [`Response::Error`] becomes [`ClientError::Refused`].
    pub fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(request).map_err(ClientError::Encode)?;
        line.push(b'\n');
        match self.call_raw(&line)? {
            Response::Error { message } => Err(ClientError::Refused(message)),
            r => Ok(r),
        }
    }

    /// Sends raw bytes as one request line and reads one response (for testing bad input).
    pub fn call_raw(&self, line: &[u8]) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io { path: self.path.clone(), source };
        let mut stream = UnixStream::connect(&self.path)
            .map_err(|source| ClientError::Connect { path: self.path.clone(), source })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.write_all(line).map_err(io)?;
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).map_err(io)?;
        serde_json::from_str(&answer)
            .map_err(|source| ClientError::Decode { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_request_round_trips_with_defaults() {
        let line = r#"{"op":"enroll","pod":{"uid":"u1","name":"a","namespace":"n","netns":"/run/netns/a","ips":["198.18.0.2","2001:2::2"]}}"#;
        let req: Request = serde_json::from_str(line).unwrap();
        let Request::Enroll { pod } = &req else { panic!("{req:?}") };
        assert_eq!(pod.service_account, "default");
        assert_eq!(pod.cgroup, None);
        assert_eq!(pod.ips.len(), 2);
        let again: Request = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(again, req);
    }

    #[test]
    fn a_path_that_is_not_utf8_is_an_error_not_a_panic() {
        use std::os::unix::ffi::OsStrExt;
        let pod = PodSpec {
            uid: "u".into(),
            name: "a".into(),
            namespace: "n".into(),
            service_account: "default".into(),
            netns: std::ffi::OsStr::from_bytes(b"/run/netns/\xff").into(),
            cgroup: None,
            ips: vec![],
        };
        let err = Client::new("/nonexistent").call(&Request::Enroll { pod }).unwrap_err();
        assert!(matches!(err, ClientError::Encode(_)), "{err}");
    }

    #[test]
    fn a_permission_error_does_not_suggest_the_agent_is_down() {
        let denied = ClientError::Connect {
            path: "/run/sinew/agent.sock".into(),
            source: std::io::ErrorKind::PermissionDenied.into(),
        };
        assert!(denied.to_string().contains("run as root"), "{denied}");
        let gone = ClientError::Connect {
            path: "/run/sinew/agent.sock".into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        assert!(gone.to_string().contains("is sinew-agent running?"), "{gone}");
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"status","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        let bad_ip = r#"{"op":"enroll","pod":{"uid":"u","name":"a","namespace":"n","netns":"/x","ips":["300.1.1.1"]}}"#;
        assert!(serde_json::from_str::<Request>(bad_ip).is_err());
    }
}
