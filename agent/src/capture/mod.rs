//! Capture: loading meshlet's eBPF programs, attaching them to the cgroup root, and keeping
//! them attached across agent restarts.
//!
//! The programs and their maps are pinned under a bpffs directory (`--bpffs-dir`):
//!
//! ```text
//! <bpffs-dir>/maps/<MAP>                          maps, shared by every program generation
//! <bpffs-dir>/links/cgroup-<id>/<program>         one link per program and cgroup root
//! ```
//!
//! A link stays attached as long as its pin exists, so an agent that stops leaves capture in
//! place. On start, [`Capture::install`] reconciles what is pinned with what it wants: links for
//! the configured cgroup root are adopted (no second attachment), links for any other cgroup
//! and for programs it no longer ships are unpinned, missing ones are attached and pinned.
//! [`uninstall`] removes the whole directory, which detaches everything.

pub mod mounts;

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapError, PerCpuHashMap},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use meshlet_common::{maps, programs};
use tracing::{debug, info};

/// The programs attached to the cgroup root, by name.
const CGROUP_PROGRAMS: &[&str] = &[programs::CONNECT4];

/// The eBPF object built from `ebpf/` by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshlet.bpf.o"));

/// The size in bytes of the embedded eBPF object.
pub fn object_size() -> usize {
    EBPF_OBJECT.len()
}

/// Errors from loading, attaching and reading the capture programs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); meshlet needs the \
         unified cgroup hierarchy: mount it (`mount -t cgroup2 none /sys/fs/cgroup`) or pass \
         --cgroup-root"
    )]
    NoCgroup2,
    /// The configured cgroup root is not a directory of a cgroup2 filesystem.
    #[error("cgroup root {path} is not on a cgroup2 filesystem (it is on {fs_type})")]
    NotCgroup2 {
        /// The configured root.
        path: PathBuf,
        /// The filesystem it is really on.
        fs_type: String,
    },
    /// No bpffs is mounted.
    #[error(
        "no bpf filesystem is mounted; mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass \
         --bpffs-dir on a bpffs"
    )]
    NoBpffs,
    /// The pin directory is not on bpffs.
    #[error("{path} is not on a bpf filesystem (it is on {fs_type}); pins must live on bpffs")]
    NotBpffs {
        /// The configured directory.
        path: PathBuf,
        /// The filesystem it is really on.
        fs_type: String,
    },
    /// A file or directory could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The eBPF object could not be loaded (maps created, relocations applied).
    #[error("loading the eBPF object: {0} (are you root, with CAP_BPF and CAP_SYS_ADMIN?)")]
    Load(#[source] aya::EbpfError),
    /// The embedded object lacks a program or map the agent expects: a build mismatch.
    #[error("the embedded eBPF object has no {kind} named {name}: rebuild meshlet")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// The kernel refused a program; the verifier log says why.
    #[error("program {name}: {message}")]
    Program {
        /// The program's name.
        name: &'static str,
        /// The error, with the verifier log when the verifier rejected it.
        message: String,
    },
    /// A link could not be pinned, adopted or inspected.
    #[error("link {path}: {source}")]
    Link {
        /// The pin path.
        path: PathBuf,
        /// The underlying error.
        source: LinkError,
    },
    /// A link could not be pinned.
    #[error("pin {path}: {source}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// The underlying error.
        source: aya::pin::PinError,
    },
    /// A map could not be opened or read.
    #[error("map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// The underlying error.
        source: MapError,
    },
}

impl Error {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { what, path, source }
    }

    fn program(name: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |err| {
            let message = match err {
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                } => {
                    format!("the kernel rejected it: {io_error}\nverifier log:\n{verifier_log}")
                }
                ProgramError::SyscallError(syscall) => {
                    format!(
                        "{syscall}: {}{}",
                        syscall.io_error,
                        kernel_hint(&syscall.io_error)
                    )
                }
                other => other.to_string(),
            };
            Self::Program { name, message }
        }
    }
}

/// What to say when the kernel answers a feature we use with "not supported".
fn kernel_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524 /* ENOTSUPP */) => {
            " (this kernel lacks a feature meshlet needs: bpf links for cgroups need Linux >= 5.7; \
             see docs/operations.md for the kernel matrix)"
        }
        Some(libc::EPERM) => " (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN)",
        _ => "",
    }
}

