//! What `/health` on the admin listener reports, and `kiam-server health` checks: the
//! Kubernetes watches are synced, and STS answers with the server's own credentials.
//!
//! STS is asked `GetCallerIdentity` once per `--sts-health-interval` (a minute) by each
//! server, whatever the number of pods, nodes or roles.

use std::{
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use clap::Args;

#[derive(Debug)]
pub struct StsHealth {
    every: Duration,
    last: Mutex<Option<(Instant, Result<String, String>)>>,
}

/// The body of `/health`.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub healthy: bool,
    pub watches_synced: bool,
    /// `None` until the first check.
    pub sts_reachable: Option<bool>,
    /// The caller ARN STS answered with, or why it did not.
    pub sts_detail: String,
    pub sts_checked_seconds_ago: Option<u64>,
}

impl StsHealth {
    /// Checks every `every`; a check older than three of them no longer counts.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
        }
    }

    fn stale_after(&self) -> Duration {
        self.every * 3
    }

    pub fn record(&self, result: Result<String, String>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), result));
    }

    pub fn report(&self, watches_synced: bool) -> Report {
        self.report_at(watches_synced, Instant::now())
    }

    fn report_at(&self, watches_synced: bool, now: Instant) -> Report {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (sts_reachable, sts_detail, ago) = match last {
            None => (None, "not checked yet".to_owned(), None),
            Some((at, result)) => {
                let ago = now.saturating_duration_since(at);
                let fresh = ago <= self.stale_after();
                let detail = match (&result, fresh) {
                    (_, false) => format!(
                        "no GetCallerIdentity answer for {}s (STS slow or unreachable)",
                        ago.as_secs()
                    ),
                    (Ok(arn), true) => format!("GetCallerIdentity: {arn}"),
                    (Err(error), true) => format!("GetCallerIdentity failed: {error}"),
                };
                (Some(fresh && result.is_ok()), detail, Some(ago.as_secs()))
            }
        };
        Report {
            healthy: watches_synced && sts_reachable == Some(true),
            watches_synced,
            sts_reachable,
            sts_detail,
            sts_checked_seconds_ago: ago,
        }
    }

    /// Asks STS who this server is, now and at every interval.
    pub async fn probe_forever(self: std::sync::Arc<Self>, sts: aws_sdk_sts::Client) {
        let mut tick = tokio::time::interval(self.every);
        loop {
            tick.tick().await;
            let answer =
                tokio::time::timeout(Duration::from_secs(20), sts.get_caller_identity().send())
                    .await;
            let result = match answer {
                Ok(Ok(me)) => Ok(me.arn.unwrap_or_default()),
                Ok(Err(e)) => Err(aws_sdk_sts::error::DisplayErrorContext(&e).to_string()),
                Err(_) => Err("no answer within 20s".to_owned()),
            };
            if let Err(error) = &result {
                tracing::warn!(%error, "STS health check failed");
            }
            self.record(result);
        }
    }
}

/// `kiam-server health`: asks the running server's admin listener. Exit code 0: healthy;
/// 1: unhealthy or not answering; 2: bad usage.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The running server's admin listener.
    #[arg(
        long,
        env = "KIAM_SERVER_ADMIN_LISTEN",
        default_value = kiam_ops::DEFAULT_SERVER_ADMIN_LISTEN
    )]
    pub admin_listen: SocketAddr,
    /// Print the JSON report instead of text.
    #[arg(long)]
    pub json: bool,
}

pub const HEALTHY: u8 = 0;
pub const UNHEALTHY: u8 = 1;

pub async fn check(cli: &HealthArgs) -> u8 {
    let (status, body) = match kiam_ops::admin_get(cli.admin_listen, "/health").await {
        Ok(answer) => answer,
        Err(error) => {
            println!(
                "FAIL  server: no answer at {} ({error}); --admin-listen names it",
                cli.admin_listen
            );
            return UNHEALTHY;
        }
    };
    let report: Report = match serde_json::from_str(&body) {
        Ok(report) => report,
        Err(_) => {
            println!(
                "FAIL  server: {} answered {status}: {}",
                cli.admin_listen,
                body.trim()
            );
            return UNHEALTHY;
        }
    };
    if cli.json {
        println!("{}", body.trim());
    } else {
        let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
        println!(
            "{}  watches: {}",
            mark(report.watches_synced),
            match report.watches_synced {
                true => "synced",
                false => "not synced, or failing (see the server's log)",
            }
        );
        println!(
            "{}  sts: {}",
            mark(report.sts_reachable == Some(true)),
            report.sts_detail
        );
    }
    match report.healthy && status == 200 {
        true => HEALTHY,
        false => UNHEALTHY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_needs_synced_watches_and_a_fresh_sts_answer() {
        let sts = StsHealth::new(Duration::from_secs(60));
        let report = sts.report(true);
        assert!(!report.healthy);
        assert_eq!(report.sts_reachable, None);
        sts.record(Ok("arn:aws:sts::123456789012:assumed-role/kiam/x".into()));
        assert!(sts.report(true).healthy);
        assert!(!sts.report(false).healthy);
        sts.record(Err("expired token".into()));
        let report = sts.report(true);
        assert!(!report.healthy);
        assert_eq!(report.sts_reachable, Some(false));
        assert!(report.sts_detail.contains("expired token"));
        // A stale success does not count.
        sts.record(Ok("arn".into()));
        let later = Instant::now() + Duration::from_secs(181);
        let report = sts.report_at(true, later);
        assert!(!report.healthy);
        assert!(
            report
                .sts_detail
                .contains("no GetCallerIdentity answer for 18"),
            "{report:?}"
        );
        assert!(
            sts.report_at(true, Instant::now() + Duration::from_secs(179))
                .healthy
        );
    }
}
