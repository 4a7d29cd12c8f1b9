//! The eBPF programs' rare events (aya-log), forwarded to the agent's log.
//!
//! The programs write a record to the pinned `AYA_LOGS` ring buffer only when something goes
//! wrong: a map insert failed, a socket had an unexpected family, an inbound connection found
//! no listener in its pod. The agent reads the ring as it fills and logs each record through
//! `tracing` under the target `meshlet::ebpf`, at the record's level, so `RUST_LOG` and the
//! admin API's `/logging` decide what is shown.
//!
//! A burst from one place in the programs (a pod whose proxy is down refusing every SYN, a port
//! scan at it) is logged once a second, with how many records were folded into it; the count
//! of a burst that stops is logged on its own a second later. Bursts are told apart by where in
//! the programs they come from, never by what they carry (addresses, ports), so a flood costs
//! one line a second and a few bytes of state.

use std::{
    collections::{HashMap, VecDeque},
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::Ebpf;
use aya_log::EbpfLogger;

/// How often the ring is read.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// How often one place in the programs is logged at most.
const REPEAT_EVERY: Duration = Duration::from_secs(1);
/// How many recent records [`EbpfLog::recent`] keeps.
const RECENT: usize = 64;

/// The reader of the programs' log ring.
pub struct EbpfLog {
    /// `None` once reading failed (a record it could not parse): the ring is left alone.
    logger: Option<EbpfLogger<Forward>>,
    state: Arc<State>,
}

impl std::fmt::Debug for EbpfLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfLog").finish_non_exhaustive()
    }
}

impl EbpfLog {
    /// Takes the `AYA_LOGS` ring of a loaded object. Keep the value as long as the object's
    /// programs may be loaded: dropping it closes the map.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, aya_log::Error> {
        let state = Arc::new(State::default());
        let forward = Forward {
            state: state.clone(),
        };
        Ok(Self {
            logger: Some(EbpfLogger::init_with_logger(ebpf, forward)?),
            state,
        })
    }

    /// Logs every record waiting in the ring, and the counts of bursts that ended.
    pub fn flush(&mut self) {
        if let Some(logger) = &mut self.logger {
            // aya-log panics on a record it cannot parse (an object built with another
            // aya-log-ebpf, say): stop reading rather than lose the task or spin on it.
            if std::panic::catch_unwind(AssertUnwindSafe(|| logger.flush())).is_err() {
                tracing::error!(
                    "the eBPF log ring holds a record this agent cannot read; the programs' \
                     events are not logged until the agent restarts"
                );
                self.logger = None;
            }
        }
        self.state.report_ended_bursts(Instant::now());
    }

    /// The latest records read (at most 64), oldest first, as logged.
    pub fn recent(&self) -> Vec<String> {
        lock(&self.state.recent).iter().cloned().collect()
    }

    /// Logs the records of `log` as they arrive (looking every 250 ms: reading an empty ring is
    /// two loads from shared memory), until the task is dropped.
    pub async fn run(log: Arc<Mutex<Self>>) {
        let mut ticks = tokio::time::interval(POLL_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            lock(&log).flush();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where in the programs a record comes from.
type Site = (String, u32);

/// The records of one place since it was last logged.
#[derive(Debug)]
struct Burst {
    logged: Instant,
    folded: u64,
    level: log::Level,
    last: String,
}

/// What the forwarder keeps between records.
#[derive(Debug, Default)]
struct State {
    recent: Mutex<VecDeque<String>>,
    bursts: Mutex<HashMap<Site, Burst>>,
}

impl State {
    /// Logs the folded count of every burst that has been quiet for a second, and forgets it.
    fn report_ended_bursts(&self, now: Instant) {
        let mut bursts = lock(&self.bursts);
        bursts.retain(|_, burst| {
            if now.duration_since(burst.logged) < REPEAT_EVERY {
                return true;
            }
            if burst.folded > 0 {
                emit(
                    burst.level,
                    burst.folded,
                    &format!("{} more like: {}", burst.folded, burst.last),
                );
            }
            false
        });
    }
}

/// Forwards aya-log's records to `tracing`.
struct Forward {
    state: Arc<State>,
}

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        {
            let mut recent = lock(&self.state.recent);
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(message.clone());
        }
        let site = (
            record.file().unwrap_or_default().to_owned(),
            record.line().unwrap_or_default(),
        );
        let now = Instant::now();
        let folded = {
            let mut bursts = lock(&self.state.bursts);
            match bursts.get_mut(&site) {
                Some(burst) if now.duration_since(burst.logged) < REPEAT_EVERY => {
                    burst.folded += 1;
                    burst.last = message;
                    return;
                }
                Some(burst) => {
                    burst.logged = now;
                    std::mem::take(&mut burst.folded)
                }
                None => {
                    bursts.insert(
                        site,
                        Burst {
                            logged: now,
                            folded: 0,
                            level: record.level(),
                            last: message.clone(),
                        },
                    );
                    0
                }
            }
        };
        emit(record.level(), folded, &message);
    }

    fn flush(&self) {}
}

