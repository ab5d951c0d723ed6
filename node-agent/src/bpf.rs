//! Loading, attaching and pinning the capture programs, and the agent's side of their maps.
//!
//! Maps are pinned by name under `<bpffs-dir>/maps` and every pod's links under
//! `<bpffs-dir>/pods/<uid>/`, so capture keeps working (and keeps failing closed) while the
//! agent is down, and a restarted agent re-adopts what it finds. Removing a pod's pin directory
//! releases its links, which detaches the programs: nothing else holds them.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockopt, SkLookup,
        links::{FdLink, PinnedLink},
    },
};
use sinew_ebpf_common::{IpKey, ListenerKey, maps};

use crate::netns::Netns;

/// Errors of this module, each naming the object, program, map or path involved.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object file could not be loaded.
    #[error("loading eBPF object {path}: {source}")]
    Load {
        /// Object path.
        path: PathBuf,
        /// Cause (boxed: aya's error is large and this path is cold).
        source: Box<aya::EbpfError>,
    },
    /// A program is missing from the object or was refused by the kernel.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause (boxed, as above).
        source: Box<aya::programs::ProgramError>,
    },
    /// A program is missing from the object.
    #[error("eBPF object has no program {0} (rebuild it with `cargo xtask build-ebpf`)")]
    MissingProgram(&'static str),
    /// A map is missing or has the wrong shape.
    #[error("eBPF map {name}: {reason}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// Pinning a link failed.
    #[error("pinning {path}: {reason}")]
    Pin {
        /// Pin path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A filesystem operation under bpffs failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The programs attached to every pod cgroup, with the pin file name of each link.
const CGROUP_PROGRAMS: [&str; 5] = [
    "sinew_connect4",
    "sinew_connect6",
    "sinew_getpeername4",
    "sinew_getpeername6",
    "sinew_sockops",
];
const SK_LOOKUP: &str = "sinew_sk_lookup";
const GETSOCKOPT: &str = "sinew_getsockopt";

/// The loaded programs and the maps the agent writes.
pub struct Capture {
    ebpf: Ebpf,
    pin_root: PathBuf,
    pod_addrs: HashMap<MapData, IpKey, u32>,
    listeners: SockHash<MapData, ListenerKey>,
}

/// The kernel's form of an address.
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey::v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            IpKey::v6([w(0), w(4), w(8), w(12)])
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BpfError + '_ {
    move |source| BpfError::Io { path: path.to_path_buf(), source }
}

impl Capture {
    /// Loads `object`, reusing maps pinned under `pin_root`, and attaches the getsockopt
    /// program to the agent's own cgroup.
    pub fn load(object: &Path, pin_root: &Path, own_cgroup: &Path) -> Result<Self, BpfError> {
        ensure_bpffs(pin_root)?;
        let maps_dir = pin_root.join("maps");
        std::fs::create_dir_all(&maps_dir).map_err(io_err(&maps_dir))?;
        let mut ebpf =
            EbpfLoader::new().default_map_pin_directory(&maps_dir).load_file(object).map_err(
                |source| BpfError::Load { path: object.to_path_buf(), source: Box::new(source) },
            )?;

        for name in CGROUP_PROGRAMS.into_iter().chain([SK_LOOKUP, GETSOCKOPT]) {
            let prog = ebpf.program_mut(name).ok_or(BpfError::MissingProgram(name))?;
            let loaded = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                aya::programs::Program::SkLookup(p) => p.load(),
                aya::programs::Program::CgroupSockopt(p) => p.load(),
                _ => return Err(BpfError::MissingProgram(name)),
            };
            loaded.map_err(|source| BpfError::Program { name, source: Box::new(source) })?;
        }

        let cgroup = File::open(own_cgroup).map_err(io_err(own_cgroup))?;
        let getsockopt: &mut CgroupSockopt = program(&mut ebpf, GETSOCKOPT)?;
        getsockopt
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| BpfError::Program { name: GETSOCKOPT, source: Box::new(source) })?;

        let map_err = |name: &'static str| {
            move |e: aya::maps::MapError| BpfError::Map { name, reason: e.to_string() }
        };
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(BpfError::Map { name, reason: "missing from the object".into() })
        };
        let pod_addrs = HashMap::try_from(take(&mut ebpf, maps::POD_ADDRS)?)
            .map_err(map_err(maps::POD_ADDRS))?;
        let listeners = SockHash::try_from(take(&mut ebpf, maps::LISTENERS)?)
            .map_err(map_err(maps::LISTENERS))?;
        Ok(Self { ebpf, pin_root: pin_root.to_path_buf(), pod_addrs, listeners })
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        pod_pin_dir(&self.pin_root, uid)
    }

    /// True when every link of the pod is pinned (left by this or an earlier agent).
    pub fn pod_attached(&self, uid: &str) -> bool {
        let dir = self.pod_dir(uid);
        CGROUP_PROGRAMS.iter().chain([&SK_LOOKUP]).all(|p| dir.join(p).exists())
    }

    /// True when any link of the pod is pinned (an attach cut short leaves some): such a
    /// pod's pins must still be released when it leaves the mesh.
    pub fn pod_pinned(&self, uid: &str) -> bool {
        let dir = self.pod_dir(uid);
        CGROUP_PROGRAMS.iter().chain([&SK_LOOKUP]).any(|p| dir.join(p).exists())
    }

    /// Points a pod's pinned links at this agent's programs (`BPF_LINK_UPDATE`, atomic), so a
    /// restarted or upgraded agent runs its own code without the pod ever being detached.
    pub fn relink_pod(&mut self, uid: &str) -> Result<(), BpfError> {
        let dir = self.pod_dir(uid);
        for name in CGROUP_PROGRAMS.into_iter().chain([SK_LOOKUP]) {
            let path = dir.join(name);
            let prog = self.ebpf.program(name).ok_or(BpfError::MissingProgram(name))?;
            let prog_fd =
                prog.fd().map_err(|source| BpfError::Program { name, source: Box::new(source) })?;
            let link = sys::obj_get(&path).map_err(io_err(&path))?;
            sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Attaches the capture programs to a pod's cgroup and network namespace and pins the
    /// links. On failure nothing stays attached.
    pub fn attach_pod(&mut self, uid: &str, cgroup: &Path, netns: &Netns) -> Result<(), BpfError> {
        let dir = self.pod_dir(uid);
        // Leftovers of an interrupted attach would make Single-mode attaches fail.
        detach_pod(&self.pin_root, uid)?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let result = self.attach_pod_inner(&dir, cgroup, netns);
        if result.is_err() {
            let _ = detach_pod(&self.pin_root, uid);
        }
        result
    }

    fn attach_pod_inner(
        &mut self,
        dir: &Path,
        cgroup: &Path,
        netns: &Netns,
    ) -> Result<(), BpfError> {
        let cg = File::open(cgroup).map_err(io_err(cgroup))?;
        for name in CGROUP_PROGRAMS {
            let prog_err = |source: aya::programs::ProgramError| BpfError::Program {
                name,
                source: Box::new(source),
            };
            // The program types differ but attach alike; a macro keeps one copy of the steps.
            macro_rules! attach {
                ($p:expr) => {{
                    let id = $p.attach(&cg, CgroupAttachMode::Single).map_err(prog_err)?;
                    let link = $p.take_link(id).map_err(prog_err)?;
                    FdLink::try_from(link).map_err(|e| pin_err(dir, e))?
                }};
            }
            let link = match self.ebpf.program_mut(name) {
                Some(aya::programs::Program::CgroupSockAddr(p)) => attach!(p),
                Some(aya::programs::Program::SockOps(p)) => attach!(p),
                _ => return Err(BpfError::MissingProgram(name)),
            };
            pin(link, &dir.join(name))?;
        }
        let sk_lookup: &mut SkLookup = program(&mut self.ebpf, SK_LOOKUP)?;
        let id = sk_lookup
            .attach(netns.file())
            .map_err(|source| BpfError::Program { name: SK_LOOKUP, source: Box::new(source) })?;
        let link = sk_lookup
            .take_link(id)
            .map_err(|source| BpfError::Program { name: SK_LOOKUP, source: Box::new(source) })?;
        let link: FdLink = link.into();
        pin(link, &dir.join(SK_LOOKUP))
    }

    /// Marks `ip` as a captured pod address (inbound to it goes to the agent or is refused).
    pub fn add_addr(&mut self, ip: IpAddr) -> Result<(), BpfError> {
        self.pod_addrs.insert(ip_key(ip), 1, 0).map_err(|e| BpfError::Map {
            name: maps::POD_ADDRS,
            reason: format!("adding {ip}: {e}"),
        })
    }

    /// Forgets a pod address; inbound to it is no longer touched.
    pub fn remove_addr(&mut self, ip: IpAddr) {
        let _ = self.pod_addrs.remove(&ip_key(ip));
        for kind in [sinew_ebpf_common::SLOT_PLAINTEXT, sinew_ebpf_common::SLOT_HBONE] {
            for w in 0..sinew_ebpf_common::WORKER_SLOTS {
                let slot = sinew_ebpf_common::listener_slot(kind, w);
                let _ = self.listeners.remove(&ListenerKey { ip: ip_key(ip), slot });
            }
        }
    }

    /// Points inbound connections for `ip` in `slot` (see `listener_slot`) at `listener` (a
    /// socket in the pod's namespace; the kernel drops the entry when the socket closes).
    pub fn set_listener(
        &mut self,
        ip: IpAddr,
        slot: u32,
        listener: &impl AsRawFd,
    ) -> Result<(), BpfError> {
        self.listeners
            .insert(ListenerKey { ip: ip_key(ip), slot }, listener.as_raw_fd(), 0)
            .map_err(|e| BpfError::Map {
                name: maps::LISTENERS,
                reason: format!("adding listener for {ip}: {e}"),
            })
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(BpfError::MissingProgram(name))?;
    prog.try_into().map_err(|source| BpfError::Program { name, source: Box::new(source) })
}

fn pin_err(dir: &Path, e: impl std::fmt::Display) -> BpfError {
    BpfError::Pin { path: dir.to_path_buf(), reason: e.to_string() }
}

fn pin(link: FdLink, path: &Path) -> Result<(), BpfError> {
    let pinned: PinnedLink = link.pin(path).map_err(|e| pin_err(path, e))?;
    // Dropping our handle leaves the pin as the only reference: the link lives on its own.
    drop(pinned);
    Ok(())
}

/// Mounts bpffs at `/sys/fs/bpf` when `dir` is not on a bpf filesystem yet, as the pins need.
pub fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").map_err(io_err(Path::new("/proc/mounts")))?;
    let on_bpffs = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next().unwrap_or_default(), f.next());
        fstype == Some("bpf") && dir.starts_with(mnt)
    });
    if on_bpffs {
        return Ok(());
    }
    let target = Path::new("/sys/fs/bpf");
    if !dir.starts_with(target) {
        return Err(BpfError::Pin {
            path: dir.to_path_buf(),
            reason: "not on a bpf filesystem; mount one there or use a directory below /sys/fs/bpf"
                .into(),
        });
    }
    nix::mount::mount(Some("bpf"), target, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| BpfError::Io { path: target.to_path_buf(), source: e.into() })
}

