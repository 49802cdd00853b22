//! `exoagent generate`: the man pages render with the real `man` (man-db) without a single
//! warning, and the real bash, sourcing the generated completion script, completes the
//! subcommands and the service names. The packages ship exactly these files (`packages.rs`).

mod common;

use std::process::Command;

use common::shipped::{
    assert_bash_completes_subcommands_and_services, assert_pages_render_cleanly,
};
use common::{exe, run_ok};

#[test]
fn man_pages_render_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(exe())
            .args(["generate", "man", "--out"])
            .arg(dir.path()),
        "generate man",
    );
    let names = assert_pages_render_cleanly(dir.path());
    assert!(names.contains(&"exoagent.1".to_owned()), "{names:?}");
    assert!(names.contains(&"exoagent-logs.1".to_owned()), "{names:?}");
    // Without --out: the top page on stdout.
    let out = run_ok(
        Command::new(exe()).args(["generate", "man"]),
        "generate man",
    );
    assert_eq!(
        out.stdout,
        std::fs::read(dir.path().join("exoagent.1")).unwrap()
    );
}

#[test]
fn bash_completes_subcommands_and_services() {
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(exe())
            .args(["generate", "completions", "bash", "--out"])
            .arg(dir.path()),
        "generate completions",
    );
    assert_bash_completes_subcommands_and_services(&dir.path().join("exoagent"));
}

#[test]
fn zsh_and_fish_scripts_name_the_services() {
    for shell in ["zsh", "fish"] {
        let out = run_ok(
            Command::new(exe()).args(["generate", "completions", shell]),
            "generate completions",
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("jupyterlab") && text.contains("rotate-token"),
            "{shell}"
        );
    }
}