/// Where capture attaches and pins.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    /// The cgroup v2 directory the programs attach to: every socket created by a process in
    /// this subtree is seen by them. On a node, the host's cgroup2 mount.
    pub cgroup_root: PathBuf,
    /// The bpffs directory that holds meshlet's pins.
    pub bpffs_dir: PathBuf,
}

impl Config {
    /// The configuration with every unset path discovered from the mounts of this process.
    pub fn resolve(
        cgroup_root: Option<PathBuf>,
        bpffs_dir: Option<PathBuf>,
    ) -> Result<Self, Error> {
        let mounts =
            mounts::mounts().map_err(Error::io("read", Path::new("/proc/self/mountinfo")))?;
        let cgroup_root = match cgroup_root {
            Some(root) => root,
            None => mounts::find(&mounts, "cgroup2").ok_or(Error::NoCgroup2)?,
        };
        let bpffs_dir = match bpffs_dir {
            Some(dir) => dir,
            None => mounts::find(&mounts, "bpf")
                .ok_or(Error::NoBpffs)?
                .join("meshlet"),
        };
        let check = |path: &Path, want: &str| -> Option<String> {
            match mounts::fs_type_of(&mounts, path) {
                Some(fs_type) if fs_type == want => None,
                other => Some(other.unwrap_or("no known filesystem").to_owned()),
            }
        };
        if let Some(fs_type) = check(&cgroup_root, "cgroup2") {
            return Err(Error::NotCgroup2 {
                path: cgroup_root,
                fs_type,
            });
        }
        if let Some(fs_type) = check(&bpffs_dir, "bpf") {
            return Err(Error::NotBpffs {
                path: bpffs_dir,
                fs_type,
            });
        }
        Ok(Self {
            cgroup_root,
            bpffs_dir,
        })
    }

    fn maps_dir(&self) -> PathBuf {
        self.bpffs_dir.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.bpffs_dir.join("links")
    }
}

/// How a program came to be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    /// Attached by this agent.
    Attached,
    /// Found pinned from an earlier agent and kept as it was.
    Adopted,
}

/// One attached program.
#[derive(Debug)]
pub struct AttachedProgram {
    /// The program's name.
    pub name: &'static str,
    /// How it came to be attached.
    pub attachment: Attachment,
    /// The kernel's id of the link.
    pub link_id: u32,
    /// The kernel's id of the program behind the link.
    pub program_id: u32,
    /// The pin that keeps it attached.
    pub pin: PathBuf,
    _link: FdLink,
}