/// Where a pod's links are pinned.
pub fn pod_pin_dir(pin_root: &Path, uid: &str) -> PathBuf {
    pin_root.join("pods").join(uid)
}

/// Detaches a pod: removing its pins releases the links (nothing else holds them).
pub fn detach_pod(pin_root: &Path, uid: &str) -> Result<(), BpfError> {
    let dir = pod_pin_dir(pin_root, uid);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::Io { path: dir, source }),
    }
}

/// Removes every pin under `pin_root`: all pod links and the maps. With the agent stopped,
/// nothing of Sinew stays attached afterwards.
pub fn remove_all(pin_root: &Path) -> Result<bool, BpfError> {
    match std::fs::remove_dir_all(pin_root) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(BpfError::Io { path: pin_root.to_path_buf(), source }),
    }
}

/// The two bpf(2) commands aya 0.14 does not expose: opening a pinned object and
/// `BPF_LINK_UPDATE`.
mod sys {
    use std::{
        ffi::CString,
        io,
        os::{
            fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
            unix::ffi::OsStrExt,
        },
        path::Path,
    };

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;

    /// `union bpf_attr` as these two commands use it; the tail must be zero.
    #[repr(C)]
    struct Attr {
        a: u64,
        b: u32,
        c: u32,
        tail: [u64; 14],
    }

    fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a valid, fully initialised bpf_attr of the size passed.
        let r = unsafe {
            libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>())
        };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
    }

    /// `BPF_OBJ_GET`: a descriptor for the object pinned at `path`.
    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // pathname (u64), bpf_fd = 0, file_flags = 0.
        let mut attr = Attr { a: c.as_ptr() as u64, b: 0, c: 0, tail: [0; 14] };
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// `BPF_LINK_UPDATE`: link_fd, new_prog_fd, flags = 0, old_prog_fd = 0.
    pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
        let (link, prog) = (link.as_raw_fd() as u32, prog.as_raw_fd() as u32);
        // The first two u32 fields share `a`, in memory order.
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&link.to_ne_bytes());
        bytes[4..].copy_from_slice(&prog.to_ne_bytes());
        let mut attr = Attr { a: u64::from_ne_bytes(bytes), b: 0, c: 0, tail: [0; 14] };
        bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
    }
}
