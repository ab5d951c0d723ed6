//! The agent's pods: enrollment, capture, un-enrollment, persistence and re-adoption.
//!
//! Every change is checked in full before anything is touched, and undone if a later step
//! fails, so a refused request changes nothing. Known pods are persisted to
//! `<state-dir>/pods.json` so a restarted agent re-creates its in-pod listeners and re-adopts
//! the pinned programs that kept the pods failing closed meanwhile.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use sinew_ebpf_common::{
    INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, SLOT_HBONE, SLOT_PLAINTEXT,
    WORKER_SLOTS, listener_slot,
};
use sinew_identity::SpiffeId;
use sinew_local_api::{AgentStatus, PodSpec, PodStatus};
use sinew_mesh::MeshIndex;
use tokio::{net::TcpListener, runtime::Handle, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    bpf::{self, BpfError, Capture},
    cgroup::{self, CgroupError},
    netns::{Netns, NetnsError},
    proxy::{self, Ctx, Direction, PodNet},
};

/// Why a request was refused. Nothing changed when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A field of the request is invalid.
    #[error("pod {uid}: field {field}: {reason}")]
    Invalid {
        /// Pod UID as sent.
        uid: String,
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The pod's cgroup holds the agent: programs there would capture the agent itself.
    #[error("pod {uid}: field cgroup: {} holds the agent itself", cgroup.display())]
    HoldsAgent {
        /// Pod UID as sent.
        uid: String,
        /// The cgroup.
        cgroup: PathBuf,
    },
    /// The agent has no configuration yet (control not reached): it cannot tell whether the
    /// pod's namespace is in the mesh. The CNI plugin retries.
    #[error("pod {0}: no configuration yet (the control service has not answered); retry")]
    NotReady(String),
    /// The agent is stopping (draining): it opens no listener for anyone.
    #[error("pod {0}: the agent is stopping; retry once it is back")]
    Stopping(String),
    /// The UID is enrolled already with a different spec.
    #[error("pod {0} is already enrolled with a different spec; un-enroll it first")]
    Conflict(String),
    /// An address of the pod belongs to another enrolled pod.
    #[error("pod {uid}: field ips: {ip} is held by enrolled pod {holder}; un-enroll it first")]
    AddressInUse {
        /// Pod UID as sent.
        uid: String,
        /// The shared address.
        ip: IpAddr,
        /// The pod that holds it.
        holder: String,
    },
    /// No such pod.
    #[error("pod {0} is not enrolled")]
    Unknown(String),
    /// The network namespace is unusable.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The cgroup is unusable.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Attaching failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// A listener could not be created inside the pod.
    #[error("pod {uid}: listener {addr}: {source}")]
    Listener {
        /// Pod UID.
        uid: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The state file could not be written.
    #[error("state file {path}: {source}")]
    State {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Who enrolls a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The local API: persisted at once; stale pins of a pod out of the mesh released.
    Api,
    /// Re-adoption at start: persisted once at the end; stale pins released only when the
    /// mesh view is configuration.
    Restore { view_known: bool },
}

/// Static settings the pod registry needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Pins live here.
    pub bpffs_dir: PathBuf,
    /// `pods.json` lives here.
    pub state_dir: PathBuf,
    /// The cgroup v2 mount.
    pub cgroup_root: PathBuf,
    /// The agent's own cgroup: no pod's may hold it.
    pub agent_cgroup: PathBuf,
}

struct Pod {
    status: PodStatus,
    /// Listener tasks; aborting them closes the listeners (and drops them from the SockHash).
    tasks: Vec<JoinHandle<()>>,
    /// Re-adopted though its spec is refused now (it overlaps another pod): kept closed,
    /// never captured by reconciliation, until un-enrolled.
    refused: bool,
}

impl Drop for Pod {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// All pods of this node.
pub struct Registry {
    settings: Settings,
    /// Held through every change (enroll, un-enroll, re-adoption, reconciliation) from its
    /// checks to its state file: one change at a time, so a late un-enroll cannot undo a
    /// newer enroll's capture and two state files cannot be written over each other. Taken
    /// before `pods` and `capture`.
    changes: Mutex<()>,
    capture: Mutex<Capture>,
    pods: Mutex<BTreeMap<String, Pod>>,
    ctx: Arc<Ctx>,
    /// The data-path workers; every pod has listeners on each.
    workers: Vec<Handle>,
    /// Whether the mesh view is configuration (see [`Registry::restore`]): until it is, a
    /// new pod cannot be judged, and enrolling one is refused for the CNI plugin to retry.
    known: tokio::sync::watch::Receiver<bool>,
    /// Set by [`Registry::drain`]: no capture opens listeners any more.
    draining: std::sync::atomic::AtomicBool,
}

impl Registry {
    /// A registry over loaded programs whose pods are served on `workers` (at least one).
    /// `known`: whether the mesh view is configuration yet (see [`Registry::restore`]).
    pub fn new(
        settings: Settings,
        capture: Capture,
        ctx: Arc<Ctx>,
        workers: Vec<Handle>,
        known: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        assert!(!workers.is_empty(), "the registry needs at least one worker");
        let pods = Mutex::new(BTreeMap::new());
        let capture = Mutex::new(capture);
        let draining = Default::default();
        Self { settings, changes: Mutex::new(()), capture, pods, ctx, workers, known, draining }
    }

    /// Stops taking connections (every pod's listeners close; HBONE connections are told
    /// GOAWAY, their open streams finish) and waits up to `limit` for the open ones to end.
    /// Returns how many are still open. Pins stay: pods fail closed until an agent is back.
    pub async fn drain(self: &Arc<Self>, limit: std::time::Duration) -> u64 {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        // After any change under way (an enroll on the blocking pool may be opening a pod's
        // listeners): later ones see `draining` and open none.
        let me = self.clone();
        let closed = tokio::task::spawn_blocking(move || {
            let _change = me.changes.lock().unwrap_or_else(|e| e.into_inner());
            let mut pods = me.pods.lock().unwrap_or_else(|e| e.into_inner());
            for pod in pods.values_mut() {
                for t in pod.tasks.drain(..) {
                    t.abort();
                }
            }
        });
        let _ = closed.await;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let open = self.ctx.stats.open();
            if open == 0 || tokio::time::Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Whether the agent is stopping ([`Registry::drain`]).
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What the pods' connections share.
    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    fn in_mesh(&self, spec: &PodSpec) -> bool {
        self.ctx.mesh.borrow().pod_in_mesh(&spec.namespace, &spec.name, &spec.ips)
    }

    fn state_file(&self) -> PathBuf {
        self.settings.state_dir.join("pods.json")
    }

    fn change(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the configuration is known (see [`Self::restore`]): until then pods cannot be
    /// enrolled, so the agent is not ready.
    pub fn configuration_known(&self) -> bool {
        *self.known.borrow()
    }

    /// Re-adopts the pods of the state file (after a restart). A pod whose network namespace
    /// or cgroup is gone is dropped with its pins. One that fails otherwise (a port taken in
    /// the pod, no descriptors left, a spec the checks now refuse) stays known, uncaptured,
    /// with its pins (it keeps failing closed) and the reason in its status; reconciliation
    /// tries it again. `view_known`: the mesh view is configuration (loaded, cached or from
    /// control), not the empty one of an agent that could not reach control; only then do
    /// pins of pods whose namespace is not in the mesh go (else reconciliation releases
    /// them once configuration arrives).
    pub fn restore(&self, view_known: bool) -> Result<usize, PodError> {
        let _change = self.change();
        let path = self.state_file();
        let specs: Vec<PodSpec> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PodError::State {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(PodError::State { path, source }),
        };
        let mut restored = 0;
        for spec in specs {
            let uid = spec.uid.clone();
            let spec_copy = spec.clone();
            match self.enroll_now(spec, Mode::Restore { view_known }) {
                Ok(_) => restored += 1,
                // A name that could not have been written by this agent: nothing of it is
                // touched (its pin path is not to be trusted).
                Err(e @ PodError::Invalid { field: "uid", .. }) => {
                    warn!(pod = %uid, error = %e, "ignoring an invalid pod in the state file");
                }
                // Another pod holds its address: the addresses are not its own, its links
                // are (nothing could find them to release them later).
                Err(e @ PodError::AddressInUse { .. }) => {
                    warn!(pod = %uid, error = %e, "dropping a pod that cannot be re-adopted");
                    let _ = bpf::detach_pod(&self.settings.bpffs_dir, &uid);
                }
                // Gone only when its namespace or cgroup no longer exists; another failure
                // to open them (out of descriptors, say) keeps it closed, below.
                Err(e @ (PodError::Netns(_) | PodError::Cgroup(_)))
                    if !spec_copy.netns.exists()
                        || spec_copy.cgroup.as_ref().is_some_and(|c| !c.exists()) =>
                {
                    warn!(pod = %uid, error = %e, "pod gone: dropping it and its pins");
                    // Its pinned links and addresses would otherwise refuse traffic forever
                    // for whatever gets that address next.
                    let _ = self.release(&spec_copy);
                }
                // Its cgroup holds the agent: pins there would capture the agent itself.
                Err(e @ PodError::HoldsAgent { .. }) => {
                    warn!(pod = %uid, error = %e, "dropping a pod whose cgroup holds the agent, and its pins");
                    let _ = self.release(&spec_copy);
                }
                Err(e) => {
                    // A spec the checks refuse (overlapping another pod) is kept closed but
                    // never captured behind those checks' back; other failures are retried.
                    let refused = matches!(e, PodError::Invalid { .. });
                    warn!(pod = %uid, error = %e, refused, "cannot re-adopt pod: it stays closed");
                    let status = PodStatus {
                        spec: spec_copy,
                        captured: false,
                        reason: Some(format!("re-adoption failed: {e}")),
                    };
                    let pod = Pod { status, tasks: Vec::new(), refused };
                    self.pods.lock().expect("pod registry lock poisoned").insert(uid, pod);
                }
            }
        }
        self.persist()?;
        Ok(restored)
    }

    /// Adds a pod; captures it when it is in the mesh (its namespace enrolled, or its own
    /// Workload labelled so; see [`MeshIndex::pod_in_mesh`]). Idempotent for the same spec.
    pub fn enroll(&self, spec: PodSpec) -> Result<PodStatus, PodError> {
        let _change = self.change();
        self.enroll_now(spec, Mode::Api)
    }

    /// [`Registry::enroll`], the change lock held.
    fn enroll_now(&self, mut spec: PodSpec, mode: Mode) -> Result<PodStatus, PodError> {
        validate(&spec)?;
        if mode == Mode::Api && !*self.known.borrow() {
            return Err(PodError::NotReady(spec.uid));
        }
        spec.cgroup = Some(self.checked_cgroup(&spec)?);
        let netns = Netns::open(&spec.netns)?;

        let mut pods = self.pods.lock().expect("pod registry lock poisoned");
        if let Some(existing) = pods.get(&spec.uid) {
            return if existing.status.spec == spec {
                Ok(existing.status.clone())
            } else {
                Err(PodError::Conflict(spec.uid))
            };
        }
        // Nor may it overlap another pod's cgroup (same, around or inside).
        let mine = spec.cgroup.clone().unwrap_or_default();
        let overlaps = |c: &Path| cgroup::nested(&mine, c) || cgroup::nested(c, &mine);
        if let Some(other) =
            pods.values().find(|o| o.status.spec.cgroup.as_deref().is_some_and(overlaps))
        {
            return Err(PodError::Invalid {
                uid: spec.uid,
                field: "cgroup",
                reason: format!(
                    "{} overlaps the cgroup of enrolled pod {}",
                    mine.display(),
                    other.status.spec.uid
                ),
            });
        }
        // A network namespace is one pod's: a second pod in it would join the first's
        // listeners and carry part of its traffic under the second's identity.
        let netns_id = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
        };
        if let Some(mine) = netns_id(&spec.netns)
            && let Some(other) =
                pods.values().find(|o| netns_id(&o.status.spec.netns) == Some(mine))
        {
            return Err(PodError::Invalid {
                uid: spec.uid,
                field: "netns",
                reason: format!(
                    "{} is the network namespace of enrolled pod {}",
                    other.status.spec.netns.display(),
                    other.status.spec.uid
                ),
            });
        }
        // Addresses are per pod: capture state is keyed by address, so a second pod on one
        // (an address reused before the old pod's removal arrived) would take over the
        // first's listeners, and releasing either would uncapture the other.
        for other in pods.values() {
            let held = &other.status.spec.ips;
            if let Some(ip) = spec
                .ips
                .iter()
                .find(|ip| held.iter().any(|h| h.to_canonical() == ip.to_canonical()))
            {
                return Err(PodError::AddressInUse {
                    uid: spec.uid,
                    ip: *ip,
                    holder: other.status.spec.uid.clone(),
                });
            }
        }
        let (pod, captured) = if self.in_mesh(&spec) {
            let tasks = self.capture_pod(&spec, netns)?;
            (
                Pod {
                    status: PodStatus { spec, captured: true, reason: None },
                    tasks,
                    refused: false,
                },
                true,
            )
        } else {
            // Pins left by an earlier agent, from when the namespace was in the mesh, would
            // keep the pod failing closed although it is no longer captured; but an agent
            // that has no configuration yet knows no namespace in the mesh, and must not open
            // every pod it re-adopts (reconciliation releases them once it knows).
            let view_known = match mode {
                Mode::Api => *self.known.borrow(),
                Mode::Restore { view_known } => view_known,
            };
            if view_known
                && self.capture.lock().expect("capture lock poisoned").pod_pinned(&spec.uid)
            {
                self.release(&spec)?;
            }
            let reason = not_enrolled(&self.ctx.mesh.borrow(), &spec);
            (
                Pod {
                    status: PodStatus { spec, captured: false, reason: Some(reason) },
                    tasks: vec![],
                    refused: false,
                },
                false,
            )
        };
        let status = pod.status.clone();
        let uid = status.spec.uid.clone();
        pods.insert(uid.clone(), pod);
        drop(pods);
        // Re-adoption writes the state file once, at its end (a failed write here would undo
        // a pod that is then kept closed).
        if mode == Mode::Api
            && let Err(e) = self.persist()
        {
            // Undo so that the refusal leaves nothing behind.
            self.unenroll_now(&uid).ok();
            return Err(e);
        }
        info!(pod = %uid, captured, "enrolled");
        Ok(status)
    }

    /// The pod's cgroup, given (and then checked to be under the cgroup root) or discovered
    /// from its UID, and refused where programs attached to it would capture the agent.
    fn checked_cgroup(&self, spec: &PodSpec) -> Result<PathBuf, PodError> {
        let resolved = match &spec.cgroup {
            Some(p) => cgroup::validate(&self.settings.cgroup_root, p)?,
            None => cgroup::discover(&self.settings.cgroup_root, &spec.uid)?,
        };
        // The spec is stored as JSON (state file, status answers): a path that is not UTF-8
        // could not be written there.
        if resolved.to_str().is_none() {
            return Err(PodError::Invalid {
                uid: spec.uid.clone(),
                field: "cgroup",
                reason: format!("{} is not valid UTF-8", resolved.display()),
            });
        }
        // Programs attached to a cgroup act on every cgroup below it: one holding the agent
        // would capture the agent's own connections, one around or inside another pod's
        // would capture that pod under this one's identity.
        if cgroup::nested(&resolved, &self.settings.agent_cgroup) {
            return Err(PodError::HoldsAgent { uid: spec.uid.clone(), cgroup: resolved });
        }
        Ok(resolved)
    }

    /// Creates the pod's listeners, registers its addresses and attaches the programs.
    fn capture_pod(&self, spec: &PodSpec, netns: Netns) -> Result<Vec<JoinHandle<()>>, PodError> {
        let uid = &spec.uid;
        if self.draining() {
            return Err(PodError::Stopping(uid.clone()));
        }
        // Checked again, before anything is registered: a pod whose re-adoption failed is
        // retried from its state file entry, which may name no cgroup, or one its checks
        // never saw.
        let cgroup = self.checked_cgroup(spec)?;
        let identity =
            SpiffeId::new(&self.ctx.trust_domain, &spec.namespace, &spec.service_account).map_err(
                |e| PodError::Invalid {
                    uid: uid.clone(),
                    field: "serviceAccount",
                    reason: e.to_string(),
                },
            )?;
        let listen = |addr: SocketAddr, dual: bool| {
            proxy::listen_in(&netns, addr, dual).map_err(|source| PodError::Listener {
                uid: uid.clone(),
                addr,
                source,
            })
        };
        // One set of listeners per worker on the same addresses (SO_REUSEPORT). Outbound, the
        // kernel spreads connections over the group; inbound, sk_lookup picks each worker's
        // socket itself (see `WORKER_SLOTS`).
        let mut sets = Vec::with_capacity(self.workers.len());
        for _ in &self.workers {
            let out4 = listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT), false)?;
            // IPv6 may be disabled in the pod; then IPv4 listeners serve alone (and the pod's
            // IPv6 connections are refused, which is worth a line in the log).
            let out6 = listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT), false)
                .map_err(|e| warn!(pod = %uid, error = %e, "no IPv6 outbound listener: the pod's IPv6 connections will be refused"))
                .ok();
            let inbound = listen(proxy::any(true, INBOUND_PLAINTEXT_PORT), true)
                .or_else(|_| listen(proxy::any(false, INBOUND_PLAINTEXT_PORT), false))?;
            let hbone = listen(proxy::any(true, INBOUND_HBONE_PORT), true)
                .or_else(|_| listen(proxy::any(false, INBOUND_HBONE_PORT), false))?;
            sets.push((out4, out6, inbound, hbone));
        }

        let mut capture = self.capture.lock().expect("capture lock poisoned");
        // Pins an earlier agent left keep the pod failing closed; a failure here leaves them
        // (and its addresses, whose sk_lookup then drops) as they were rather than opening it.
        let was_attached = capture.pod_attached(uid);
        let undo = |capture: &mut Capture| {
            if was_attached {
                return;
            }
            for ip in &spec.ips {
                capture.remove_addr(*ip);
            }
            let _ = bpf::detach_pod(&self.settings.bpffs_dir, uid);
        };
        let mut register = || -> Result<(), PodError> {
            for ip in &spec.ips {
                for w in 0..WORKER_SLOTS {
                    let (_, _, inbound, hbone) = &sets[w as usize % sets.len()];
                    capture.set_listener(*ip, listener_slot(SLOT_PLAINTEXT, w), inbound)?;
                    capture.set_listener(*ip, listener_slot(SLOT_HBONE, w), hbone)?;
                }
                capture.add_addr(*ip)?;
            }
            if capture.pod_attached(uid) {
                // Pinned by an earlier agent: keep the links (the pod never stops failing
                // closed) and swap our programs in.
                capture.relink_pod(uid)?;
            } else {
                capture.attach_pod(uid, &cgroup, &netns)?;
            }
            Ok(())
        };
        if let Err(e) = register() {
            undo(&mut capture);
            return Err(e);
        }
        drop(capture);

        // The certificate is requested now so the first connection does not wait for it.
        self.ctx.certs.ensure(&identity);
        let pod = Arc::new(PodNet {
            name: format!("{}/{}", spec.namespace, spec.name),
            namespace: spec.namespace.clone(),
            workload: spec.name.clone(),
            identity,
            ips: spec.ips.iter().map(|ip| ip.to_canonical()).collect(),
            netns,
            handshakes: Arc::new(tokio::sync::Semaphore::new(crate::proxy::HANDSHAKES)),
            ctx: self.ctx.clone(),
        });
        let mut tasks = Vec::new();
        for ((out4, out6, inbound, hbone), worker) in sets.into_iter().zip(&self.workers) {
            // Registered with this worker's reactor, served by its tasks.
            let _on_worker = worker.enter();
            for (l, dir) in [
                (Some(out4), Some(Direction::Outbound)),
                (out6, Some(Direction::Outbound)),
                (Some(inbound), Some(Direction::Inbound)),
                (Some(hbone), None),
            ] {
                let Some(l) = l else { continue };
                let addr = l.local_addr().unwrap_or_else(|_| proxy::any(false, 0));
                let l = TcpListener::from_std(l).map_err(|source| PodError::Listener {
                    uid: uid.clone(),
                    addr,
                    source,
                })?;
                tasks.push(match dir {
                    Some(dir) => worker.spawn(proxy::serve(l, dir, pod.clone())),
                    None => worker.spawn(proxy::serve_hbone(l, pod.clone())),
                });
            }
        }
        Ok(tasks)
    }

    /// Detaches a pod's programs and forgets its addresses; its listeners stay until the
    /// caller drops its tasks.
    fn release(&self, spec: &PodSpec) -> Result<(), PodError> {
        bpf::detach_pod(&self.settings.bpffs_dir, &spec.uid)?;
        let mut capture = self.capture.lock().expect("capture lock poisoned");
        for ip in &spec.ips {
            capture.remove_addr(*ip);
        }
        Ok(())
    }

    /// Applies enrollment changes to known pods, without restarting them: pods now in the
    /// mesh (their namespace, or their own Workload, labelled since) are captured, pods now
    /// out of it are released (with
    /// `releases`: on a new mesh view; a retry on a timer only captures). A rejected
    /// resource changes nothing: its last good version stays in force.
    /// Returns how many pods changed.
    pub fn reconcile(&self, releases: bool) -> usize {
        let _change = self.change();
        let mesh = self.ctx.mesh.borrow().clone();
        let mut changed = 0;
        let mut pods = self.pods.lock().expect("pod registry lock poisoned");
        for pod in pods.values_mut() {
            let spec = &pod.status.spec;
            let want = mesh.pod_in_mesh(&spec.namespace, &spec.name, &spec.ips);
            if want == pod.status.captured || (want && pod.refused) {
                // Uncaptured but still pinned (re-adopted before configuration arrived, or
                // a re-adoption that failed): the view now says it is out of the mesh.
                if releases
                    && !want
                    && self.capture.lock().expect("capture lock poisoned").pod_pinned(&spec.uid)
                {
                    match self.release(spec) {
                        Ok(()) => {
                            pod.status.reason = Some(not_enrolled(&mesh, spec));
                            changed += 1;
                            info!(pod = %spec.uid, "not in the mesh: pins released");
                        }
                        Err(e) => warn!(pod = %spec.uid, error = %e, "cannot release pod"),
                    }
                }
                continue;
            }
            if want {
                let captured = Netns::open(&spec.netns)
                    .map_err(PodError::from)
                    .and_then(|netns| self.capture_pod(spec, netns));
                match captured {
                    Ok(tasks) => {
                        pod.tasks = tasks;
                        pod.status.captured = true;
                        pod.status.reason = None;
                        changed += 1;
                        info!(pod = %spec.uid, "in the mesh: captured");
                    }
                    Err(e) => {
                        warn!(pod = %spec.uid, error = %e, "cannot capture pod");
                        pod.status.reason = Some(format!("capture failed: {e}"));
                        // What no retry changes (a cgroup holding the agent, a path that
                        // is not UTF-8): closed, and not retried, as at enroll.
                        pod.refused |=
                            matches!(e, PodError::HoldsAgent { .. } | PodError::Invalid { .. });
                    }
                }
            } else {
                if !releases {
                    continue;
                }
                if let Err(e) = self.release(spec) {
                    warn!(pod = %spec.uid, error = %e, "cannot release pod");
                    continue;
                }
                for t in pod.tasks.drain(..) {
                    t.abort();
                }
                pod.status.captured = false;
                pod.status.reason = Some(not_enrolled(&mesh, spec));
                changed += 1;
                info!(pod = %spec.uid, "left the mesh: released");
            }
        }
        drop(pods);
        if changed > 0 {
            self.prune_certs();
        }
        changed
    }

    /// Removes a pod: its links, addresses and listeners. Connections already open finish.
    pub fn unenroll(&self, uid: &str) -> Result<(), PodError> {
        let _change = self.change();
        self.unenroll_now(uid)
    }

    /// [`Registry::unenroll`], the change lock held. The pod is forgotten only once it is
    /// released: if releasing fails it stays known (and in the state file), to be tried again.
    fn unenroll_now(&self, uid: &str) -> Result<(), PodError> {
        let spec = self
            .pods
            .lock()
            .expect("pod registry lock poisoned")
            .get(uid)
            .map(|p| p.status.spec.clone())
            .ok_or_else(|| PodError::Unknown(uid.into()))?;
        self.release(&spec)?;
        let pod = self.pods.lock().expect("pod registry lock poisoned").remove(uid);
        drop(pod);
        self.prune_certs();
        self.persist()?;
        info!(pod = %uid, "un-enrolled");
        Ok(())
    }

    /// Lets go of the certificates no captured pod uses any more. The pod lock is held
    /// throughout (enrolling takes it before asking for a certificate), so a pod of the same
    /// identity enrolled meanwhile cannot lose the certificate it just asked for.
    fn prune_certs(&self) {
        let pods = self.pods.lock().expect("pod registry lock poisoned");
        let in_use: std::collections::HashSet<(&str, &str)> = pods
            .values()
            .filter(|p| p.status.captured)
            .map(|p| (p.status.spec.namespace.as_str(), p.status.spec.service_account.as_str()))
            .collect();
        self.ctx
            .certs
            .retain(|id| in_use.contains(&(id.namespace.as_str(), id.service_account.as_str())));
    }

    /// Pods and counters.
    pub fn status(&self) -> AgentStatus {
        let pods = self.pods.lock().expect("pod registry lock poisoned");
        AgentStatus {
            pods: pods.values().map(|p| p.status.clone()).collect(),
            counters: self.ctx.counters(),
        }
    }

    fn persist(&self) -> Result<(), PodError> {
        let specs: Vec<PodSpec> = self
            .pods
            .lock()
            .expect("pod registry lock poisoned")
            .values()
            .map(|p| p.status.spec.clone())
            .collect();
        let path = self.state_file();
        let err = |source| PodError::State { path: path.clone(), source };
        std::fs::create_dir_all(&self.settings.state_dir).map_err(err)?;
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(&specs).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, json).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }
}

