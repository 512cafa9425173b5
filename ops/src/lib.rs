//! What kiam-agent and kiam-server share to be operable: logging set-up ([`logging`]:
//! `--log-format`, `--log-level`), the admin listener and the probe socket ([`admin`]),
//! listeners one client cannot exhaust ([`listen`]), waiting for a stop signal, and the wall
//! clock in Unix seconds.

pub mod admin;
pub mod listen;
pub mod logging;

pub use admin::{
    Admin, AdminLimits, DEFAULT_AGENT_ADMIN_LISTEN, DEFAULT_PROBE_SOCKET,
    DEFAULT_SERVER_ADMIN_LISTEN, ProbeArgs, admin_get, bind_probe, probe, serve_admin,
    serve_probes,
};
pub use logging::{LogArgs, LogError, LogFormat, init_logging};

/// Completes on SIGTERM or SIGINT (never, if the handlers cannot be installed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `t` in whole seconds since the Unix epoch (0 for a time before it).
pub fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Now, in whole seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    unix_seconds(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn unix_seconds_truncate_and_floor_at_the_epoch() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_999);
        assert_eq!(super::unix_seconds(t), 1_700_000_000);
        assert_eq!(super::unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert!(super::unix_now() > 1_700_000_000);
    }
}
