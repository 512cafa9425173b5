//! The eBPF redirect and caller identity, on the real kernel: network namespaces for the node
//! and its pods, a kubelet-shaped cgroup tree, the real agent. Run one at a time, as root
//! (`cargo xtask test`); without root each test prints a loud SKIP.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    thread,
    time::Duration,
};

use kiam_e2e::node::{AGENT_IP, AGENT_PORT, HELPER, IMDS, LOAD_TEST_ARGS, Node, Pod, privileged};

// The agent's identity path: what kiam resolved for the caller. The fake real IMDS answers
// any path with `real-imds`.
const METADATA_URL6: &str = "http://[fd00:ec2::254]/kiam/v1/identity";
const METADATA_URL_MAPPED: &str = "http://[::ffff:169.254.169.254]/kiam/v1/identity";

const METADATA_URL: &str = "http://169.254.169.254/kiam/v1/identity";

/// Parses `200 {json}` from the helper; panics with the line otherwise.
fn identity(line: &str) -> serde_json::Value {
    let body = line
        .strip_prefix("200 ")
        .unwrap_or_else(|| panic!("expected 200 with an identity, got {line:?}"));
    serde_json::from_str(body).unwrap_or_else(|e| panic!("bad JSON {body:?}: {e}"))
}

fn assert_is(pod: &Pod, line: &str) {
    let id = identity(line);
    assert_eq!(id["pod_uid"], pod.uid.as_str(), "{line}");
    assert_eq!(id["container_id"], pod.container_id.as_str(), "{line}");
}

#[test]
fn pod_connections_to_both_metadata_addresses_reach_the_agent_with_the_pods_identity() {
    if !privileged("redirect ipv4/ipv6") {
        return;
    }
    let mut node = Node::new();
    let pod = node.add_pod();
    node.start_agent();

    assert_is(&pod, &node.get(&pod, METADATA_URL));
    // IPv6 metadata address, and IPv4-mapped on an AF_INET6 socket (runs only connect6).
    assert_is(&pod, &node.get(&pod, METADATA_URL6));
    assert_is(&pod, &node.get(&pod, METADATA_URL_MAPPED));
    let id = identity(&node.get(&pod, METADATA_URL));
    assert_eq!(id["qos"], "burstable");
    assert_eq!(id["runtime"], "containerd");
    assert_eq!(
        node.fake_imds_connections(),
        0,
        "nothing reaches the real IMDS"
    );
}

#[test]
fn host_network_pod_is_redirected_and_identified() {
    if !privileged("host network pod") {
        return;
    }
    let mut node = Node::new();
    let pod = node.add_host_network_pod();
    node.start_agent();
    assert_is(&pod, &node.get(&pod, METADATA_URL));
    assert_eq!(node.fake_imds_connections(), 0);
}

#[test]
fn outside_the_attach_point_and_the_agent_itself_reach_the_real_metadata_service() {
    if !privileged("not redirected outside kubepods, agent exempt") {
        return;
    }
    let mut node = Node::new();
    let pod = node.add_pod();
    node.start_agent();

    // A system service in the pod's network namespace but outside the pods cgroup.
    let outside = node.outside_cgroup();
    let line = node.run_in(
        &outside,
        &pod.netns,
        &[HELPER.as_str(), "get", METADATA_URL],
    );
    assert_eq!(line.trim(), "200 real-imds");
    assert_eq!(node.fake_imds_connections(), 1);
    // The fake real IMDS answers on IPv6 too, so the pods' zero counts elsewhere mean
    // something.
    let line = node.run_in(
        &outside,
        &pod.netns,
        &[HELPER.as_str(), "get", METADATA_URL6],
    );
    assert_eq!(line.trim(), "200 real-imds");
    let line = node.run_in(
        &outside,
        &pod.netns,
        &[HELPER.as_str(), "get", METADATA_URL_MAPPED],
    );
    assert_eq!(line.trim(), "200 real-imds");
    assert_eq!(node.fake_imds_connections(), 3);

    // The agent's own cgroup is exempt although it sits below the attach point.
    let agent = node.agent_pod.clone();
    let line = node.run_in(
        &agent.cgroup,
        &agent.netns,
        &[HELPER.as_str(), "get", METADATA_URL],
    );
    assert_eq!(line.trim(), "200 real-imds");
    assert_eq!(node.fake_imds_connections(), 4);

    // ... while a pod is still redirected.
    assert_is(&pod, &node.get(&pod, METADATA_URL));
    assert_is(&pod, &node.get(&pod, METADATA_URL6));
    assert_eq!(node.fake_imds_connections(), 4);
}

