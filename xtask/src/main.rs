//! `cargo xtask`: builds the eBPF objects and drives the demo, the tests and the benchmarks.
//!
//! Every command first ensures what it needs (see [`setup`]), so a fresh machine goes from
//! clone to a running mesh with `cargo xtask demo` and to every test tier with
//! `cargo xtask test`.

mod bench;
mod bench_control;
mod bench_l4;
mod bench_l7;
mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Sinew's build, demo, test and benchmark driver")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (apt packages, rust-src, bpf-linker) and mount bpffs.
    Setup,
    /// Build the eBPF object into target/ebpf/sinew.bpf.o.
    BuildEbpf,
    /// Build the eBPF object and every binary (debug).
    Build,
    /// Run a local two-node mesh and show traffic being captured.
    Demo,
    /// Every test tier: lints, unit and in-process tests, then the root tier.
    Test,
    /// Benchmarks (release build); each writes target/bench/<suite>.json.
    Bench {
        /// Which suite.
        #[arg(value_enum, default_value = "capture")]
        suite: Suite,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Suite {
    /// Direct vs captured plain TCP: throughput and new-connection latency.
    Capture,
    /// The control service: 10,000 workloads, 1,000 clients, one policy change.
    Control,
    /// The L4 mesh path (HBONE, mutual TLS) vs direct: throughput, HTTP with wrk, latency,
    /// agent memory.
    L4,
    /// The waypoint's HTTP engine vs Envoy, and the full mesh path through a waypoint.
    L7,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => {
            setup::ebpf_toolchain()?;
            setup::runtime()
        }
        Cmd::BuildEbpf => build_ebpf().map(|_| ()),
        Cmd::Build => build_all(false),
        Cmd::Demo => {
            setup::runtime()?;
            build_all(false)?;
            demo::run(&workspace().join("target/debug"))
        }
        Cmd::Test => test(),
        Cmd::Bench { suite: Suite::Control } => {
            println!("build: cargo build --release -p sinew-control --bins --example load");
            setup::run(Command::new(env!("CARGO")).current_dir(workspace()).args([
                "build",
                "--release",
                "-p",
                "sinew-control",
                "--bins",
                "--example",
                "load",
            ]))?;
            let root = workspace();
            bench_control::run(
                &root.join("target/release"),
                &root.join("target/bench/control.json"),
            )
        }
        Cmd::Bench { suite: Suite::L4 } => {
            setup::runtime()?;
            setup::apt(setup::BENCH_PACKAGES)?;
            build_all(true)?;
            let root = workspace();
            bench_l4::run(&root.join("target/release"), &root.join("target/bench/l4.json"))
        }
        Cmd::Bench { suite: Suite::L7 } => {
            setup::runtime()?;
            setup::apt(setup::BENCH_PACKAGES)?;
            let root = workspace();
            let envoy = setup::envoy(&root.join("target/tools/envoy"))?;
            build_all(true)?;
            bench_l7::run(&root.join("target/release"), &envoy, &root.join("target/bench/l7.json"))
        }
        Cmd::Bench { suite: Suite::Capture } => {
            setup::runtime()?;
            build_all(true)?;
            let root = workspace();
            bench::capture(&root.join("target/release"), &root.join("target/bench/capture.json"))
        }
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    println!("test: cargo {}", args.join(" "));
    setup::run(Command::new(env!("CARGO")).current_dir(workspace()).args(args))
}

/// Lints, tier 1 (unprivileged), tier 2 (root: netns, cgroups, eBPF, real agents).
fn test() -> Result<()> {
    // Formatting first: it needs no build and fails fastest.
    cargo(&["fmt", "--all", "--check"])?;
    setup::runtime()?;
    build_all(false)?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    cargo(&["test", "--workspace", "--exclude", "sinew-ebpf", "--exclude", "sinew-tests"])?;
    // One cluster at a time: two cores, and timings stay honest.
    cargo(&["test", "-p", "sinew-tests", "--tests", "--", "--test-threads=1"])
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Builds the kernel programs and copies the object to `target/ebpf/sinew.bpf.o`.
fn build_ebpf() -> Result<PathBuf> {
    setup::ebpf_toolchain()?;
    let root = workspace();
    let target_dir = root.join("target/bpf");
    println!("build-ebpf: cargo build -p sinew-ebpf --target bpfel-unknown-none");
    // RUSTC_BOOTSTRAP only here: -Z build-std=core on stable, for this one build.
    let flags =
        ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f");
    setup::run(
        Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["build", "--package", "sinew-ebpf", "--bins", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_ENCODED_RUSTFLAGS", flags)
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER"),
    )?;
    let built = target_dir.join("bpfel-unknown-none/release/sinew-ebpf");
    let out_dir = root.join("target/ebpf");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("sinew.bpf.o");
    std::fs::copy(&built, &out).with_context(|| format!("copying {}", built.display()))?;
    println!("build-ebpf: {}", out.display());
    Ok(out)
}

fn build_all(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut args = vec!["build", "--bins"];
    if release {
        args.push("--release");
    }
    println!("build: cargo {}", args.join(" "));
    // The default members: everything but the eBPF crate, which only builds for BPF.
    setup::run(Command::new(env!("CARGO")).current_dir(workspace()).args(&args))
}
