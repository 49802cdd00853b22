//! Checks of the shipped man pages and completion scripts, shared by `generate.rs` (freshly
//! generated) and `packages.rs` (as extracted from the packages).

use std::path::Path;
use std::process::Command;

use super::run_ok;

/// Every page rendered by `man -l --warnings` at 80 columns: no warnings, and the text is there.
pub fn assert_pages_render_cleanly(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        let out = Command::new("man")
            .args(["-l", "--warnings"])
            .arg(dir.join(name))
            .env("MANWIDTH", "80")
            .env("PAGER", "cat")
            .output()
            .expect("man (Debian's man-db) is installed by installer/dev/prereqs.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        assert!(stderr.trim().is_empty(), "{name} has warnings:\n{stderr}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("NAME") && text.contains("exoagent"),
            "{name}:\n{text}"
        );
    }
    names
}

/// What bash's completion function offers for `words`, the last being the word completed.
pub fn bash_completes(script: &Path, words: &[&str]) -> Vec<String> {
    // Called as bash calls it: COMP_WORDS/COMP_CWORD set, and the command, the current word and
    // the previous word as arguments.
    let program = r#"source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))
_exoagent exoagent "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}""#;
    let out = run_ok(
        Command::new("bash")
            .args(["--norc", "--noprofile", "-c", program, "bash"])
            .arg(script)
            .args(words),
        "bash completion",
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The completions bash offers for the subcommands and for the service arguments.
pub fn assert_bash_completes_subcommands_and_services(script: &Path) {
    let offered = bash_completes(script, &["exoagent", ""]);
    for sub in [
        "run", "sandbox", "validate", "status", "logs", "down", "userdata", "install", "bake",
    ] {
        assert!(offered.iter().any(|w| w == sub), "{sub}: {offered:?}");
    }
    for internal in [
        "shim",
        "front",
        "desktop-session",
        "guacamole-web",
        "generate",
    ] {
        assert!(
            !offered.iter().any(|w| w == internal),
            "{internal}: {offered:?}"
        );
    }
    let services = ["jupyterlab", "rstudio", "desktop", "guacamole"];
    for words in [
        &["exoagent", "logs", ""][..],
        &["exoagent", "bake", "--service", ""],
        &["exoagent", "userdata", "--service", ""],
    ] {
        let offered = bash_completes(script, words);
        for service in services {
            assert!(
                offered.iter().any(|w| w == service),
                "{words:?}: {offered:?}"
            );
        }
    }
    assert_eq!(
        bash_completes(script, &["exoagent", "lo"]),
        ["logs"],
        "a prefix narrows it"
    );
}
