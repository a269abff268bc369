//! DSR flags: every mistake an operator can make on `run --dsr` or `agent` ends with exit
//! code 2 and a message naming what to fix, before anything binds or touches nftables.

use std::process::Command;

fn shardproxy(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardproxy"))
        .args(args)
        .output()
        .expect("run shardproxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A secret file of this test's own, removed on drop.
struct SecretFile(std::path::PathBuf);

impl SecretFile {
    fn path(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn secret(name: &str, bytes: &[u8]) -> SecretFile {
    let path = std::env::temp_dir().join(format!("sp-dsr-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    SecretFile(path)
}

const GOOD: &[u8] = b"a secret of at least sixteen bytes";

fn run(listen: &str, backend: &str, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["run", "--listen", listen, "--backend", backend];
    args.extend_from_slice(extra);
    shardproxy(&args)
}

#[test]
fn run_dsr_mistakes_exit_2_with_what_to_fix() {
    let (good_file, short_file) = (secret("good", GOOD), secret("short", b"too short"));
    let (good, short) = (good_file.path(), short_file.path());
    let be = "b1=127.0.0.1:9,agent=127.0.0.1:10";
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["--dsr", "--dsr-secret-file", &good],
            be,
            "--dsr-device",
        ),
        (
            vec!["--dsr", "--dsr-device", "eth0"],
            be,
            "--dsr-secret-file",
        ),
        (vec!["--dsr-device", "eth0"], be, "--dsr"),
        (
            vec!["--dsr", "--dsr-device", "eth0", "--dsr-secret-file", &short],
            be,
            "--dsr-secret-file",
        ),
        (
            vec![
                "--dsr",
                "--dsr-device",
                "eth0",
                "--dsr-secret-file",
                "/nonexistent/secret",
            ],
            be,
            "--dsr-secret-file",
        ),
        (
            vec![
                "--dsr",
                "--dsr-device",
                "not a device!",
                "--dsr-secret-file",
                &good,
            ],
            be,
            "--dsr-device",
        ),
        (
            vec!["--dsr", "--dsr-device", "eth0", "--dsr-secret-file", &good],
            "b1=127.0.0.1:9,agent=nowhere",
            "agent",
        ),
    ];
    for (extra, backend, names) in cases {
        let (code, err) = run("127.0.0.1:7000", backend, &extra);
        assert_eq!(code, 2, "{extra:?} {backend}: exit {code}, stderr {err}");
        assert!(
            err.contains(names),
            "{extra:?}: message does not name {names}: {err}"
        );
    }
    // The listen address is the VIP: one IPv4 address and a fixed port.
    for listen in ["0.0.0.0:7000", "127.0.0.1:0", "[::1]:7000"] {
        let (code, err) = run(
            listen,
            be,
            &["--dsr", "--dsr-device", "eth0", "--dsr-secret-file", &good],
        );
        assert_eq!(code, 2, "{listen}: exit {code}, stderr {err}");
        assert!(
            err.contains("--listen") && err.contains("virtual IP"),
            "{err}"
        );
    }
}

#[test]
fn agent_mistakes_exit_2_with_what_to_fix() {
    let (good_file, short_file) = (secret("agent-good", GOOD), secret("agent-short", b"short"));
    let (good, short) = (good_file.path(), short_file.path());
    let base = ["agent", "--control", "127.0.0.1:0", "--vip", "10.0.0.1"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // Exactly one of the two ways to deliver.
        (vec!["--secret-file", &good], "--forward"),
        (
            vec![
                "--secret-file",
                &good,
                "--forward",
                "127.0.0.1:9",
                "--handoff-socket",
                "/tmp/x.sock",
            ],
            "--handoff-socket",
        ),
        (
            vec!["--secret-file", &short, "--forward", "127.0.0.1:9"],
            "--secret-file",
        ),
        (
            vec![
                "--secret-file",
                "/nonexistent/secret",
                "--forward",
                "127.0.0.1:9",
            ],
            "--secret-file",
        ),
        (
            vec![
                "--secret-file",
                &good,
                "--forward",
                "127.0.0.1:9",
                "--steer-timeout",
                "0s",
            ],
            "--steer-timeout",
        ),
    ];
    for (extra, names) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(&extra);
        let (code, err) = shardproxy(&args);
        assert_eq!(code, 2, "{extra:?}: exit {code}, stderr {err}");
        assert!(
            err.contains(names),
            "{extra:?}: message does not name {names}: {err}"
        );
    }
    let (code, err) = shardproxy(&[
        "agent",
        "--control",
        "127.0.0.1:0",
        "--vip",
        "::1",
        "--secret-file",
        &good,
        "--forward",
        "127.0.0.1:9",
    ]);
    assert_eq!(code, 2, "an IPv6 VIP: {err}");
}
