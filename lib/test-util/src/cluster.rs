//! The local cluster: nodes and pods as network namespaces and cgroups, agents as processes.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use sinew_local_api::{AgentStatus, Client, PodSpec, PodStatus, Request, Response};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Runs a command and fails with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the workspace's binaries and the eBPF object are.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SINEW_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // Test binaries live in target/<profile>/deps; binaries in target/<profile>.
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The eBPF object built by `cargo xtask build-ebpf`, beside a profile directory.
pub fn ebpf_object(bin_dir: &Path) -> PathBuf {
    std::env::var_os("SINEW_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir.join("../ebpf/sinew.bpf.o"))
}

fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount")
}

/// A node: a network namespace with a bridge for its pods, and maybe an agent.
#[derive(Debug, Clone)]
pub struct Node {
    /// 1-based index; also the third octet of its pod subnet.
    pub index: u8,
    /// Its network namespace name.
    pub netns: String,
}

/// A pod: a network namespace and a cgroup v2 directory.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Pod name (unique in the cluster).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Network namespace name.
    pub netns: String,
    /// Absolute cgroup directory.
    pub cgroup: PathBuf,
    /// IPv4 then IPv6 address.
    pub ips: [IpAddr; 2],
    /// The node it runs on.
    pub node: u8,
    /// Its service account (its identity is `spiffe://cluster.local/ns/<ns>/sa/<sa>`).
    pub service_account: String,
}

impl Pod {
    /// The pod's IPv4 address.
    pub fn v4(&self) -> IpAddr {
        self.ips[0]
    }

    /// The pod's IPv6 address.
    pub fn v6(&self) -> IpAddr {
        self.ips[1]
    }

    /// The enrollment request for this pod.
    pub fn spec(&self) -> PodSpec {
        PodSpec {
            uid: format!("uid-{}", self.name),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            netns: PathBuf::from("/run/netns").join(&self.netns),
            cgroup: Some(self.cgroup.clone()),
            ips: self.ips.to_vec(),
        }
    }

    /// A command that runs `program` inside the pod (its cgroup, then its namespace).
    pub fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec nsenter "--net=$@""#)
            .arg(&self.cgroup)
            .arg(Path::new("/run/netns").join(&self.netns))
            .arg(program)
            .args(args)
            // Errors are read by tests and people: the message, not a backtrace.
            .env("RUST_BACKTRACE", "0");
        cmd
    }
}

/// A running `sinew-agent` process.
pub struct Agent {
    /// The local API socket.
    pub socket: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its pin directory.
    pub bpffs_dir: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its own cgroup, relative to the cgroup2 mount.
    pub cgroup_rel: String,
    node_netns: String,
    config_dir: PathBuf,
    bin_dir: PathBuf,
    child: Option<Child>,
    /// Its access log (one JSON line per connection).
    pub access_log: PathBuf,
    /// Extra `run` flags (the control service's, when the cluster has one).
    extra: Vec<String>,
}

