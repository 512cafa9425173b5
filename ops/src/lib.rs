//! What kiam-agent and kiam-server share to be operable: logging set-up ([`logging`]:
//! `--log-format`, `--log-level`), the admin listener and the probe socket ([`admin`]),
//! listeners one client cannot exhaust ([`listen`]) and waiting for a stop signal.

pub mod admin;
pub mod listen;
pub mod logging;

pub use admin::{
    Admin, AdminLimits, DEFAULT_PROBE_SOCKET, ProbeArgs, admin_get, bind_probe, probe, serve_admin,
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