#[test]
fn hundreds_of_concurrent_connections_from_two_pods_are_never_confused() {
    if !privileged("concurrent pods") {
        return;
    }
    let mut node = Node::new();
    let a = node.add_pod();
    let b = node.add_pod();
    // Identity under concurrency, not the per-pod connection rate (which 300 connections
    // as fast as the machine allows can exceed): that has its own test in `attacks`.
    node.agent_args = LOAD_TEST_ARGS.map(str::to_owned).to_vec();
    node.start_agent();
    let run = |pod: &Pod| {
        node.spawn_in(
            &pod.cgroup,
            &pod.netns,
            &[
                HELPER.as_str(),
                "get",
                METADATA_URL,
                "--count",
                "300",
                "--concurrency",
                "16",
            ],
        )
    };
    let (ca, cb) = (run(&a), run(&b));
    for (pod, child) in [(&a, ca), (&b, cb)] {
        let out = child.wait_with_output().expect("client");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut by_uid: HashMap<String, usize> = HashMap::new();
        for line in text.lines() {
            let id = identity(line);
            *by_uid
                .entry(id["pod_uid"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
        assert_eq!(by_uid.get(&pod.uid), Some(&300), "{by_uid:?}");
        assert_eq!(by_uid.len(), 1, "answers for other pods: {by_uid:?}");
    }
    assert_eq!(node.fake_imds_connections(), 0);
}

#[test]
fn a_client_that_sends_and_closes_before_accept_is_still_identified() {
    if !privileged("close before accept") {
        return;
    }
    let mut node = Node::new();
    let a = node.add_pod();
    let b = node.add_pod();
    node.start_agent();
    node.signal_agent("STOP");

    // A sends, half-closes and waits; B sends, closes and exits, all before accept().
    let waiting = node.spawn_in(
        &a.cgroup,
        &a.netns,
        &[
            HELPER.as_str(),
            "get",
            METADATA_URL,
            "--half-close",
            "--timeout-ms",
            "20000",
        ],
    );
    let gone = node.spawn_in(
        &b.cgroup,
        &b.netns,
        &[HELPER.as_str(), "send-and-close", METADATA_URL],
    );
    let out = gone.wait_with_output().expect("send-and-close");
    assert!(out.status.success());
    let gone_pid: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid line");
    thread::sleep(Duration::from_millis(300));
    node.signal_agent("CONT");

    let out = waiting.wait_with_output().expect("client");
    assert_is(&a, String::from_utf8_lossy(&out.stdout).trim());
    let mut found = false;
    for _ in 0..50 {
        found = node.agent_records().iter().any(|r| {
            r["fields"]["message"] == "caller identified"
                && r["fields"]["pod_uid"] == b.uid.as_str()
                && r["fields"]["pid"] == gone_pid
        });
        if found {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        found,
        "B (pid {gone_pid}) not identified:\n{}",
        node.agent_log()
    );
}

#[test]
fn raw_socket_packets_to_the_metadata_address_never_leave_a_pod() {
    if !privileged("raw socket guard") {
        return;
    }
    let mut node = Node::new();
    let pod = node.add_pod();
    node.start_agent();
    let outside = node.outside_cgroup();
    let node_ns = node.netns.clone();
    let sniffer_cgroup = node.outside_cgroup();

    let count_syns = |cgroup: &std::path::Path, seq: &str| -> String {
        let mut sniffer = node.spawn_in(
            &sniffer_cgroup,
            &node_ns,
            &[
                HELPER.as_str(),
                "sniff",
                "--dst",
                IMDS,
                "--seq",
                seq,
                "--duration-ms",
                "1500",
            ],
        );
        let mut lines = BufReader::new(sniffer.stdout.take().expect("stdout")).lines();
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
        node.run_in(
            cgroup,
            &pod.netns,
            &[
                HELPER.as_str(),
                "raw-syn",
                "--src",
                &pod.ip.to_string(),
                "--dst",
                IMDS,
                "--seq",
                seq,
            ],
        );
        let count = lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = sniffer.wait();
        count
    };
    // Control: the same SYN from outside the pods cgroup does arrive, so the sniffer works.
    assert_eq!(count_syns(&outside, "424242"), "1");
    assert_eq!(count_syns(&pod.cgroup, "434343"), "0");
}

#[test]
fn a_direct_connection_to_the_agent_is_refused_not_guessed() {
    if !privileged("direct connection") {
        return;
    }
    let mut node = Node::new();
    let pod = node.add_pod();
    node.start_agent();
    let line = node.get(
        &pod,
        &format!("http://{AGENT_IP}:{AGENT_PORT}/latest/meta-data/"),
    );
    assert!(line.starts_with("403 "), "{line}");
    assert!(line.contains("did not come through"), "{line}");
    // The same pod through the redirect is fine.
    assert_is(&pod, &node.get(&pod, METADATA_URL));
}

/// Each of kiam's programs attached once, and nothing else of kiam's.
fn one_of_each() -> HashMap<String, usize> {
    kiam_common::program_names::ALL
        .iter()
        .map(|p| ((*p).to_owned(), 1))
        .collect()
}

#[test]
fn a_killed_agent_fails_closed_and_a_restarted_one_readopts_its_pins() {
    if !privileged("fail closed, re-adopt") {
        return;
    }
    let mut node = Node::new();
    let pod = node.add_pod();
    node.start_agent();
    assert_is(&pod, &node.get(&pod, METADATA_URL));

    node.kill_agent();
    for url in [METADATA_URL, METADATA_URL6, METADATA_URL_MAPPED] {
        let line = node.get(&pod, url);
        assert!(line.starts_with("ERROR"), "agent dead, got {line:?}");
    }
    assert_eq!(
        node.fake_imds_connections(),
        0,
        "fail closed: nothing reaches the real IMDS"
    );
    assert_eq!(
        node.attachments(),
        one_of_each(),
        "pins keep the programs attached"
    );

    node.start_agent();
    let readopted = node
        .agent_records()
        .iter()
        .filter(|r| {
            r["fields"]["message"] == "program ready" && r["fields"]["action"] == "Readopted"
        })
        .count();
    assert_eq!(
        readopted,
        kiam_common::program_names::ALL.len(),
        "{}",
        node.agent_log()
    );
    assert_eq!(node.attachments(), one_of_each(), "after the restart");
    assert_is(&pod, &node.get(&pod, METADATA_URL));
}

#[test]
fn status_reports_the_pins_and_uninstall_removes_them() {
    if !privileged("status and uninstall") {
        return;
    }
    let mut node = Node::new();
    let pod = node.add_pod();
    node.start_agent();
    assert_is(&pod, &node.get(&pod, METADATA_URL));

    let out = node.agent_command(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        status["links"].as_array().map(Vec::len),
        Some(kiam_common::program_names::ALL.len()),
        "{status}"
    );
    assert_eq!(status["config"]["ready"], true);
    assert_eq!(status["config"]["agent_addr4"], AGENT_IP.to_string());
    let counters: HashMap<String, u64> =
        serde_json::from_value(status["counters"].clone()).unwrap_or_default();
    assert!(
        counters.get("redirected_ipv4").copied().unwrap_or(0) >= 1,
        "{status}"
    );
    assert!(
        counters.get("bound_to_agent_socket").copied().unwrap_or(0) >= 1,
        "{status}"
    );

    node.kill_agent();
    let out = node.agent_command(&["uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!node.pin_dir.exists());
    assert!(node.attachments().is_empty(), "uninstall detaches");
    // Without the programs the pod reaches the fake real IMDS again: the redirect was what
    // kept it away.
    assert_eq!(node.get(&pod, METADATA_URL), "200 real-imds");
    assert_eq!(node.get(&pod, METADATA_URL6), "200 real-imds");
}

#[test]
fn only_the_agent_may_bind_its_port_even_while_it_is_down() {
    if !privileged("bind guard") {
        return;
    }
    let mut node = Node::new();
    let pod = node.add_host_network_pod();
    let own_netns = node.add_pod();
    node.start_agent();
    node.kill_agent();
    let ns = node.netns.clone();
    let port = AGENT_PORT;
    // A host-network pod would otherwise receive every pod's metadata connections.
    for addr in [
        format!("0.0.0.0:{port}"),
        format!("198.19.0.1:{port}"),
        format!("[::]:{port}"),
    ] {
        let line = node.run_in(&pod.cgroup, &ns, &[HELPER.as_str(), "bind", &addr]);
        assert!(line.starts_with("denied"), "{addr}: {line}");
    }
    // A pod keeps the port in its own network namespace (OPA's 8181 was refused everywhere
    // when the guard ignored namespaces).
    for addr in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        let line = node.run_in(
            &own_netns.cgroup,
            &own_netns.netns,
            &[HELPER.as_str(), "bind", &addr],
        );
        assert_eq!(line.trim(), "bound", "{addr} in the pod's own namespace");
    }
    // Other ports are untouched, and the port itself is free: a system service may bind it.
    let line = node.run_in(&pod.cgroup, &ns, &[HELPER.as_str(), "bind", "0.0.0.0:8182"]);
    assert_eq!(line.trim(), "bound");
    let outside = node.outside_cgroup();
    let any = format!("0.0.0.0:{port}");
    let line = node.run_in(&outside, &ns, &[HELPER.as_str(), "bind", &any]);
    assert_eq!(line.trim(), "bound");
    // The restarted agent is exempt before it binds.
    node.start_agent();
    let client = node.add_pod();
    assert_is(&client, &node.get(&client, METADATA_URL));
}
