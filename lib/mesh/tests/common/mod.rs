//! Resources parsed from YAML with the real schema, shared by the test files.

use std::path::Path;

use sinew_model::Resource;

/// Every document of `yaml`, validated; a rejected one fails the test with its errors.
pub fn resources(yaml: &str) -> Vec<Resource> {
    sinew_model::parse_file(Path::new("test.yaml"), yaml)
        .unwrap_or_else(|e| panic!("YAML: {e}"))
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("rejected: {:?}", e.errors)))
        .collect()
}

/// A Namespace document.
#[allow(dead_code, reason = "each test file compiles this module; not every one uses all of it")]
pub fn namespace(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n---\n"
    )
}