/// The capture programs, loaded and attached to the cgroup root.
pub struct Capture {
    config: Config,
    programs: Vec<AttachedProgram>,
    connects: PerCpuHashMap<MapData, u64, u64>,
    // Owns the loaded programs and maps; kept for as long as capture is used.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("config", &self.config)
            .field("programs", &self.programs)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Loads the programs, then attaches each to the cgroup root unless an earlier agent's
    /// pinned link already does; pins what it attaches. Stale pins are removed.
    pub fn install(config: Config) -> Result<Self, Error> {
        let cgroup = fs::File::open(&config.cgroup_root)
            .map_err(Error::io("open cgroup", &config.cgroup_root))?;
        let cgroup_id = cgroup
            .metadata()
            .map_err(Error::io("stat cgroup", &config.cgroup_root))?
            .ino();
        let links_dir = config.links_dir().join(format!("cgroup-{cgroup_id}"));
        for dir in [config.maps_dir(), links_dir.clone()] {
            fs::create_dir_all(&dir).map_err(Error::io("create pin directory", &dir))?;
        }
        remove_stale_links(&config.links_dir(), &links_dir)?;

        let maps_dir = config.maps_dir();
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(maps::CONNECTS, maps_dir.join(maps::CONNECTS))
            .load(EBPF_OBJECT)
            .map_err(Error::Load)?;

        let mut attached = Vec::new();
        for &name in CGROUP_PROGRAMS {
            let pin = links_dir.join(name);
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(Error::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(Error::program(name))?;
            let (link, attachment): (FdLink, _) = if pin.exists() {
                let link = PinnedLink::from_pin(&pin).map_err(|source| Error::Link {
                    path: pin.clone(),
                    source,
                })?;
                (link.into(), Attachment::Adopted)
            } else {
                program.load().map_err(Error::program(name))?;
                let id = program
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(Error::program(name))?;
                let link = program.take_link(id).map_err(Error::program(name))?;
                // Only bpf links (kernel >= 5.7) can be pinned; older kernels fall back to
                // legacy attachments, which this refuses rather than leave unpinned.
                let link = FdLink::try_from(link).map_err(|source| Error::Link {
                    path: pin.clone(),
                    source,
                })?;
                let link = link.pin(&pin).map_err(|source| Error::Pin {
                    path: pin.clone(),
                    source,
                })?;
                (link.into(), Attachment::Attached)
            };
            let info = link.info().map_err(|source| Error::Link {
                path: pin.clone(),
                source,
            })?;
            info!(program = name, ?attachment, link_id = info.id(), cgroup = %config.cgroup_root.display(), "capture program attached");
            attached.push(AttachedProgram {
                name,
                attachment,
                link_id: info.id(),
                program_id: info.program_id(),
                pin,
                _link: link,
            });
        }

        let connects = ebpf.take_map(maps::CONNECTS).ok_or(Error::Missing {
            kind: "map",
            name: maps::CONNECTS,
        })?;
        let connects = PerCpuHashMap::try_from(connects).map_err(|source| Error::Map {
            name: maps::CONNECTS,
            source,
        })?;
        Ok(Self {
            config,
            programs: attached,
            connects,
            _ebpf: ebpf,
        })
    }

    /// Where capture is attached and pinned.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The attached programs.
    pub fn programs(&self) -> &[AttachedProgram] {
        &self.programs
    }

    /// TCP connects seen so far in each network namespace, keyed by netns cookie (summed over
    /// CPUs). Counts survive agent restarts: the map is pinned.
    pub fn connects(&self) -> Result<HashMap<u64, u64>, Error> {
        self.connects
            .iter()
            .map(|entry| {
                let (cookie, per_cpu) = entry.map_err(|source| Error::Map {
                    name: maps::CONNECTS,
                    source,
                })?;
                Ok((cookie, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// Unpins links for other cgroup roots and for programs this build does not ship.
fn remove_stale_links(links_root: &Path, current: &Path) -> Result<(), Error> {
    let entries = fs::read_dir(links_root).map_err(Error::io("list", links_root))?;
    for entry in entries {
        let entry = entry.map_err(Error::io("list", links_root))?;
        let path = entry.path();
        if path != current {
            info!(pin = %path.display(), "removing capture pinned for another cgroup root");
            fs::remove_dir_all(&path).map_err(Error::io("remove stale pins", &path))?;
            continue;
        }
        for link in fs::read_dir(&path).map_err(Error::io("list", &path))? {
            let link = link.map_err(Error::io("list", &path))?.path();
            let known = link
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| CGROUP_PROGRAMS.contains(&n));
            if !known {
                debug!(pin = %link.display(), "removing link of a program this build does not ship");
                fs::remove_file(&link).map_err(Error::io("unpin", &link))?;
            }
        }
    }
    Ok(())
}

/// What [`uninstall`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// Pinned links removed (each one detached a program).
    pub links: usize,
    /// Pinned maps removed.
    pub maps: usize,
}

/// Detaches and unpins everything under `bpffs_dir`, then removes the directory. Running it
/// when nothing is installed is not an error.
pub fn uninstall(bpffs_dir: &Path) -> Result<Uninstalled, Error> {
    let mut removed = Uninstalled::default();
    if !bpffs_dir.exists() {
        return Ok(removed);
    }
    let count = |dir: &Path| -> usize { walk(dir).map(|files| files.len()).unwrap_or(0) };
    removed.links = count(&bpffs_dir.join("links"));
    removed.maps = count(&bpffs_dir.join("maps"));
    fs::remove_dir_all(bpffs_dir).map_err(Error::io("remove", bpffs_dir))?;
    Ok(removed)
}

fn walk(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}
