//! Unit tests of the steering commands and nft output handling (no root needed).

use super::nft::*;
use super::*;

fn cfg() -> SteerConfig {
    SteerConfig::new(
        "shardproxy_7000",
        "eth0",
        "192.0.2.10:7000".parse().unwrap(),
    )
}

fn c(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

#[test]
fn table_names_are_sanitized() {
    assert_eq!(table_name("7000"), "shardproxy_7000");
    assert_eq!(table_name("127.0.0.1:7000"), "shardproxy_127_0_0_1_7000");
    assert_eq!(table_name("a b;c\"{}"), "shardproxy_a_b_c___");
    assert!(table_name(&"x".repeat(1000)).len() <= MAX_NAME_LEN);
    let mut cfg = cfg();
    cfg.table = table_name("[::1]:80");
    assert!(cfg.validate().is_ok());
}

#[test]
fn validation_rejects_what_nft_would_misparse() {
    assert!(cfg().validate().is_ok());
    for (table, device) in [
        ("bad name", "eth0"),
        ("1abc", "eth0"),
        ("t;delete", "eth0"),
        ("", "eth0"),
        ("ok", ""),
        ("ok", "eth0\" ; flush ruleset"),
        ("ok", "a-very-long-device-name"),
    ] {
        let mut cfg = cfg();
        cfg.table = table.to_owned();
        cfg.device = device.to_owned();
        assert!(
            matches!(cfg.validate(), Err(SteerError::Invalid(_))),
            "{table:?} {device:?}"
        );
    }
    let mut cfg2 = cfg();
    cfg2.frozen_timeout = Duration::from_micros(10);
    assert!(matches!(cfg2.validate(), Err(SteerError::Invalid(_))));
    let mut cfg3 = cfg();
    cfg3.command.clear();
    assert!(matches!(cfg3.validate(), Err(SteerError::Invalid(_))));
}

#[test]
fn setup_recreates_the_table_in_one_line() {
    let line = cfg().setup_line();
    assert!(!line.contains('\n'));
    assert!(line.starts_with(
        "add table netdev shardproxy_7000 ; delete table netdev shardproxy_7000 ; add table"
    ));
    assert!(line.contains("timeout 5000ms"));
    assert!(line.contains("timeout 3600000ms"));
    assert!(line.contains("ip daddr 192.0.2.10 tcp dport 7000 ip saddr . tcp sport @frozen drop"));
    assert!(line.contains(
        "ip daddr 192.0.2.10 tcp dport 7000 fwd ip to ip saddr . tcp sport map @flows device \"eth0\""
    ));
    // The frozen drop rule stands before the fwd rule.
    assert!(line.find("@frozen drop") < line.find("fwd ip to"));
}

#[test]
fn plans_expire_rather_than_delete_and_follow_the_batch() {
    let nft = Nft::new(cfg());
    let mut overlay = Overlay::new();
    let mut cmds = Vec::new();
    let a = c("10.0.0.1:4000");
    nft.plan(Op::Remove(a), &mut overlay, &mut cmds).unwrap();
    assert!(cmds.is_empty(), "nothing to remove: {cmds:?}");
    assert!(matches!(
        nft.plan(Op::Refresh(a), &mut overlay, &mut cmds),
        Err(SteerError::NotSteered(_))
    ));
    nft.plan(Op::Freeze(a), &mut overlay, &mut cmds).unwrap();
    nft.plan(
        Op::Steer(a, Ipv4Addr::new(10, 1, 0, 2)),
        &mut overlay,
        &mut cmds,
    )
    .unwrap();
    assert_eq!(
        cmds,
        [
            "add element netdev shardproxy_7000 frozen { 10.0.0.1 . 4000 timeout 5000ms expires 5000ms }",
            "add element netdev shardproxy_7000 flows { 10.0.0.1 . 4000 timeout 3600000ms expires 3600000ms : 10.1.0.2 }",
            "add element netdev shardproxy_7000 frozen { 10.0.0.1 . 4000 timeout 5000ms expires 1ms }",
        ]
    );
    cmds.clear();
    // Later requests of the same batch see the steer; only a new value needs a delete.
    nft.plan(
        Op::Steer(a, Ipv4Addr::new(10, 1, 0, 3)),
        &mut overlay,
        &mut cmds,
    )
    .unwrap();
    assert_eq!(
        cmds[..3],
        [
            "add element netdev shardproxy_7000 flows { 10.0.0.1 . 4000 : 10.1.0.2 }",
            "delete element netdev shardproxy_7000 flows { 10.0.0.1 . 4000 : 10.1.0.2 }",
            "add element netdev shardproxy_7000 flows { 10.0.0.1 . 4000 timeout 3600000ms expires 3600000ms : 10.1.0.3 }",
        ]
    );
    cmds.clear();
    nft.plan(Op::Refresh(a), &mut overlay, &mut cmds).unwrap();
    assert_eq!(
        cmds,
        ["add element netdev shardproxy_7000 flows { 10.0.0.1 . 4000 timeout 3600000ms expires 3600000ms : 10.1.0.3 }"]
    );
    cmds.clear();
    // A removal expires the element at once: no delete.
    nft.plan(Op::Remove(a), &mut overlay, &mut cmds).unwrap();
    assert_eq!(
        cmds,
        ["add element netdev shardproxy_7000 flows { 10.0.0.1 . 4000 timeout 3600000ms expires 1ms : 10.1.0.3 }"]
    );
    assert!(!overlay[&a].live);
    cmds.clear();
    nft.plan(Op::Remove(a), &mut overlay, &mut cmds).unwrap();
    assert!(cmds.is_empty(), "removed twice: {cmds:?}");
    assert!(matches!(
        nft.plan(Op::Refresh(a), &mut overlay, &mut cmds),
        Err(SteerError::NotSteered(_))
    ));
    // The same flow steered again to the same host revives the expired element in place; to
    // another host, the lingering element is deleted first.
    nft.plan(
        Op::Steer(a, Ipv4Addr::new(10, 1, 0, 3)),
        &mut overlay,
        &mut cmds,
    )
    .unwrap();
    assert!(!cmds.iter().any(|c| c.starts_with("delete")), "{cmds:?}");
    cmds.clear();
    nft.plan(Op::Remove(a), &mut overlay, &mut cmds).unwrap();
    cmds.clear();
    nft.plan(
        Op::Steer(a, Ipv4Addr::new(10, 1, 0, 4)),
        &mut overlay,
        &mut cmds,
    )
    .unwrap();
    assert_eq!(
        cmds[1],
        "delete element netdev shardproxy_7000 flows { 10.0.0.1 . 4000 : 10.1.0.3 }"
    );
}

#[test]
fn output_is_classified() {
    assert!(classify(&[]).is_ok());
    assert!(classify(&["".to_owned(), "   ^".to_owned()]).is_ok());
    let out = [
        "Error: Could not process rule: No such file or directory".to_owned(),
        format!("delete element netdev t frozen {{ {} }}", "x".repeat(400)),
        "                      ^^^^^".to_owned(),
    ];
    match classify(&out) {
        Err(SteerError::Command { message }) => {
            assert!(message.starts_with("Error: Could not process rule: No such file"));
            assert!(message.len() < 300, "{message}");
        }
        other => panic!("{other:?}"),
    }
    let out = ["Error: Could not process rule: Operation not permitted".to_owned()];
    assert!(matches!(classify(&out), Err(SteerError::Permission { .. })));
}

#[tokio::test]
async fn a_missing_nft_says_install_nftables() {
    let mut cfg = cfg();
    cfg.command = vec!["/nonexistent/shardproxy-test/nft".to_owned()];
    let err = Steering::start_with(cfg).await.unwrap_err();
    assert!(matches!(err, SteerError::NftMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("install nftables"), "{err}");
}