impl Agent {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::create(&self.log)?;
        // nsenter, not `ip netns exec`: the latter remounts /sys, hiding cgroup2 and bpffs.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_netns))
            .arg(self.bin_dir.join("sinew-agent"))
            .arg("run")
            .args(self.host_args())
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--ebpf-object")
            .arg(ebpf_object(&self.bin_dir))
            .arg("--access-log")
            .arg(&self.access_log)
            .args(&self.extra)
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LOG", std::env::var("SINEW_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning sinew-agent")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Response::Status(_)) = self.client().call(&Request::Status {}) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("sinew-agent exited with {status}: {}", self.log_text());
            }
            ensure!(
                Instant::now() < deadline,
                "sinew-agent not ready in 20 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The flags naming this agent's socket, pins, state and cgroup (shared by `run` and
    /// `cleanup`).
    fn host_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (flag, value) in [
            ("--api-socket", self.socket.as_os_str()),
            ("--bpffs-dir", self.bpffs_dir.as_os_str()),
            ("--state-dir", self.state_dir.as_os_str()),
            ("--cgroup", std::ffi::OsStr::new(&self.cgroup_rel)),
        ] {
            args.push(flag.into());
            args.push(value.to_owned());
        }
        args
    }

    /// Runs `sinew-agent cleanup` for this agent's host paths (stop it first).
    pub fn cleanup(&self) -> Result<String> {
        let out = Command::new(self.bin_dir.join("sinew-agent"))
            .arg("cleanup")
            .args(self.host_args())
            .env("RUST_BACKTRACE", "0")
            .output()?;
        ensure!(out.status.success(), "cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's access log so far, one JSON object per connection (see
    /// [`access_entries`]).
    pub fn access_entries(&self) -> Vec<serde_json::Value> {
        access_entries(&self.access_log)
    }

    /// GETs `path` from the agent's admin endpoint (inside its node's namespace) with curl.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        sh(
            "nsenter",
            &[
                &format!("--net=/run/netns/{}", self.node_netns),
                "curl",
                "-sS",
                "--max-time",
                "10",
                &format!("http://127.0.0.1:15000{path}"),
            ],
        )
    }

    /// The sum of the Prometheus series of `name` whose labels contain every `label="value"`
    /// of `filter`.
    pub fn metric(&self, name: &str, filter: &[&str]) -> Result<f64> {
        let text = self.admin_get("/metrics")?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && filter.iter().all(|f| l.contains(f)))
            .filter(|l| l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum())
    }

    /// A client of its local API.
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// Enrolls a pod.
    pub fn enroll(&self, pod: &Pod) -> Result<PodStatus> {
        match self.client().call(&Request::Enroll { pod: pod.spec() })? {
            Response::Enrolled(s) => Ok(s),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// Un-enrolls a pod.
    pub fn unenroll(&self, pod: &Pod) -> Result<()> {
        self.client().call(&Request::Unenroll { uid: pod.spec().uid })?;
        Ok(())
    }

    /// Pods and counters.
    pub fn status(&self) -> Result<AgentStatus> {
        match self.client().call(&Request::Status {})? {
            Response::Status(s) => Ok(s),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's resident memory now, in KiB (from /proc).
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid().context("agent not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")
    }

    /// Asks the agent to stop (SIGTERM): it drains, then exits.
    pub fn terminate(&self) -> Result<()> {
        let pid = self.pid().context("agent not running")?;
        sh("kill", &["-TERM", &pid.to_string()]).map(drop)
    }

    /// Whether the agent has exited within `limit` (reaped if so).
    pub fn exited_within(&mut self, limit: Duration) -> Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            let Some(child) = self.child.as_mut() else { return Ok(true) };
            if child.try_wait()?.is_some() {
                self.child = None;
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the agent abruptly (SIGKILL), leaving its pins in place.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again after [`Agent::kill`].
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local cluster. Dropping it removes everything it made.
pub struct Cluster {
    id: String,
    dir: PathBuf,
    cgroup_root: PathBuf,
    cgroup_base: PathBuf,
    fabric: String,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The pods.
    pub pods: Vec<Pod>,
    /// Agents by node index - 1 (`None` where none was started).
    pub agents: Vec<Option<Agent>>,
    children: Vec<Child>,
    netns: Vec<String>,
    bin_dir: PathBuf,
    control: Option<Control>,
}

/// The control service of a cluster, in the fabric namespace.
struct Control {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    netns: String,
}

impl Control {
    fn spawn(&mut self, bin: &Path) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(bin)
            .args(&self.args)
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LOG", std::env::var("SINEW_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning sinew-control")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = sh(
                "nsenter",
                &[
                    &format!("--net=/run/netns/{}", self.netns),
                    "curl",
                    "-sf",
                    "--max-time",
                    "2",
                    "http://127.0.0.1:15000/ready",
                ],
            );
            if ready.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "sinew-control exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            ensure!(Instant::now() < deadline, "sinew-control not ready in 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The run a harness name (`sn<pid>x<n>...`) belongs to, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("sn")?;
    let (pid, after) = rest.split_once('x')?;
    after.starts_with(|c: char| c.is_ascii_digit()).then_some(())?;
    pid.parse().ok()
}

/// Whether a harness name belongs to a run that is over: its process is gone, or it is
/// this process, which has made no cluster yet (its pid was reused after a crash; the sweep
/// runs once, before any cluster of this process exists).
fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| {
        pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists()
    })
}

/// Removes what an interrupted run (Ctrl-C, SIGKILL: `Drop` never ran) left: its network
/// namespaces and their processes, cgroups, pinned eBPF links and temporary directory.
/// Runs once per process, before its first cluster; best effort.
fn sweep_stale() {
    let netns = sh("ip", &["netns", "list"]).unwrap_or_default();
    for ns in netns.lines().filter_map(|l| l.split_whitespace().next()) {
        if !is_stale(ns) {
            continue;
        }
        if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                if pid > 1 && pid != std::process::id() {
                    let _ = sh("kill", &["-9", &pid.to_string()]);
                }
            }
        }
        let _ = sh("ip", &["netns", "del", ns]);
    }
    let entries = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let name_of = |p: &Path| p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
    for pin in entries(Path::new("/sys/fs/bpf")) {
        if is_stale(&name_of(&pin)) {
            let _ = std::fs::remove_dir_all(&pin);
        }
    }
    for tmp in entries(&std::env::temp_dir()) {
        if name_of(&tmp).strip_prefix("sinew-test-").is_some_and(is_stale) {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    if let Ok(root) = cgroup2_root() {
        for base in entries(&root) {
            if !name_of(&base).strip_prefix("sinew-test-").is_some_and(is_stale) {
                continue;
            }
            let mut dirs: Vec<PathBuf> =
                entries(&base).into_iter().filter(|p| p.is_dir()).collect();
            dirs.push(base);
            for d in dirs {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                // Processes of another PID namespace read as 0: `kill -9 0` would kill our own
                // process group.
                for pid in procs.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                    if pid > 1 && pid != std::process::id() {
                        let _ = sh("kill", &["-9", &pid.to_string()]);
                    }
                }
                for _ in 0..50 {
                    if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Where the control service listens (on the fabric bridge).
pub const CONTROL_ADDR: &str = "198.18.0.254:15012";

impl Cluster {
    /// An empty cluster with a fabric namespace; `ambient` namespaces are enrolled in the mesh.
    pub fn new(ambient: &[&str]) -> Result<Self> {
        // Before this process's first cluster, and every cluster waits for it: a cluster of
        // another thread must not be taken for a stale one.
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale);
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let id = format!("sn{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("sinew-test-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("config"))?;
        let cgroup_root = cgroup2_root()?;
        let cgroup_base = cgroup_root.join(format!("sinew-test-{id}"));
        std::fs::create_dir_all(&cgroup_base)?;
        let mut c = Self {
            fabric: format!("{id}-fabric"),
            id,
            dir,
            cgroup_root,
            cgroup_base,
            nodes: vec![],
            pods: vec![],
            agents: vec![],
            children: vec![],
            netns: vec![],
            bin_dir: target_dir(),
            control: None,
        };
        let mut yaml = String::new();
        for ns in ["default", "plain"].iter().chain(ambient) {
            let label = if ambient.contains(ns) {
                "\n  labels:\n    sinew.io/dataplane-mode: ambient"
            } else {
                ""
            };
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{label}\n"
            ));
        }
        std::fs::write(c.dir.join("config/namespaces.yaml"), yaml)?;
        let fabric = c.fabric.clone();
        c.add_netns(&fabric)?;
        c.ip(&fabric, "link add br0 type bridge")?;
        c.ip(&fabric, "link set br0 up")?;
        Ok(c)
    }

    /// Starts `sinew-control` on the fabric (198.18.0.254:15012, TLS, a token per node);
    /// agents started afterwards get their certificates and configuration from it.
    pub fn start_control(&mut self) -> Result<()> {
        let fabric = self.fabric.clone();
        self.ip(&fabric, "addr add 198.18.0.254/24 dev br0")?;
        // Routes back to the pods, for clients of control that run in a pod (waypoints).
        for n in &self.nodes {
            self.ip(&fabric, &format!("route add 198.18.{k}.0/24 via 198.18.0.{k}", k = n.index))?;
        }
        let mut tokens = String::new();
        for k in 1..=16 {
            tokens.push_str(&format!("node{k} node-token-{}-{k}-0123456789\n", self.id));
            std::fs::write(
                self.dir.join(format!("token-n{k}")),
                format!("node-token-{}-{k}-0123456789\n", self.id),
            )?;
        }
        std::fs::write(self.dir.join("tokens"), tokens)?;
        let d = |p: &str| self.dir.join(p).to_string_lossy().into_owned();
        let mut control = Control {
            child: None,
            args: vec![
                "--config-dir".into(),
                d("config"),
                "--listen".into(),
                CONTROL_ADDR.into(),
                "--admin".into(),
                "127.0.0.1:15000".into(),
                "--ca-dir".into(),
                d("ca"),
                "--tokens".into(),
                d("tokens"),
            ],
            log: self.dir.join("control.log"),
            netns: fabric,
        };
        control.spawn(&self.binary("sinew-control"))?;
        self.control = Some(control);
        Ok(())
    }

    /// Stops the control service (agents keep their cached state).
    pub fn stop_control(&mut self) {
        if let Some(c) = &mut self.control {
            c.kill();
        }
    }

    /// Starts the control service again after [`Cluster::stop_control`].
    pub fn restart_control(&mut self) -> Result<()> {
        let bin = self.binary("sinew-control");
        let c = self.control.as_mut().context("no control service started")?;
        c.kill();
        c.spawn(&bin)
    }

    /// Writes (or replaces) a configuration file the control service and agents read.
    pub fn write_config(&self, name: &str, yaml: &str) -> Result<()> {
        let dir = self.dir.join("config");
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    }

    /// Removes a configuration file.
    pub fn remove_config(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.dir.join("config").join(name))?;
        Ok(())
    }

    /// Uses the binaries of another profile directory (such as `target/release`).
    pub fn set_bin_dir(&mut self, dir: &Path) {
        self.bin_dir = dir.to_path_buf();
    }

    /// The path of a workspace binary this cluster runs.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// The cluster's scratch directory (logs, sockets, state).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ip(&self, netns: &str, args: &str) -> Result<()> {
        let mut all = vec!["-n", netns];
        all.extend(args.split_whitespace());
        sh("ip", &all).map(drop)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        sh("ip", &["netns", "add", name])?;
        self.netns.push(name.to_owned());
        self.ip(name, "link set lo up")?;
        // No duplicate address detection: addresses are usable at once.
        sh(
            "ip",
            &[
                "netns",
                "exec",
                name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        Ok(())
    }

    /// Adds a node and routes between it and every other node.
    pub fn add_node(&mut self) -> Result<Node> {
        let k = self.nodes.len() as u8 + 1;
        let node = Node { index: k, netns: format!("{}-n{k}", self.id) };
        self.add_netns(&node.netns)?;
        let (ns, fabric) = (node.netns.clone(), self.fabric.clone());
        sh(
            "ip",
            &[
                "link",
                "add",
                "up0",
                "netns",
                &ns,
                "type",
                "veth",
                "peer",
                "name",
                &format!("n{k}"),
                "netns",
                &fabric,
            ],
        )?;
        self.ip(&fabric, &format!("link set n{k} master br0 up"))?;
        self.ip(&ns, "link set up0 up")?;
        self.ip(&ns, &format!("addr add 198.18.0.{k}/24 dev up0"))?;
        self.ip(&ns, &format!("addr add 2001:2:0:ff::{k}/64 dev up0 nodad"))?;
        self.ip(&ns, "link add br0 type bridge")?;
        self.ip(&ns, "link set br0 up")?;
        self.ip(&ns, &format!("addr add 198.18.{k}.1/24 dev br0"))?;
        self.ip(&ns, &format!("addr add 2001:2:0:{k}::1/64 dev br0 nodad"))?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        )?;
        for other in &self.nodes {
            let j = other.index;
            self.ip(&ns, &format!("route add 198.18.{j}.0/24 via 198.18.0.{j}"))?;
            self.ip(&ns, &format!("route add 2001:2:0:{j}::/64 via 2001:2:0:ff::{j}"))?;
            self.ip(&other.netns, &format!("route add 198.18.{k}.0/24 via 198.18.0.{k}"))?;
            self.ip(&other.netns, &format!("route add 2001:2:0:{k}::/64 via 2001:2:0:ff::{k}"))?;
        }
        if self.control.is_some() {
            let fabric = self.fabric.clone();
            self.ip(&fabric, &format!("route add 198.18.{k}.0/24 via 198.18.0.{k}"))?;
        }
        self.nodes.push(node.clone());
        self.agents.push(None);
        Ok(node)
    }

    /// Adds a pod on node `node` (1-based) in Kubernetes namespace `namespace`.
    pub fn add_pod(&mut self, node: u8, name: &str, namespace: &str) -> Result<Pod> {
        self.add_pod_as(node, name, namespace, "default")
    }

    /// Adds a pod running as service account `sa`, with its `Workload` resource (label
    /// `app: <name>`) in the configuration.
    pub fn add_pod_as(&mut self, node: u8, name: &str, namespace: &str, sa: &str) -> Result<Pod> {
        self.add_pod_labeled(node, name, namespace, sa, &[])
    }

    /// Adds a pod with extra workload labels (besides `app: <name>` unless `app` is given).
    pub fn add_pod_labeled(
        &mut self,
        node: u8,
        name: &str,
        namespace: &str,
        sa: &str,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        let n = self.nodes.get(node as usize - 1).context("no such node")?.clone();
        let host = 10 + self.pods.iter().filter(|p| p.node == node).count() as u8;
        let pod = Pod {
            name: name.into(),
            namespace: namespace.into(),
            netns: format!("{}-p-{name}", self.id),
            cgroup: self.cgroup_base.join(format!("pod-{name}")),
            ips: [
                format!("198.18.{node}.{host}").parse()?,
                format!("2001:2:0:{node}::{host}").parse()?,
            ],
            node,
            service_account: sa.into(),
        };
        let mut label_yaml = String::new();
        if !labels.iter().any(|(k, _)| *k == "app") {
            label_yaml.push_str(&format!("    app: {name}\n"));
        }
        for (k, v) in labels {
            label_yaml.push_str(&format!("    {k}: {v}\n"));
        }
        self.write_config(
            &format!("workload-{name}.yaml"),
            &format!(
                "apiVersion: sinew.io/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n{label_yaml}spec:\n  serviceAccount: {sa}\n  node: node{node}\n  ips: [\"{}\", \"{}\"]\n",
                pod.ips[0], pod.ips[1]
            ),
        )?;
        self.add_netns(&pod.netns)?;
        let peer = format!("p{host}");
        sh(
            "ip",
            &[
                "link", "add", "eth0", "netns", &pod.netns, "type", "veth", "peer", "name", &peer,
                "netns", &n.netns,
            ],
        )?;
        self.ip(&n.netns, &format!("link set {peer} master br0 up"))?;
        self.ip(&pod.netns, "link set eth0 up")?;
        self.ip(&pod.netns, &format!("addr add {}/24 dev eth0", pod.v4()))?;
        self.ip(&pod.netns, &format!("addr add {}/64 dev eth0 nodad", pod.v6()))?;
        self.ip(&pod.netns, &format!("route add default via 198.18.{node}.1"))?;
        self.ip(&pod.netns, &format!("-6 route add default via 2001:2:0:{node}::1"))?;
        std::fs::create_dir_all(&pod.cgroup)?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Starts an agent on node `node` (1-based).
    pub fn start_agent(&mut self, node: u8) -> Result<&mut Agent> {
        self.start_agent_with(node, &[])
    }

    /// [`Cluster::start_agent`] with extra flags.
    pub fn start_agent_with(&mut self, node: u8, flags: &[&str]) -> Result<&mut Agent> {
        let n = self.nodes.get(node as usize - 1).context("no such node")?.clone();
        let rel = self.cgroup_base.strip_prefix(&self.cgroup_root)?.join(format!("agent-n{node}"));
        let mut agent = Agent {
            socket: self.dir.join(format!("agent-n{node}.sock")),
            log: self.dir.join(format!("agent-n{node}.log")),
            bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/{}-n{node}", self.id)),
            state_dir: self.dir.join(format!("state-n{node}")),
            cgroup_rel: rel.to_string_lossy().into_owned(),
            node_netns: n.netns,
            config_dir: self.dir.join("config"),
            bin_dir: self.bin_dir.clone(),
            child: None,
            access_log: self.dir.join(format!("access-n{node}.log")),
            extra: match &self.control {
                Some(_) => vec![
                    "--control".into(),
                    format!("https://{CONTROL_ADDR}"),
                    "--control-ca".into(),
                    self.dir.join("ca/ca-cert.pem").to_string_lossy().into_owned(),
                    "--token-file".into(),
                    self.dir.join(format!("token-n{node}")).to_string_lossy().into_owned(),
                    "--node".into(),
                    format!("node{node}"),
                ],
                None => vec![],
            },
        };
        agent.extra.extend(flags.iter().map(|f| f.to_string()));
        agent.spawn()?;
        let slot = &mut self.agents[node as usize - 1];
        *slot = Some(agent);
        Ok(slot.as_mut().expect("just set"))
    }

    /// The agent of node `node` (1-based).
    pub fn agent(&mut self, node: u8) -> &mut Agent {
        self.agents[node as usize - 1].as_mut().expect("no agent started on that node")
    }

    /// Starts `sinew-testapp serve` in `pod` and waits until it listens.
    pub fn serve(&mut self, pod: &Pod, ports: &[u16]) -> Result<()> {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let args: Vec<&str> =
            std::iter::once("serve").chain(ports.iter().map(String::as_str)).collect();
        self.start_app(pod, &args)
    }

    /// Starts `sinew-testapp http <port> <name>` in `pod` and waits until it listens.
    pub fn serve_http(&mut self, pod: &Pod, port: u16, name: &str) -> Result<()> {
        self.start_app(pod, &["http", &port.to_string(), name])
    }

    /// Starts `sinew-testapp <args>` (a server mode) in `pod` and waits for its `ready`.
    pub fn start_app(&mut self, pod: &Pod, args: &[&str]) -> Result<()> {
        let mut child = pod
            .command(&self.binary("sinew-testapp"), args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("stdout")?;
        self.children.push(child);
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        ensure!(line.trim() == "ready", "testapp server in {} did not start: {line:?}", pod.name);
        Ok(())
    }

    /// Starts `sinew-waypoint` named `name` in a new pod on `node` (service account
    /// `waypoint`, not enrolled: it terminates HBONE itself), with the cluster's control
    /// service, and waits until it has its certificate. Its access log is
    /// `<dir>/waypoint-<name>.log`.
    pub fn start_waypoint(&mut self, node: u8, name: &str, namespace: &str) -> Result<Pod> {
        self.start_waypoint_with(node, name, namespace, &[])
    }

    /// [`Cluster::start_waypoint`] with extra flags (such as `--otlp-endpoint`).
    pub fn start_waypoint_with(
        &mut self,
        node: u8,
        name: &str,
        namespace: &str,
        extra: &[&str],
    ) -> Result<Pod> {
        ensure!(
            self.control.is_some(),
            "a waypoint needs the control service: start_control first"
        );
        // Labelled out of the mesh, as Istio labels its waypoint pods: no agent captures a
        // waypoint, which terminates HBONE itself, and agents still tunnel to it.
        let pod = self.add_pod_labeled(
            node,
            name,
            namespace,
            "waypoint",
            &[("sinew.io/dataplane-mode", "none")],
        )?;
        let d = |p: String| self.dir.join(p).to_string_lossy().into_owned();
        let args = [
            "--name".to_string(),
            name.into(),
            "--namespace".into(),
            namespace.into(),
            "--node".into(),
            format!("node{node}"),
            "--control".into(),
            format!("https://{CONTROL_ADDR}"),
            "--control-ca".into(),
            d("ca/ca-cert.pem".into()),
            "--token-file".into(),
            d(format!("token-n{node}")),
            "--state-dir".into(),
            d(format!("waypoint-{name}")),
            "--access-log".into(),
            d(format!("waypoint-{name}.log")),
        ];
        let args: Vec<&str> =
            args.iter().map(String::as_str).chain(extra.iter().copied()).collect();
        let log = std::fs::File::create(self.dir.join(format!("waypoint-{name}.stderr")))?;
        let child = pod
            .command(&self.binary("sinew-waypoint"), &args)
            .env("RUST_LOG", std::env::var("SINEW_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting sinew-waypoint")?;
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.pod_get(&pod, "http://127.0.0.1:15000/ready").is_err() {
            ensure!(
                Instant::now() < deadline,
                "sinew-waypoint not ready in 20 s: {}",
                std::fs::read_to_string(self.dir.join(format!("waypoint-{name}.stderr")))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(pod)
    }

    /// The access log of the waypoint `name` so far: one JSON object per request, or per
    /// connection to a plain TCP port (see [`access_entries`]).
    pub fn waypoint_access_entries(&self, name: &str) -> Vec<serde_json::Value> {
        access_entries(&self.dir.join(format!("waypoint-{name}.log")))
    }

    /// GETs `url` with curl inside `pod`'s network namespace (not its cgroup: never captured).
    pub fn pod_get(&self, pod: &Pod, url: &str) -> Result<String> {
        sh(
            "nsenter",
            &[&format!("--net=/run/netns/{}", pod.netns), "curl", "-sSf", "--max-time", "10", url],
        )
    }

    /// Starts `program` in `pod` in the background; it is killed when the cluster is dropped.
    /// Returns the process id of the wrapper, which execs into `program` (so it is
    /// `program`'s pid once started).
    pub fn spawn_in(&mut self, pod: &Pod, program: &Path, args: &[&str]) -> Result<u32> {
        let child = pod
            .command(program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} in {}", program.display(), pod.name))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Runs `program` in `pod` to completion; Ok(stdout) on success.
    pub fn exec_in(&self, pod: &Pod, program: &Path, args: &[&str]) -> Result<String> {
        let out = pod.command(program, args).output()?;
        ensure!(
            out.status.success(),
            "{} {} in {} failed: {}",
            program.display(),
            args.join(" "),
            pod.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `sinew-testapp <args>` in node `node`'s own namespace (where kubelet's probes
    /// would come from) to completion; Ok(stdout) on success.
    pub fn run_on_node(&self, node: u8, args: &[&str]) -> Result<String> {
        let n = self.nodes.iter().find(|n| n.index == node).context("no such node")?;
        let net = format!("--net=/run/netns/{}", n.netns);
        let app = self.binary("sinew-testapp");
        let app = app.to_string_lossy();
        let all: Vec<&str> = [net.as_str(), &app].into_iter().chain(args.iter().copied()).collect();
        sh("nsenter", &all)
    }

    /// Runs `sinew-testapp <args>` in `pod` to completion; Ok(stdout) on success.
    pub fn run_in(&self, pod: &Pod, args: &[&str]) -> Result<String> {
        let out = pod.command(&self.binary("sinew-testapp"), args).output()?;
        ensure!(
            out.status.success(),
            "testapp {} in {} failed: {}",
            args.join(" "),
            pod.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether any eBPF link is attached to `pod`'s cgroup or network namespace
    /// (asked of the kernel with bpftool).
    pub fn pod_has_links(&self, pod: &Pod) -> Result<bool> {
        Ok(!self.pod_link_programs(pod)?.is_empty())
    }

    /// The program ids of the links attached to `pod`'s cgroup or network namespace.
    pub fn pod_link_programs(&self, pod: &Pod) -> Result<Vec<u64>> {
        use std::os::unix::fs::MetadataExt;
        let cgroup_id = std::fs::metadata(&pod.cgroup)?.ino();
        let netns_ino = std::fs::metadata(Path::new("/run/netns").join(&pod.netns))?.ino();
        let links: serde_json::Value =
            serde_json::from_str(&sh("bpftool", &["-j", "link", "show"])?)?;
        let mut ids: Vec<u64> = links
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| {
                l.get("cgroup_id").and_then(|v| v.as_u64()) == Some(cgroup_id)
                    || l.get("netns_ino").and_then(|v| v.as_u64()) == Some(netns_ino)
            })
            .filter_map(|l| l.get("prog_id").and_then(|v| v.as_u64()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// A target address string for testapp.
    pub fn target(ip: IpAddr, port: u16) -> String {
        SocketAddr::new(ip, port).to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(c) = &mut self.control {
            c.kill();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for a in self.agents.iter_mut().flatten() {
            a.kill();
            let _ = std::fs::remove_dir_all(&a.bpffs_dir);
        }
        for ns in self.netns.iter().rev() {
            // Kill anything left in the namespace, then delete it.
            if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
                for pid in pids.split_whitespace() {
                    let _ = sh("kill", &["-9", pid]);
                }
            }
            let _ = sh("ip", &["netns", "del", ns]);
        }
        // Children before parents; a cgroup can be removed once its processes are gone.
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.cgroup_base)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default();
        dirs.push(self.cgroup_base.clone());
        for d in dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::env::var_os("SINEW_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The JSON lines of the access log at `path`. Agents and waypoints write theirs from a thread
/// of their own every few tens of milliseconds: read once it held still for a quarter second
/// (2 s at most), so lines of connections just ended are in.
pub fn access_entries(path: &Path) -> Vec<serde_json::Value> {
    let read = || std::fs::read_to_string(path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut text = read();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let again = read();
        if again == text || Instant::now() > deadline {
            text = again;
            break;
        }
        text = again;
    }
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names_are_the_harness_names_of_runs_that_are_over() {
        assert_eq!(owner_pid("sn123x0-fabric"), Some(123));
        assert_eq!(owner_pid("sn123x12-n1"), Some(123));
        assert_eq!(owner_pid("snow"), None);
        assert_eq!(owner_pid("sn123"), None);
        assert_eq!(owner_pid("sn123xa"), None);
        assert_eq!(owner_pid("web"), None);
        // This process made no cluster here: names under its pid are a crashed run's.
        assert!(is_stale(&format!("sn{}x0-fabric", std::process::id())));
        // pid 1 is always running.
        assert!(!is_stale("sn1x0-fabric"));
        assert!(!is_stale("shop"));
    }
}