/// One `meshlet::ebpf` event at `level` (tracing's levels are static: one call each).
fn emit(level: log::Level, folded: u64, message: &str) {
    match level {
        log::Level::Error => tracing::error!(target: "meshlet::ebpf", folded, "{message}"),
        log::Level::Warn => tracing::warn!(target: "meshlet::ebpf", folded, "{message}"),
        log::Level::Info => tracing::info!(target: "meshlet::ebpf", folded, "{message}"),
        log::Level::Debug => tracing::debug!(target: "meshlet::ebpf", folded, "{message}"),
        log::Level::Trace => tracing::trace!(target: "meshlet::ebpf", folded, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use log::Log as _;

    use super::*;

    fn record(forward: &Forward, line: u32, message: &str) {
        forward.log(
            &log::Record::builder()
                .level(log::Level::Warn)
                .file(Some("main.rs"))
                .line(Some(line))
                .args(format_args!("{message}"))
                .build(),
        );
    }

    /// What a subscriber wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Written {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_are_logged_under_meshlet_ebpf_at_the_level_the_running_agent_is_set_to() {
        use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _};
        let (filter, level) = crate::telemetry::reloadable(EnvFilter::new("info"));
        let written = Written::default();
        let writer = written.clone();
        let subscriber = tracing_subscriber::registry().with(filter).with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        );
        let forward = Forward {
            state: Arc::new(State::default()),
        };
        tracing::subscriber::with_default(subscriber, || {
            record(&forward, 10, "shown at info");
            // What `/logging?level=info,meshlet::ebpf=error` does.
            level.set("info,meshlet::ebpf=error").unwrap();
            record(&forward, 20, "hidden at error");
            level.set("info").unwrap();
            record(&forward, 30, "shown again");
        });
        let written = String::from_utf8(lock(&written.0).clone()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 2, "{written}");
        assert!(
            lines[0].contains("WARN meshlet::ebpf: shown at info folded=0"),
            "{written}"
        );
        assert!(
            lines[1].contains("WARN meshlet::ebpf: shown again folded=0"),
            "{written}"
        );
    }

    #[test]
    fn a_burst_from_one_place_is_one_entry_whatever_it_carries_and_ends_reported() {
        let state = Arc::new(State::default());
        let forward = Forward {
            state: state.clone(),
        };
        // A scan across 10,000 ports of a pod without a listener: one place in the programs.
        for port in 0..10_000 {
            record(
                &forward,
                470,
                &format!("no listener for [::ffff:10.0.0.1]:{port}"),
            );
        }
        record(&forward, 300, "ORIG_BY_PEER: insert failed");
        {
            let bursts = lock(&state.bursts);
            assert_eq!(bursts.len(), 2, "state by place, not by message");
            assert_eq!(bursts[&("main.rs".to_owned(), 470)].folded, 9_999);
        }
        assert_eq!(lock(&state.recent).len(), RECENT);
        state.report_ended_bursts(Instant::now());
        assert_eq!(lock(&state.bursts).len(), 2, "still within the second");
        state.report_ended_bursts(Instant::now() + REPEAT_EVERY);
        assert!(
            lock(&state.bursts).is_empty(),
            "ended bursts reported and forgotten"
        );
    }
}
