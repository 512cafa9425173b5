//! Logging, as both binaries set it up: `--log-format text|json` and `--log-level` (an
//! EnvFilter), declared once here; the `log` crate (aya logs through it) is bridged.

use std::io::IsTerminal as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The logging flags of every kiam command.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log output format.
    #[arg(
        long,
        env = "KIAM_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info,kiam_agent=debug`).
    #[arg(long, env = "KIAM_LOG", default_value = "info", global = true)]
    pub log_level: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log-level {0:?} is not a valid filter")]
    Filter(String),
    #[error("cannot set up logging: {0}")]
    Init(String),
}

/// Sets up `tracing` with an EnvFilter; `try_init` also bridges the `log` crate (aya logs
/// through it). Colours only on a terminal.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), LogError> {
    let env = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|_| LogError::Filter(filter.to_owned()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_ansi(std::io::stdout().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| LogError::Init(e.to_string()))
}