fn not_enrolled(mesh: &MeshIndex, spec: &PodSpec) -> String {
    let label = sinew_model::DATAPLANE_MODE_LABEL;
    let workload = mesh.pod_workload(&spec.namespace, &spec.name, &spec.ips);
    match workload.and_then(|w| w.labels.get(label).map(|mode| (w, mode))) {
        Some((w, mode)) => format!("Workload {} is labelled {label}={mode}", w.key()),
        None => format!(
            "namespace {:?} is not enrolled (label {label}={})",
            spec.namespace,
            sinew_model::DATAPLANE_MODE_AMBIENT
        ),
    }
}

/// Field checks that need no system access.
fn validate(spec: &PodSpec) -> Result<(), PodError> {
    let invalid = |field, reason: &str| PodError::Invalid {
        uid: spec.uid.clone(),
        field,
        reason: reason.into(),
    };
    if spec.uid.is_empty()
        || spec.uid.len() > 128
        || !spec.uid.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        || spec.uid.starts_with('.')
    {
        return Err(invalid(
            "uid",
            "must be 1 to 128 characters of [A-Za-z0-9._-], not starting with '.'",
        ));
    }
    if !sinew_model::is_dns_label(&spec.namespace) {
        return Err(invalid("namespace", "must be an RFC 1123 label"));
    }
    if spec.name.is_empty() || spec.name.len() > 253 {
        return Err(invalid("name", "must be 1 to 253 characters"));
    }
    if spec.service_account.is_empty() {
        return Err(invalid("serviceAccount", "must not be empty"));
    }
    if spec.ips.is_empty() {
        return Err(invalid("ips", "a pod needs at least one address"));
    }
    if let Some(ip) =
        spec.ips.iter().find(|ip| ip.is_loopback() || ip.is_unspecified() || ip.is_multicast())
    {
        return Err(invalid("ips", &format!("{ip} cannot be a pod address")));
    }
    if !spec.netns.is_absolute() {
        return Err(invalid("netns", "must be an absolute path"));
    }
    Ok(())
}

/// The state directory's pod file, for `cleanup`.
pub fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("pods.json")
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn spec() -> PodSpec {
        PodSpec {
            uid: "u-1".into(),
            name: "client".into(),
            namespace: "demo".into(),
            service_account: "default".into(),
            netns: "/run/netns/x".into(),
            cgroup: None,
            ips: vec!["198.18.1.2".parse().unwrap()],
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(validate(&spec()).is_ok());
        type Mutation = fn(&mut PodSpec);
        let cases: [(Mutation, &str); 5] = [
            (|s| s.uid = "../etc".into(), "uid"),
            (|s| s.namespace = "Demo".into(), "namespace"),
            (|s| s.ips.clear(), "ips"),
            (|s| s.ips = vec![IpAddr::from([127, 0, 0, 1])], "ips"),
            (|s| s.netns = "relative".into(), "netns"),
        ];
        for (mutate, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = validate(&s).unwrap_err().to_string();
            assert!(err.contains(&format!("field {field}:")), "{err}");
        }
    }
}
