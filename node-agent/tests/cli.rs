//! Bad command-line input: a clear error naming the flag and its value, before the agent
//! touches anything (no root needed to see it).

use std::process::Command;

/// Runs `sinew-agent run <args>`; (success, stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sinew-agent"))
        .arg("run")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("the agent binary runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_flags_are_named_with_their_values() {
    for (args, want) in [
        (
            &["--trust-plaintext-from", "0.0.0.0"][..],
            "--trust-plaintext-from 0.0.0.0: not an address a connection can come from",
        ),
        (&["--trust-plaintext-from", "::"][..], "--trust-plaintext-from ::: not an address"),
        (
            &["--trust-plaintext-from", "::ffff:0.0.0.0"][..],
            "--trust-plaintext-from ::ffff:0.0.0.0: not an address",
        ),
        (
            &["--trust-plaintext-from", "probe"][..],
            "invalid value 'probe' for '--trust-plaintext-from",
        ),
        (&["--drain-timeout", "5x"][..], "\"5x\" is not a duration such as 10s"),
    ] {
        let (ok, err) = run(args);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
