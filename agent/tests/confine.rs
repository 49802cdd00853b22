//! The confinement the network-facing processes take (`platform/confine.rs`), shown on the real
//! kernel: a child process confines itself and then tries what an attacker in the Guacamole web
//! side or the TLS front would. The same child unconfined does all of it, so every denial below
//! is the confinement's doing. Needs a kernel with Landlock ABI 6 (Linux 6.12+), as this machine
//! and CI have; on an older kernel the test fails and says so rather than passing vacuously.
//!
//! `harness = false`: the confinement must be taken while the process is single-threaded, and
//! libtest runs tests on threads of its own.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;

use exoagent::platform::confine::{confine, Allowed, ConfineError, Enforcement};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(&args[2..]);
        return;
    }
    // `cargo test -- --list` and filters from run-all: this binary has one test.
    if args.iter().any(|a| a == "--list") {
        println!("confinement_denies_what_it_promises_and_nothing_else: test");
        return;
    }
    confinement_denies_what_it_promises_and_nothing_else();
    println!("test confinement_denies_what_it_promises_and_nothing_else ... ok");
}

fn confinement_denies_what_it_promises_and_nothing_else() {
    let scratch = tempfile::tempdir().unwrap();
    let allowed_dir = scratch.path().join("tls");
    let other_dir = scratch.path().join("secrets");
    std::fs::create_dir(&allowed_dir).unwrap();
    std::fs::create_dir(&other_dir).unwrap();
    std::fs::write(allowed_dir.join("cert.pem"), "certificate").unwrap();
    std::fs::write(other_dir.join("passphrase"), "secret").unwrap();
    // Renamed by each child (unconfined, then confined) in each directory: the confined one
    // may rename beneath `rename_beneath` (the web side's home folder) only.
    for mode in ["unconfined", "confined"] {
        std::fs::write(
            other_dir.join(format!("upload-{mode}.incomplete-upload")),
            "x",
        )
        .unwrap();
        std::fs::write(
            allowed_dir.join(format!("upload-{mode}.incomplete-upload")),
            "x",
        )
        .unwrap();
    }
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = |l: &TcpListener| l.local_addr().unwrap().port().to_string();

    let run = |mode: &str| -> BTreeMap<String, String> {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["child", mode])
            .arg(&allowed_dir)
            .arg(&other_dir)
            .args([port(&backend), port(&elsewhere)])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "child {mode} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    };

    let free = run("unconfined");
    for check in [
        "read_system_file",
        "read_allowed",
        "read_other",
        "stat_other",
        "write_allowed",
        "exec",
        "connect_backend",
        "connect_elsewhere",
        "bind",
        "signal_parent",
        "thread_reads_system_file",
        "rename_in_renamable",
        "rename_elsewhere",
    ] {
        assert_eq!(free[check], "ok", "unconfined, {check}: {free:?}");
    }
    assert_eq!(free["no_new_privs"], "0", "{free:?}");

    let confined = run("confined");
    assert_eq!(
        confined["enforcement"], "full",
        "this kernel does not enforce everything (Landlock ABI 6 needed): {confined:?}"
    );
    for (check, expected) in [
        ("read_system_file", "denied"),
        ("read_allowed", "ok"),
        ("read_other", "denied"),
        // `stat` is no Landlock right: the web side learns a download's size (transfer.rs).
        ("stat_other", "ok"),
        ("write_allowed", "denied"),
        ("exec", "denied"),
        ("connect_backend", "ok"),
        ("connect_elsewhere", "denied"),
        ("bind", "denied"),
        ("signal_parent", "denied"),
        ("thread_reads_system_file", "denied"),
        // Renaming beneath the renamable directory, nothing else there (its files stay
        // unreadable, `read_other`) and no rename elsewhere.
        ("rename_in_renamable", "ok"),
        ("rename_elsewhere", "denied"),
        ("no_new_privs", "1"),
    ] {
        assert_eq!(confined[check], expected, "confined, {check}: {confined:?}");
    }

    let threaded = run("threaded");
    assert_eq!(threaded["confine"], "confine-threaded", "{threaded:?}");
}

/// What the child tries; prints `check=ok|denied|error: …` lines.
fn child(args: &[String]) {
    let (mode, allowed_dir, other_dir) = (&args[0], Path::new(&args[1]), Path::new(&args[2]));
    let backend: u16 = args[3].parse().unwrap();
    let elsewhere: u16 = args[4].parse().unwrap();
    match mode.as_str() {
        "confined" => {
            let allowed = Allowed {
                read_beneath: vec![allowed_dir.to_path_buf()],
                rename_beneath: vec![other_dir.to_path_buf()],
                connect_ports: vec![backend],
            };
            let confined = confine(&allowed).unwrap();
            let enforcement = match confined.enforcement {
                Enforcement::Full => "full",
                Enforcement::Partial => "partial",
                Enforcement::NoLandlock => "none",
            };
            println!("enforcement={enforcement}");
        }
        "threaded" => {
            let _sleeper = std::thread::spawn(|| std::thread::sleep(std::time::Duration::MAX));
            match confine(&Allowed::default()) {
                Err(e @ ConfineError::Threaded { .. }) => println!("confine={}", e.reason()),
                other => println!("confine={other:?}"),
            }
            return;
        }
        _ => {}
    }
    let outcome = |result: std::io::Result<()>| match result {
        Ok(()) => "ok".to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => "denied".to_owned(),
        Err(e) => format!("error: {e}"),
    };
    let read = |path: &Path| {
        std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut String::new()).map(drop))
    };
    println!(
        "read_system_file={}",
        outcome(read(Path::new("/etc/passwd")))
    );
    println!(
        "read_allowed={}",
        outcome(read(&allowed_dir.join("cert.pem")))
    );
    println!(
        "read_other={}",
        outcome(read(&other_dir.join("passphrase")))
    );
    println!(
        "stat_other={}",
        outcome(std::fs::metadata(other_dir.join("passphrase")).map(|m| assert_eq!(m.len(), 6)))
    );
    println!(
        "write_allowed={}",
        outcome(std::fs::write(allowed_dir.join(format!("new-{mode}")), "x"))
    );
    println!(
        "exec={}",
        outcome(Command::new("/bin/true").status().map(drop))
    );
    let connect =
        |port: u16| TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).map(drop);
    println!("connect_backend={}", outcome(connect(backend)));
    println!("connect_elsewhere={}", outcome(connect(elsewhere)));
    println!(
        "bind={}",
        outcome(TcpListener::bind("127.0.0.1:0").map(drop))
    );
    let parent = nix::unistd::getppid();
    println!(
        "signal_parent={}",
        outcome(nix::sys::signal::kill(parent, None).map_err(std::io::Error::from))
    );
    let from_thread = std::thread::spawn(move || read(Path::new("/etc/passwd")))
        .join()
        .unwrap();
    println!("thread_reads_system_file={}", outcome(from_thread));
    let rename = |dir: &Path| {
        std::fs::rename(
            dir.join(format!("upload-{mode}.incomplete-upload")),
            dir.join(format!("upload-{mode}")),
        )
    };
    println!("rename_in_renamable={}", outcome(rename(other_dir)));
    println!("rename_elsewhere={}", outcome(rename(allowed_dir)));
    let nnp = nix::sys::prctl::get_no_new_privs().unwrap();
    println!("no_new_privs={}", u8::from(nnp));
}
