//! Shared by the CLI's integration tests.
#![allow(dead_code)]

use std::process::{Command, Stdio};

/// True when `tool` is on the PATH. Under `CI=true` a missing tool fails the test instead of skipping it.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{tool} is required under CI=true but not installed");
        eprintln!("skipping: {tool} not installed");
    }
    found
}
