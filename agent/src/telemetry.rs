//! Logging setup: human-readable text by default, one JSON object per line with
//! `--log-format json`; the level comes from `RUST_LOG` (default `info`).

use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Changes the log level of a running agent (`/logging?level=debug` on the admin API).
#[derive(Clone)]
pub struct LevelHandle(tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>);

impl std::fmt::Debug for LevelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LevelHandle")
    }
}

impl LevelHandle {
    /// Replaces the filter with `directives` (`debug`, `meshlet=debug,info`, ...).
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives)
            .map_err(|err| format!("invalid log level {directives:?}: {err}"))?;
        self.0.reload(filter).map_err(|err| err.to_string())
    }
}

static LEVEL: std::sync::OnceLock<LevelHandle> = std::sync::OnceLock::new();

/// The handle of the installed subscriber, if [`init`] ran.
pub fn level_handle() -> Option<LevelHandle> {
    LEVEL.get().cloned()
}

/// The filter layer every subscriber of the agent starts from, and the handle that changes it
/// while the agent runs.
pub(crate) fn reloadable(
    filter: EnvFilter,
) -> (
    tracing_subscriber::reload::Layer<EnvFilter, tracing_subscriber::Registry>,
    LevelHandle,
) {
    let (layer, handle) = tracing_subscriber::reload::Layer::new(filter);
    (layer, LevelHandle(handle))
}

/// Installs the global subscriber. Logs go to stderr; stdout stays free for command output.
pub fn init(format: LogFormat) {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reloadable(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (tests calling in twice) keeps the first subscriber.
    let installed = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = LEVEL.set(handle);
    }
}
