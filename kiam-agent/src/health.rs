//! `kiam-agent health`: a deep check for scripts and exec probes, like kiam's `kiam health`.
//!
//! It reads the same settings (flags or `KIAM_*` environment) as `run`, so inside the agent's
//! container it needs no arguments. Each check prints one line; the exit code is
//! [`HEALTHY`] when every check passed and [`UNHEALTHY`] when one failed (a usage error is 2,
//! as for every command).

use std::{path::Path, process::ExitCode};

use crate::{cgroup, client, config::HealthArgs, pins, status::admin_get};

pub const HEALTHY: u8 = 0;
pub const UNHEALTHY: u8 = 1;

/// One check's outcome, printed as it is made.
#[derive(Debug, Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("ok    {what}: {detail}");
    }
    fn warn(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("warn  {what}: {detail}");
    }
    fn fail(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("FAIL  {what}: {detail}");
        self.failed = true;
    }
}

pub fn run(args: &HealthArgs) -> anyhow::Result<ExitCode> {
    let mut report = Report::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // The running agent's own verdict.
    match runtime.block_on(admin_get(args.api.admin_listen, "/ready")) {
        Ok((200, _)) => report.ok("agent", format!("ready at {}", args.api.admin_listen)),
        Ok((status, body)) => report.fail(
            "agent",
            format!(
                "{} answered {status}: {}",
                args.api.admin_listen,
                body.trim()
            ),
        ),
        Err(error) => report.fail(
            "agent",
            format!(
                "no answer at {} ({error}); --admin-listen names it",
                args.api.admin_listen
            ),
        ),
    }

    programs(args, &mut report);

    // The settings `run` would refuse make the agent fail, whatever it answers now.
    match crate::config::api(&args.api) {
        Err(error) => report.fail("settings", error),
        Ok(settings) => match settings.servers {
            None => report.warn(
                "servers",
                "none configured (--server): pods' credential requests are refused",
            ),
            Some(options) => runtime.block_on(servers(options, args, &mut report)),
        },
    }

    Ok(ExitCode::from(match report.failed {
        false => HEALTHY,
        true => UNHEALTHY,
    }))
}

/// Every program pinned, configured, and attached to the configured cgroup.
fn programs(args: &HealthArgs, report: &mut Report) {
    let expected = cgroup::find_root(args.cgroup_root.as_deref()).and_then(|root| {
        let attach = cgroup::find_attach_cgroup(&root, args.attach_cgroup.as_deref())?;
        Ok((cgroup::cgroup_id(&attach)?, attach))
    });
    let (expected_id, attach) = match expected {
        Ok(found) => found,
        Err(error) => {
            report.fail(
                "programs",
                format!("cannot find the attach cgroup: {error}"),
            );
            return;
        }
    };
    let dir: &Path = &args.bpffs_dir;
    let status = match pins::status(dir) {
        Ok(status) => status,
        Err(error) => {
            report.fail(
                "programs",
                format!("cannot read {}: {error}", dir.display()),
            );
            return;
        }
    };
    match &status.config {
        Some(c) if c.ready && c.attach_cgroup_id == expected_id => report.ok(
            "configuration",
            format!("ready, for cgroup {}", attach.display()),
        ),
        Some(c) if c.ready => report.fail(
            "configuration",
            format!(
                "written for cgroup id {}, but {} is {expected_id}",
                c.attach_cgroup_id,
                attach.display()
            ),
        ),
        Some(_) => report.fail(
            "configuration",
            "not ready: the programs refuse metadata connections",
        ),
        None => report.fail(
            "configuration",
            format!("nothing pinned at {}", dir.display()),
        ),
    }
    match pins::link_cgroups(dir) {
        Ok(links) => {
            let wrong: Vec<String> = links
                .iter()
                .filter(|(_, cgroup)| *cgroup != Some(expected_id))
                .map(|(name, cgroup)| match cgroup {
                    None => format!("{name} not pinned"),
                    Some(0) => format!("{name} detached (its cgroup is gone)"),
                    Some(id) => format!("{name} attached to cgroup id {id}"),
                })
                .collect();
            match wrong.is_empty() {
                true => report.ok(
                    "programs",
                    format!(
                        "{} links attached at {} (cgroup id {expected_id})",
                        links.len(),
                        attach.display()
                    ),
                ),
                false => report.fail("programs", wrong.join("; ")),
            }
        }
        Err(error) => report.fail("programs", error),
    }
}

/// Each server's Health, over the agent's mutual TLS.
async fn servers(options: client::Options, args: &HealthArgs, report: &mut Report) {
    let names = options.servers.join(",");
    let servers = match client::Servers::new(options) {
        Ok(servers) => servers,
        Err(error) => {
            report.fail("servers", error);
            return;
        }
    };
    servers.resolve().await;
    let answers = servers.health_each(args.timeout).await;
    if answers.is_empty() {
        report.fail("servers", format!("{names} resolved to no address"));
        return;
    }
    let mut ready = 0;
    for (addr, answer) in &answers {
        let what = format!("server {addr}");
        match answer {
            Ok(true) => {
                ready += 1;
                report.ok(&what, "ready");
            }
            Ok(false) => report.warn(&what, "answers, not ready (its Kubernetes watches)"),
            Err(status) => report.warn(&what, format!("{:?}: {}", status.code(), status.message())),
        }
    }
    let total = answers.len();
    match (ready, args.require_all_servers) {
        (0, _) => report.fail("servers", format!("none of {total} ready")),
        (n, true) if n < total => report.fail(
            "servers",
            format!("{n} of {total} ready (--require-all-servers)"),
        ),
        (n, _) => report.ok("servers", format!("{n} of {total} ready")),
    }
}
