//! The generated code is committed (so builds need no protoc); this test regenerates it with
//! protoc and fails when the committed copy differs. Run `SINEW_REGENERATE=1 cargo test -p
//! sinew-api` to rewrite it after changing the .proto.

use std::path::Path;

#[test]
fn generated_code_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Resource bodies are shared by every client's response: reference-counted, not copied.
        .bytes(".sinew.v1.Resource.body")
        .out_dir(out.path())
        .compile_protos(&[root.join("proto/sinew/v1/control.proto")], &[root.join("proto")])
        .expect(
            "protoc (Debian: protobuf-compiler) must be installed; `cargo xtask test` installs it",
        );
    let fresh = std::fs::read_to_string(out.path().join("sinew.v1.rs")).unwrap();
    let committed_path = root.join("src/gen/sinew.v1.rs");
    if std::env::var_os("SINEW_REGENERATE").is_some() {
        std::fs::create_dir_all(committed_path.parent().unwrap()).unwrap();
        std::fs::write(&committed_path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is stale: run SINEW_REGENERATE=1 cargo test -p sinew-api",
        committed_path.display()
    );
}
