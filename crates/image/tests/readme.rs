//! README.md's library example is the doctest of crates/image/src/lib.rs
//! that runs it: the two must not drift apart.

#[test]
fn the_readme_library_example_is_the_crate_doctest() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let lib = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/lib.rs")).unwrap();
    let section = &readme[readme
        .find("## Using Strata as a library")
        .expect("the README section")..];
    let start = section.find("```rust\n").expect("a rust block") + "```rust\n".len();
    let code = &section[start..start + section[start..].find("```").unwrap()];
    let lines: Vec<&str> = code.lines().collect();
    assert!(lines.len() > 5, "{code}");
    let doc: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l).to_string())
        .collect();
    let found = doc
        .windows(lines.len())
        .any(|w| w.iter().zip(&lines).all(|(a, b)| a == b));
    assert!(
        found,
        "README.md's example is not a doctest of lib.rs:\n{code}"
    );
}
