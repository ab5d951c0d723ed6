//! AuthorizationPolicy `targetRefs`: what parses, and what is refused with its field path.

use std::path::Path;

use sinew_model::{ConfigError, PolicyTargetRef, Resource, parse_file};

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: security.sinew.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, \
         namespace: shop}}\nspec:\n{spec}"
    )
}

fn errors_of(text: &str) -> Vec<ConfigError> {
    parse_file(Path::new("f.yaml"), text)
        .expect("parses as YAML")
        .into_iter()
        .filter_map(Result::err)
        .flat_map(|r| r.errors)
        .collect()
}

fn fields(errors: &[ConfigError]) -> Vec<&str> {
    errors.iter().map(|e| e.field.as_str()).collect()
}

#[test]
fn a_target_refs_policy_parses_and_round_trips() {
    let text = policy(
        "  targetRefs:\n    - {kind: Service, group: \"\", name: reviews}\n    - {kind: Gateway, \
         group: gateway.networking.k8s.io, name: waypoint}\n    - {kind: Service, group: core, \
         name: ratings}\n    - {kind: Gateway, name: other}\n  action: DENY\n  rules:\n    - to: \
         [{operation: {methods: [POST], paths: [\"/admin*\"]}}]\n",
    );
    let docs = parse_file(Path::new("f.yaml"), &text).unwrap();
    let Some(Ok(Resource::AuthorizationPolicy(p))) = docs.into_iter().next() else {
        panic!("not a valid AuthorizationPolicy")
    };
    let target = |group: Option<&str>, kind: &str, name: &str| PolicyTargetRef {
        group: group.map(str::to_owned),
        kind: kind.to_owned(),
        name: name.to_owned(),
    };
    assert_eq!(
        p.spec.target_refs,
        [
            target(Some(""), "Service", "reviews"),
            target(Some("gateway.networking.k8s.io"), "Gateway", "waypoint"),
            target(Some("core"), "Service", "ratings"),
            target(None, "Gateway", "other"),
        ]
    );
    assert!(p.spec.selector.is_none());
    let r = Resource::AuthorizationPolicy(p);
    assert_eq!(Resource::from_json("control", &r.to_json()).unwrap(), r);
}

#[test]
fn no_target_refs_is_an_empty_list() {
    let docs = parse_file(Path::new("f.yaml"), &policy("  action: DENY\n")).unwrap();
    let Some(Ok(Resource::AuthorizationPolicy(p))) = docs.into_iter().next() else { panic!() };
    assert!(p.spec.target_refs.is_empty());
}

#[test]
fn bad_target_refs_are_named() {
    let e = errors_of(&policy(
        "  targetRefs:\n    - {kind: Deployment, name: reviews}\n    - {kind: Service, group: \
         gateway.networking.k8s.io, name: reviews}\n    - {kind: Gateway, group: core, name: \
         Waypoint}\n",
    ));
    assert_eq!(
        fields(&e),
        [
            "spec.targetRefs[0].kind",
            "spec.targetRefs[1].group",
            "spec.targetRefs[2].group",
            "spec.targetRefs[2].name",
        ]
    );
    assert!(e[0].message.contains("\"Deployment\" is not a target kind"), "{}", e[0].message);
    assert_eq!(e[0].resource, "AuthorizationPolicy/shop/p");
    let e = errors_of(&policy("  targetRefs: [{kind: Service, name: s, port: 80}]\n"));
    assert_eq!(fields(&e), ["spec.targetRefs[0].port"], "unknown fields are refused");
    let e = errors_of(&policy("  targetRefs: [{name: s}]\n"));
    assert_eq!(e.len(), 1, "kind is required: {e:?}");
    assert!(e[0].message.contains("kind"), "{}", e[0].message);
}

#[test]
fn selector_and_target_refs_are_exclusive() {
    let e = errors_of(&policy(
        "  selector: {matchLabels: {app: reviews}}\n  targetRefs: [{kind: Service, name: \
         reviews}]\n",
    ));
    assert_eq!(fields(&e), ["spec.targetRefs"]);
    assert_eq!(e[0].message, "selector and targetRefs are exclusive");
    let ok = errors_of(&policy("  selector: {matchLabels: {app: reviews}}\n  targetRefs: []\n"));
    assert!(ok.is_empty(), "an empty targetRefs attaches to nothing: {ok:?}");
}

#[test]
fn the_single_target_ref_form_is_accepted_alone() {
    let docs =
        parse_file(Path::new("f.yaml"), &policy("  targetRef: {kind: Service, name: reviews}\n"))
            .unwrap();
    let Some(Ok(Resource::AuthorizationPolicy(p))) = docs.into_iter().next() else {
        panic!("not a valid AuthorizationPolicy")
    };
    let names: Vec<&str> = p.spec.targets().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["reviews"]);
    // Sent on as `targetRefs`, which clients of an earlier release read.
    assert!(p.spec.target_ref.is_none() && p.spec.target_refs.len() == 1);
    let r = Resource::AuthorizationPolicy(p);
    let json = String::from_utf8(r.to_json()).unwrap();
    assert!(json.contains("\"targetRefs\"") && !json.contains("\"targetRef\""), "{json}");
    assert_eq!(Resource::from_json("control", json.as_bytes()).unwrap(), r);
    let e = errors_of(&policy(
        "  targetRef: {kind: Service, name: a}\n  targetRefs: [{kind: Service, name: b}]\n",
    ));
    assert_eq!(fields(&e), ["spec.targetRef"]);
    assert_eq!(e[0].message, "targetRef and targetRefs are exclusive");
    let e = errors_of(&policy("  targetRef: {kind: Pod, name: a}\n"));
    assert_eq!(fields(&e), ["spec.targetRef.kind"], "{e:?}");
}
