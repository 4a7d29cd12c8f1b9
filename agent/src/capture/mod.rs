//! Capture: meshlet's eBPF programs, loaded, attached and kept attached across agent restarts.
//!
//! At the cgroup root (`--cgroup-root`), six programs capture outbound traffic of enrolled
//! network namespaces: `connect4/6` redirect TCP connects to the in-pod listener on 15001,
//! `sock_ops` and `getsockopt` let the proxy read the original destination with
//! `SO_ORIGINAL_DST`, `getpeername4/6` show it to the application. Each enrolled namespace gets
//! an `sk_lookup` program that hands inbound connections to its 15006 listener.
//!
//! Kubelet's health probes must reach the application, not the proxy (a STRICT pod would refuse
//! them as plaintext). They are recognised precisely: `probe_ops`, a `sock_ops` program attached
//! to kubelet's cgroup only ([`Config::kubelet_cgroup`], found by [`kubelet`]), records each
//! connection kubelet opens by 4-tuple until it closes, and `sk_lookup` lets exactly those
//! through. Nothing is exempt for coming from a node address.
//!
//! Everything is pinned (see [`pins`]): an agent that stops leaves capture in place, and
//! [`Capture::install`] reconciles on start: links already pinned are adopted (no second
//! attachment), stale ones unpinned, missing ones attached. [`uninstall`] removes it all.
//!
//! Fail mode ([`FailMode`]): `closed` (default) redirects enrolled namespaces whatever the state
//! of their proxy, so a connection with no listener behind it is refused; `open` redirects a
//! namespace only once the agent marked it ready ([`Capture::set_ready`]) and lets inbound
//! traffic through to the application when no listener is registered.

pub mod events;
pub mod features;
pub mod kubelet;
pub mod migrate;
pub mod mounts;
pub mod pins;

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, Program, ProgramError, SkLookup,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use ipnet::IpNet;
use meshlet_common::{Direction, Enrollment, Ip, ProbeKey, SETTING_FAIL_OPEN, maps, programs};
pub use pins::{Uninstalled, uninstall};
use tracing::{debug, info, warn};

use crate::sys::Netns;

/// The programs attached to the cgroup root, by name.
const CGROUP_PROGRAMS: &[&str] = &[
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SOCK_OPS,
    programs::GETSOCKOPT,
];

/// The program attached to kubelet's cgroup.
const KUBELET_PROGRAMS: &[&str] = &[programs::PROBE_OPS];

/// Every program of the eBPF object: those of the cgroup root, kubelet's, and `sk_lookup`.
fn all_programs() -> Vec<&'static str> {
    let netns = [programs::SK_LOOKUP];
    [CGROUP_PROGRAMS, KUBELET_PROGRAMS, &netns].concat()
}

/// Maps earlier versions pinned that this one no longer has, emptied and unpinned on install.
/// `NODE_ADDRS` (`HashMap<Ip, u8>`) held the node's addresses, whose connections `sk_lookup`
/// used not to steer: emptying it stops programs of an older agent that are still attached from
/// exempting anyone.
const RETIRED_MAPS: &[&str] = &["NODE_ADDRS"];

/// The oldest kernel capture works on, and the feature that sets it.
pub const MIN_KERNEL: (u32, u32) = (5, 15);
/// What needs [`MIN_KERNEL`].
pub const MIN_KERNEL_REASON: &str = "bpf_get_netns_cookie in sock_ops programs";

/// Parses the major and minor version out of a kernel release (`6.18.44-fc-v657`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Refuses a kernel older than [`MIN_KERNEL`], then one that lacks a feature of
/// [`features::FEATURES`] (a kernel can be built without what its release has), naming each
/// missing feature.
fn check_kernel() -> Result<(), Error> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(Error::io("read", Path::new("/proc/sys/kernel/osrelease")))?;
    let release = release.trim();
    let version = kernel_version(release);
    if version.is_some_and(|version| version < MIN_KERNEL) {
        return Err(Error::KernelTooOld {
            found: release.to_owned(),
        });
    }
    let missing = features::missing(version);
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::KernelLacks {
        found: release.to_owned(),
        missing: features::describe(&missing),
    })
}

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
    /// Every cgroup2 mount visible shows a cgroup below the root of the hierarchy: the agent
    /// runs in a container with a cgroup namespace of its own, and programs attached there
    /// would see only its own container's sockets.
    #[error(
        "the cgroup2 filesystem at {} shows a cgroup, not the root of the hierarchy (it has a \
         cgroup.events file; the root cgroup has none): meshlet runs in a container with its own \
         cgroup namespace and would only capture its own container; mount the host's \
         /sys/fs/cgroup (a hostPath volume) or pass --cgroup-root",
        .mount_points.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    CgroupNotRoot {
        /// The cgroup2 mount points seen.
        mount_points: Vec<PathBuf>,
    },
    /// A configured cgroup (the root, or kubelet's) is not a directory of a cgroup2 filesystem.
    #[error("cgroup {path} is not on a cgroup2 filesystem (it is on {fs_type})")]
    NotCgroup2 {
        /// The configured cgroup.
        path: PathBuf,
        /// The filesystem it is really on.
        fs_type: String,
    },
    /// The kernel is older than meshlet supports.
    #[error(
        "kernel {found} is too old: meshlet needs Linux >= {}.{} ({}); see docs/operations.md",
        MIN_KERNEL.0, MIN_KERNEL.1, MIN_KERNEL_REASON
    )]
    KernelTooOld {
        /// The running kernel's release.
        found: String,
    },
    /// The kernel lacks features capture needs, though its release should have them.
    #[error("kernel {found} lacks what meshlet needs (docs/operations.md, Kernels):\n{missing}")]
    KernelLacks {
        /// The running kernel's release.
        found: String,
        /// The missing features, one per line.
        missing: String,
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
    /// The programs' log ring could not be opened.
    #[error("opening the eBPF log ring (AYA_LOGS): {0}")]
    Log(#[source] aya_log::Error),
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
    /// The kubelet cgroup would exempt every process of the cgroup root, or of the machine.
    #[error(
        "kubelet cgroup {} is the cgroup root or one of its ancestors ({}): every process there \
         would be exempt from inbound capture; pass kubelet's own cgroup (such as \
         <cgroup2 mount>/system.slice/kubelet.service) to --kubelet-cgroup",
        path.display(), cgroup_root.display()
    )]
    KubeletCgroupTooBroad {
        /// The configured kubelet cgroup.
        path: PathBuf,
        /// The cgroup root capture attaches to.
        cgroup_root: PathBuf,
    },
    /// The eBPF object could not be parsed.
    #[error("the eBPF object: {0}")]
    Object(String),
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

/// What happens to captured traffic of a namespace whose proxy is not there.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Captured connections with no proxy listener behind them are refused.
    #[default]
    Closed,
    /// A namespace is captured only while its proxy is ready; otherwise traffic goes direct.
    Open,
}

/// Where and how capture attaches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    /// The cgroup v2 directory the cgroup programs attach to: every socket created by a process
    /// in this subtree is seen by them. On a node, the host's cgroup2 mount.
    pub cgroup_root: PathBuf,
    /// The bpffs directory that holds meshlet's pins.
    pub bpffs_dir: PathBuf,
    /// See [`FailMode`].
    pub fail_mode: FailMode,
    /// Destinations never redirected.
    pub excluded_cidrs: Vec<IpNet>,
    /// Ports never redirected, outbound (destination port) or inbound (local port).
    pub excluded_ports: Vec<u16>,
    /// Kubelet's cgroup: connections its processes open to pods (health probes) reach the
    /// application unsteered. `None`: no exemption, probes go through capture and policy like
    /// any other client's connection. It must not be the cgroup root or an ancestor of it.
    pub kubelet_cgroup: Option<PathBuf>,
    /// Load this eBPF object instead of the embedded one (tests of program upgrades: a build
    /// whose programs differ). `None`: the object built into the agent.
    pub object: Option<PathBuf>,
    /// Applications see their clients' addresses: the proxy connects to them with transparent
    /// sockets, and each enrolled namespace is prepared for it ([`crate::sys::transparent`]).
    /// `false`: they see their pod's own address.
    pub preserve_source: bool,
}

impl Config {
    /// The configuration with every unset path discovered from the mounts of this process,
    /// fail mode `closed`, no exclusions, and clients' addresses preserved.
    pub fn resolve(
        cgroup_root: Option<PathBuf>,
        bpffs_dir: Option<PathBuf>,
    ) -> Result<Self, Error> {
        let mounts =
            mounts::mounts().map_err(Error::io("read", Path::new("/proc/self/mountinfo")))?;
        Ok(Self {
            cgroup_root: resolve_cgroup_root(&mounts, cgroup_root)?,
            bpffs_dir: resolve_bpffs_dir(&mounts, bpffs_dir)?,
            fail_mode: FailMode::default(),
            excluded_cidrs: Vec::new(),
            excluded_ports: Vec::new(),
            kubelet_cgroup: None,
            object: None,
            preserve_source: true,
        })
    }
}

/// The cgroup capture attaches to: `given` (`--cgroup-root`, any cgroup2 directory: tests
/// use a cgroup of their own), or the cgroup2 mount of `mounts` that shows the root of the
/// hierarchy (see [`mounts::find_cgroup2`]). A mount that shows only a container's own cgroup
/// is refused rather than taken: capture there would miss every other pod.
pub fn resolve_cgroup_root(
    mounts: &[mounts::Mount],
    given: Option<PathBuf>,
) -> Result<PathBuf, Error> {
    let root = match given {
        Some(root) => root,
        None => match mounts::find_cgroup2(mounts) {
            mounts::Cgroup2::Root(root) => root,
            mounts::Cgroup2::Nested(mount_points) => {
                return Err(Error::CgroupNotRoot { mount_points });
            }
            mounts::Cgroup2::Missing => return Err(Error::NoCgroup2),
        },
    };
    match mounts::fs_type_of(mounts, &root) {
        Some("cgroup2") => Ok(root),
        other => Err(Error::NotCgroup2 {
            path: root,
            fs_type: other.unwrap_or("no known filesystem").to_owned(),
        }),
    }
}

/// The directory of meshlet's pins: `given` (`--bpffs-dir`), or `meshlet/` on the first bpffs
/// of `mounts`. It must be on a bpffs.
pub fn resolve_bpffs_dir(
    mounts: &[mounts::Mount],
    given: Option<PathBuf>,
) -> Result<PathBuf, Error> {
    let dir = match given {
        Some(dir) => dir,
        None => mounts::find(mounts, "bpf")
            .ok_or(Error::NoBpffs)?
            .join("meshlet"),
    };
    match mounts::fs_type_of(mounts, &dir) {
        Some("bpf") => Ok(dir),
        other => Err(Error::NotBpffs {
            path: dir,
            fs_type: other.unwrap_or("no known filesystem").to_owned(),
        }),
    }
}

/// Loads every program of the eBPF object (`object`, or the one built in) into the kernel and
/// unloads them again: the verifier's and the kernel's verdict on every BPF feature capture
/// uses, with nothing attached, no map pinned and no pin read. Returns the programs' names.
pub fn load_programs(object: Option<&Path>) -> Result<Vec<&'static str>, Error> {
    let custom;
    let object = match object {
        Some(path) => {
            custom = fs::read(path).map_err(Error::io("read the eBPF object", path))?;
            custom.as_slice()
        }
        None => EBPF_OBJECT,
    };
    let mut ebpf = EbpfLoader::new().load(object).map_err(Error::Load)?;
    let names = all_programs();
    for &name in &names {
        load_program(&mut ebpf, name)?;
    }
    Ok(names)
}

/// How a program came to be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    /// Attached by this agent.
    Attached,
    /// Found pinned from an earlier agent, running this build's program: kept as it was.
    Adopted,
    /// Found pinned from an earlier agent running another program: the link now runs this
    /// build's (`BPF_LINK_UPDATE`, in place: same link, no moment without capture).
    Upgraded,
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

/// Connections redirected so far (summed over CPUs; survives agent restarts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Redirects {
    /// Connects from enrolled pods sent to their 15001 listener.
    pub outbound: u64,
    /// Connections to enrolled pods handed to their 15006 listener.
    pub inbound: u64,
    /// Connections to enrolled pods let through to the application unsteered because kubelet
    /// opened them (its probes).
    pub probes: u64,
}

/// The map key of an address: v4-mapped for IPv4, network-order bytes as native words.
pub fn ip_key(ip: IpAddr) -> Ip {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The address a map key stands for ([`ip_key`] reversed); v4-mapped keys give IPv4.
pub fn ip_of_key(key: &Ip) -> IpAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(key) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(octets);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The capture programs, loaded and attached, and the maps that steer them.
pub struct Capture {
    config: Config,
    layout: pins::Layout,
    programs: Vec<AttachedProgram>,
    enrolled: HashMap<MapData, u64, Enrollment>,
    listeners: SockHash<MapData, Ip>,
    kubelet_probes: HashMap<MapData, ProbeKey, u8>,
    redirects: PerCpuArray<MapData, u64>,
    probes_passed: PerCpuArray<MapData, u64>,
    /// The programs' log ring: held here too, since programs loaded later need the map open.
    log: Arc<Mutex<events::EbpfLog>>,
    // Owns the loaded programs (sk_lookup is attached from it on enroll).
    ebpf: Ebpf,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("config", &self.config)
            .field("programs", &self.programs)
            .finish_non_exhaustive()
    }
}

fn take_map<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, Error> {
    let map = ebpf
        .take_map(name)
        .ok_or(Error::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl Capture {
    /// Loads the programs and maps (maps reuse their pins), applies the settings and
    /// exclusions, and attaches each cgroup program unless an earlier agent's pinned link
    /// already does: those of the cgroup root, and `probe_ops` to kubelet's cgroup when one is
    /// configured. Stale pins are removed.
    pub fn install(config: Config) -> Result<Self, Error> {
        check_kernel()?;
        let cgroup = fs::File::open(&config.cgroup_root)
            .map_err(Error::io("open cgroup", &config.cgroup_root))?;
        let cgroup_id = cgroup
            .metadata()
            .map_err(Error::io("stat cgroup", &config.cgroup_root))?
            .ino();
        let kubelet = match &config.kubelet_cgroup {
            Some(path) => Some(open_kubelet_cgroup(path, &config.cgroup_root, cgroup_id)?),
            None => None,
        };
        let layout = pins::Layout::new(&config.bpffs_dir);
        layout.create(cgroup_id)?;
        retire_maps(&layout)?;
        let custom;
        let object = match &config.object {
            Some(path) => {
                custom = fs::read(path).map_err(Error::io("read the eBPF object", path))?;
                custom.as_slice()
            }
            None => EBPF_OBJECT,
        };
        let migration = migrate::prepare(&layout, &migrate::definitions(object)?)?;

        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<_> = maps::ALL
            .iter()
            .map(|&name| (name, layout.map(name)))
            .collect();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(Error::Load)?;
        migration.finish(&layout)?;
        let log = events::EbpfLog::take(&mut ebpf).map_err(Error::Log)?;

        let enrolled: HashMap<_, u64, Enrollment> = take_map(&mut ebpf, maps::ENROLLED)?;
        let mut wanted = vec![(cgroup_id, CGROUP_PROGRAMS)];
        wanted.extend(kubelet.as_ref().map(|(_, id)| (*id, KUBELET_PROGRAMS)));
        layout.remove_stale(&wanted, |cookie| enrolled.get(&cookie, 0).is_ok())?;

        let mut settings: Array<_, u32> = take_map(&mut ebpf, maps::SETTINGS)?;
        settings
            .set(
                SETTING_FAIL_OPEN,
                u32::from(config.fail_mode == FailMode::Open),
                0,
            )
            .map_err(map_err(maps::SETTINGS))?;
        let mut ports: HashMap<_, u16, u8> = take_map(&mut ebpf, maps::EXCLUDED_PORTS)?;
        replace_all(
            &mut ports,
            config.excluded_ports.iter().map(|&port| (port, 1)),
            maps::EXCLUDED_PORTS,
        )?;
        let mut cidrs: LpmTrie<_, Ip, u8> = take_map(&mut ebpf, maps::EXCLUDED_CIDRS)?;
        let stale: Vec<_> = cidrs
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::EXCLUDED_CIDRS))?;
        for key in stale {
            cidrs.remove(&key).map_err(map_err(maps::EXCLUDED_CIDRS))?;
        }
        for cidr in &config.excluded_cidrs {
            let prefix = u32::from(cidr.prefix_len()) + if cidr.addr().is_ipv4() { 96 } else { 0 };
            cidrs
                .insert(&Key::new(prefix, ip_key(cidr.network())), 1, 0)
                .map_err(map_err(maps::EXCLUDED_CIDRS))?;
        }

        let mut targets: Vec<(&'static str, &fs::File, u64)> = CGROUP_PROGRAMS
            .iter()
            .map(|&name| (name, &cgroup, cgroup_id))
            .collect();
        if let Some((file, id)) = &kubelet {
            layout.create_cgroup_links(*id)?;
            targets.extend(KUBELET_PROGRAMS.iter().map(|&name| (name, file, *id)));
        }
        let mut attached = Vec::new();
        for (name, cgroup, cgroup_id) in targets {
            let pin = layout.cgroup_links(cgroup_id).join(name);
            let (link, attachment) = if pin.exists() {
                let link =
                    FdLink::from(PinnedLink::from_pin(&pin).map_err(|source| Error::Link {
                        path: pin.clone(),
                        source,
                    })?);
                let running = link.info().map_err(|source| Error::Link {
                    path: pin.clone(),
                    source,
                })?;
                let attachment = if bring_up_to_date(&mut ebpf, name, &pin, running.program_id())? {
                    Attachment::Upgraded
                } else {
                    Attachment::Adopted
                };
                (link, attachment)
            } else {
                (
                    attach_to_cgroup(&mut ebpf, name, cgroup, &pin)?,
                    Attachment::Attached,
                )
            };
            let info = link.info().map_err(|source| Error::Link {
                path: pin.clone(),
                source,
            })?;
            debug!(
                program = name,
                ?attachment,
                link_id = info.id(),
                "capture program attached"
            );
            attached.push(AttachedProgram {
                name,
                attachment,
                link_id: info.id(),
                program_id: info.program_id(),
                pin,
                _link: link,
            });
        }
        let count = |kind| attached.iter().filter(|p| p.attachment == kind).count();
        let sk_lookup_upgraded = upgrade_netns_links(&mut ebpf, &layout)?;
        info!(
            cgroup = %config.cgroup_root.display(),
            attached = count(Attachment::Attached),
            adopted = count(Attachment::Adopted),
            upgraded = count(Attachment::Upgraded),
            sk_lookup_upgraded,
            fail_mode = ?config.fail_mode,
            "capture installed"
        );
        if let Some(path) = &config.kubelet_cgroup {
            info!(
                kubelet_cgroup = %path.display(),
                "kubelet's probes reach pods unsteered (connections opened from its cgroup)"
            );
        }

        Ok(Self {
            listeners: take_map(&mut ebpf, maps::INBOUND_LISTENERS)?,
            kubelet_probes: take_map(&mut ebpf, maps::KUBELET_PROBES)?,
            redirects: take_map(&mut ebpf, maps::REDIRECTS)?,
            probes_passed: take_map(&mut ebpf, maps::PROBES_PASSED)?,
            log: Arc::new(Mutex::new(log)),
            enrolled,
            config,
            layout,
            programs: attached,
            ebpf,
        })
    }

    /// The programs' log ring ([`events::EbpfLog::run`] forwards it to the agent's log).
    pub fn log(&self) -> Arc<Mutex<events::EbpfLog>> {
        self.log.clone()
    }

    /// Where and how capture is attached.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The programs attached to cgroups: the cgroup root's, then kubelet's `probe_ops` when a
    /// kubelet cgroup is configured.
    pub fn programs(&self) -> &[AttachedProgram] {
        &self.programs
    }

    /// Enrolls the network namespace `netns` of a pod with addresses `ips`: its outbound TCP
    /// connects are redirected from now on, and its inbound steered once a listener is
    /// registered ([`Capture::set_inbound_listener`]). Returns the namespace's cookie.
    /// Enrolling an enrolled namespace again keeps its steering program (no second one).
    pub fn enroll(&mut self, netns: &Netns, ips: &[IpAddr]) -> Result<u64, Error> {
        let cookie = netns
            .cookie()
            .map_err(Error::io("read netns cookie of", netns.path()))?;
        let pick = |v4: bool| {
            ips.iter()
                .find(|ip| ip.is_ipv4() == v4)
                .map_or([0; 4], |&ip| ip_key(ip))
        };
        let flags = self.enrolled.get(&cookie, 0).map_or(0, |e| e.flags);
        let enrollment = Enrollment {
            flags,
            _pad: 0,
            ipv4: pick(true),
            ipv6: pick(false),
        };
        self.enrolled
            .insert(cookie, enrollment, 0)
            .map_err(map_err(maps::ENROLLED))?;

        let dir = self.layout.netns_links(cookie);
        let pin = dir.join(programs::SK_LOOKUP);
        if !pin.exists() {
            fs::create_dir_all(&dir).map_err(Error::io("create pin directory", &dir))?;
            let program: &mut SkLookup = program(&mut self.ebpf, programs::SK_LOOKUP)?;
            let id = program
                .attach(netns.as_fd())
                .map_err(Error::program(programs::SK_LOOKUP))?;
            let link = program
                .take_link(id)
                .map_err(Error::program(programs::SK_LOOKUP))?;
            let link = FdLink::from(link);
            link.pin(&pin).map_err(|source| Error::Pin {
                path: pin.clone(),
                source,
            })?;
        }
        info!(netns = %netns.path().display(), cookie, ?ips, "enrolled");
        Ok(cookie)
    }

    /// Registers the pod's inbound plaintext listener (15006) for its address `ip`: sk_lookup
    /// hands it the connections to `ip`. The map holds a reference to the socket, dropped by
    /// the kernel when the listener closes.
    pub fn set_inbound_listener(
        &mut self,
        ip: IpAddr,
        listener: &impl AsRawFd,
    ) -> Result<(), Error> {
        self.listeners
            .insert(ip_key(ip), listener.as_raw_fd(), 0)
            .map_err(map_err(maps::INBOUND_LISTENERS))
    }

    /// Marks the namespace `cookie` ready (its proxy listeners are up) or not. Only fail-open
    /// mode reads this.
    pub fn set_ready(&mut self, cookie: u64, ready: bool) -> Result<(), Error> {
        let mut enrollment = self
            .enrolled
            .get(&cookie, 0)
            .map_err(map_err(maps::ENROLLED))?;
        enrollment.flags = if ready {
            enrollment.flags | Enrollment::READY
        } else {
            enrollment.flags & !Enrollment::READY
        };
        self.enrolled
            .insert(cookie, enrollment, 0)
            .map_err(map_err(maps::ENROLLED))
    }

    /// Stops capturing the namespace `cookie`: new connections are no longer redirected or
    /// steered; connections already established are not touched. Unenrolling a namespace that
    /// is not enrolled is not an error.
    pub fn unenroll(&mut self, cookie: u64) -> Result<(), Error> {
        if let Ok(enrollment) = self.enrolled.get(&cookie, 0) {
            self.enrolled
                .remove(&cookie)
                .map_err(map_err(maps::ENROLLED))?;
            for ip in [enrollment.ipv4, enrollment.ipv6] {
                if ip != [0; 4] {
                    // The entry is gone already if the listener closed.
                    let _ = self.listeners.remove(&ip);
                }
            }
        }
        let dir = self.layout.netns_links(cookie);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(Error::io("unpin", &dir))?;
        }
        info!(cookie, "unenrolled");
        Ok(())
    }

    /// The enrolled namespaces: cookie and state.
    pub fn enrolled(&self) -> Result<Vec<(u64, Enrollment)>, Error> {
        read_enrolled(&self.enrolled)
    }

    /// Connections kubelet has open (recorded when it connected, forgotten when they close):
    /// (kubelet's end, the other end).
    pub fn kubelet_probes(&self) -> Result<Vec<(SocketAddr, SocketAddr)>, Error> {
        let keys: Vec<ProbeKey> = self
            .kubelet_probes
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::KUBELET_PROBES))?;
        Ok(keys
            .iter()
            .map(|key| {
                (
                    SocketAddr::new(ip_of_key(&key.src_ip), key.src_port),
                    SocketAddr::new(ip_of_key(&key.dst_ip), key.dst_port),
                )
            })
            .collect())
    }

    /// Connections redirected so far, by direction, and kubelet's let through.
    pub fn redirects(&self) -> Result<Redirects, Error> {
        read_redirects(&self.redirects, Some(&self.probes_passed))
    }
}

/// Read-only access to the pinned state of a running (or stopped) agent, for inspection:
/// what is enrolled, and how many connections were redirected.
pub struct Pinned {
    enrolled: HashMap<MapData, u64, Enrollment>,
    redirects: PerCpuArray<MapData, u64>,
    /// Absent in the pins of an agent older than kubelet-probe tracking.
    probes_passed: Option<PerCpuArray<MapData, u64>>,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned").finish_non_exhaustive()
    }
}

impl Pinned {
    /// Opens the pinned maps under `bpffs_dir`: this build's layout, or the unversioned one of
    /// an agent from before layouts were versioned (still running during an upgrade).
    pub fn open(bpffs_dir: &Path) -> Result<Self, Error> {
        let layout = pins::Layout::new(bpffs_dir);
        let path = |name: &str| {
            let current = layout.map(name);
            if current.exists() {
                current
            } else {
                layout.unversioned_map(name)
            }
        };
        let open = |name: &'static str| -> Result<aya::maps::Map, Error> {
            let data = MapData::from_pin(path(name)).map_err(map_err(name))?;
            aya::maps::Map::from_map_data(data).map_err(map_err(name))
        };
        Ok(Self {
            enrolled: open(maps::ENROLLED)?
                .try_into()
                .map_err(map_err(maps::ENROLLED))?,
            redirects: open(maps::REDIRECTS)?
                .try_into()
                .map_err(map_err(maps::REDIRECTS))?,
            probes_passed: match open(maps::PROBES_PASSED) {
                Ok(map) => Some(map.try_into().map_err(map_err(maps::PROBES_PASSED))?),
                Err(_) if !path(maps::PROBES_PASSED).exists() => None,
                Err(err) => return Err(err),
            },
        })
    }

    /// The enrolled namespaces: cookie and state.
    pub fn enrolled(&self) -> Result<Vec<(u64, Enrollment)>, Error> {
        read_enrolled(&self.enrolled)
    }

    /// Connections redirected so far, by direction, and kubelet's let through.
    pub fn redirects(&self) -> Result<Redirects, Error> {
        read_redirects(&self.redirects, self.probes_passed.as_ref())
    }
}

fn read_enrolled(map: &HashMap<MapData, u64, Enrollment>) -> Result<Vec<(u64, Enrollment)>, Error> {
    map.iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(maps::ENROLLED))
}

fn read_redirects(
    redirects: &PerCpuArray<MapData, u64>,
    probes_passed: Option<&PerCpuArray<MapData, u64>>,
) -> Result<Redirects, Error> {
    let read = |map: &PerCpuArray<MapData, u64>, index: u32, name| -> Result<u64, Error> {
        let values = map.get(&index, 0).map_err(map_err(name))?;
        Ok(values.iter().sum())
    };
    Ok(Redirects {
        outbound: read(redirects, Direction::Outbound as u32, maps::REDIRECTS)?,
        inbound: read(redirects, Direction::Inbound as u32, maps::REDIRECTS)?,
        probes: match probes_passed {
            Some(map) => read(map, 0, maps::PROBES_PASSED)?,
            None => 0,
        },
    })
}

/// Opens kubelet's cgroup (returning it and its inode), refusing one that would exempt every
/// process of the cgroup root: the root itself, an ancestor of it, or the top of a cgroup2
/// hierarchy.
fn open_kubelet_cgroup(
    path: &Path,
    cgroup_root: &Path,
    cgroup_root_id: u64,
) -> Result<(fs::File, u64), Error> {
    let file = fs::File::open(path).map_err(Error::io("open kubelet cgroup", path))?;
    let id = file
        .metadata()
        .map_err(Error::io("stat kubelet cgroup", path))?
        .ino();
    let canonical = |p: &Path| fs::canonicalize(p).map_err(Error::io("resolve", p));
    let (kubelet, root) = (canonical(path)?, canonical(cgroup_root)?);
    let mounts = mounts::mounts().map_err(Error::io("read", Path::new("/proc/self/mountinfo")))?;
    match mounts::fs_type_of(&mounts, &kubelet) {
        Some("cgroup2") => {}
        other => {
            return Err(Error::NotCgroup2 {
                path: path.to_owned(),
                fs_type: other.unwrap_or("no known filesystem").to_owned(),
            });
        }
    }
    let is_mount = mounts.iter().any(|m| {
        m.fs_type == "cgroup2" && fs::canonicalize(&m.mount_point).is_ok_and(|p| p == kubelet)
    });
    // The top cgroup of a cgroup2 hierarchy has inode 1.
    if id == cgroup_root_id || id == 1 || is_mount || root.starts_with(&kubelet) {
        return Err(Error::KubeletCgroupTooBroad {
            path: path.to_owned(),
            cgroup_root: cgroup_root.to_owned(),
        });
    }
    Ok((file, id))
}

/// Empties and unpins the maps of [`RETIRED_MAPS`] if an older agent left them.
fn retire_maps(layout: &pins::Layout) -> Result<(), Error> {
    for &name in RETIRED_MAPS {
        let pin = layout.unversioned_map(name);
        if !pin.exists() {
            continue;
        }
        let map = MapData::from_pin(&pin)
            .ok()
            .and_then(|data| aya::maps::Map::from_map_data(data).ok())
            .and_then(|map| HashMap::<_, Ip, u8>::try_from(map).ok());
        if let Some(mut map) = map {
            let keys: Vec<Ip> = map.keys().flatten().collect();
            for key in keys {
                let _ = map.remove(&key);
            }
        }
        info!(pin = %pin.display(), "unpinning a map this build no longer uses");
        fs::remove_file(&pin).map_err(Error::io("unpin", &pin))?;
    }
    Ok(())
}

/// Loads `name`, attaches it to `cgroup` with a bpf link (Linux >= 5.7) and pins the link.
fn attach_to_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    pin: &Path,
) -> Result<FdLink, Error> {
    let err = Error::program;
    let mode = CgroupAttachMode::Single; // bpf links on cgroups always allow multiple programs
    let link_err = |source: LinkError| Error::Link {
        path: pin.to_owned(),
        source,
    };
    let pin_err = |source| Error::Pin {
        path: pin.to_owned(),
        source,
    };
    load_program(ebpf, name)?;
    let program = ebpf.program_mut(name).ok_or(Error::Missing {
        kind: "program",
        name,
    })?;
    let link = match program {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, mode).map_err(err(name))?;
            FdLink::try_from(p.take_link(id).map_err(err(name))?).map_err(link_err)?
        }
        Program::SockOps(p) => {
            let id = p.attach(cgroup, mode).map_err(err(name))?;
            FdLink::try_from(p.take_link(id).map_err(err(name))?).map_err(link_err)?
        }
        Program::CgroupSockopt(p) => {
            // aya 0.14 cannot make this link an FdLink: create and pin it ourselves.
            let program_fd = p.fd().map_err(err(name))?;
            let link = crate::sys::bpf::link_create(
                program_fd.as_fd(),
                cgroup.as_fd(),
                crate::sys::bpf::BPF_CGROUP_GETSOCKOPT,
            )
            .map_err(|io_error| {
                err(name)(ProgramError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_link_create",
                    io_error,
                }))
            })?;
            crate::sys::bpf::obj_pin(link.as_fd(), pin).map_err(Error::io("pin link", pin))?;
            return PinnedLink::from_pin(pin)
                .map(FdLink::from)
                .map_err(link_err);
        }
        _ => {
            return Err(Error::Missing {
                kind: "cgroup program",
                name,
            });
        }
    };
    Ok(link.pin(pin).map_err(pin_err)?.into())
}

/// Loads the program `name` of the object into the kernel (once) and returns a descriptor of
/// it.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<std::os::fd::OwnedFd, Error> {
    let err = Error::program(name);
    let program = ebpf.program_mut(name).ok_or(Error::Missing {
        kind: "program",
        name,
    })?;
    if program.fd().is_err() {
        match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::SockOps(p) => p.load(),
            Program::CgroupSockopt(p) => p.load(),
            Program::SkLookup(p) => p.load(),
            _ => {
                return Err(Error::Missing {
                    kind: "capture program",
                    name,
                });
            }
        }
        .map_err(Error::program(name))?;
    }
    let fd = program.fd().map_err(err)?;
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(Error::io("duplicate the descriptor of", Path::new(name)))
}

/// Makes the link pinned at `pin`, which runs program `running` (an id), run this build's
/// program `name`: when the two differ in code (the kernel's tag) or in the maps they use (a
/// map layout change gave this agent new maps), the link is updated in place
/// (`BPF_LINK_UPDATE`, only if it still runs `running`). Returns whether it was.
fn bring_up_to_date(
    ebpf: &mut Ebpf,
    name: &'static str,
    pin: &Path,
    running: u32,
) -> Result<bool, Error> {
    use crate::sys::bpf;
    let ours = load_program(ebpf, name)?;
    let theirs = bpf::prog_by_id(running).map_err(Error::io("open the program of", pin))?;
    let identity = |fd: &std::os::fd::OwnedFd| {
        bpf::prog_identity(fd.as_fd()).map_err(Error::io("inspect the program of", pin))
    };
    let (from, to) = (identity(&theirs)?, identity(&ours)?);
    if from == to {
        return Ok(false);
    }
    let link = bpf::obj_get(pin).map_err(Error::io("open the link", pin))?;
    bpf::link_update(link.as_fd(), ours.as_fd(), theirs.as_fd())
        .map_err(Error::io("replace the program of", pin))?;
    info!(
        program = name,
        link = %pin.display(),
        from = format!("{:016x}", from.tag),
        to = format!("{:016x}", to.tag),
        maps_changed = from.map_ids != to.map_ids,
        "program replaced in place"
    );
    Ok(true)
}

/// Brings the `sk_lookup` link of every enrolled namespace up to date with this build's
/// program (loading it); returns how many were replaced.
fn upgrade_netns_links(ebpf: &mut Ebpf, layout: &pins::Layout) -> Result<usize, Error> {
    load_program(ebpf, programs::SK_LOOKUP)?;
    let mut upgraded = 0;
    for pin in layout.netns_link_pins(programs::SK_LOOKUP)? {
        let link = PinnedLink::from_pin(&pin).map_err(|source| Error::Link {
            path: pin.clone(),
            source,
        })?;
        let running = FdLink::from(link).info().map_err(|source| Error::Link {
            path: pin.clone(),
            source,
        })?;
        match bring_up_to_date(ebpf, programs::SK_LOOKUP, &pin, running.program_id()) {
            Ok(true) => upgraded += 1,
            Ok(false) => {}
            // The namespace is gone (its link is dead): nothing to steer there any more. The
            // pass unenrolls it; its pin goes now, so no later start trips on it either.
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOLINK) => {
                info!(pin = %pin.display(), "unpinning the link of a namespace that is gone");
                if let Some(dir) = pin.parent() {
                    fs::remove_dir_all(dir).map_err(Error::io("unpin", dir))?;
                }
            }
            // Another agent replaced it meanwhile, or the kernel refused: steering goes on with
            // the program it has; say so rather than refuse to start.
            Err(err) => {
                warn!(pin = %pin.display(), %err, "cannot bring a namespace's program up to date")
            }
        }
    }
    Ok(upgraded)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(Error::Missing {
        kind: "program",
        name,
    })?;
    program.try_into().map_err(Error::program(name))
}

/// Makes a hash map hold exactly `entries`.
fn replace_all<K: aya::Pod + PartialEq, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    entries: impl Iterator<Item = (K, V)>,
    name: &'static str,
) -> Result<(), Error> {
    let entries: Vec<_> = entries.collect();
    let stale: Vec<K> = map
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_err(name))?;
    for key in stale
        .iter()
        .filter(|key| !entries.iter().any(|(k, _)| k == *key))
    {
        map.remove(key).map_err(map_err(name))?;
    }
    for (key, value) in entries {
        map.insert(key, value, 0).map_err(map_err(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse_and_compare() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-91-generic\n"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.10.0").unwrap() < MIN_KERNEL);
        assert!(kernel_version("5.15.1").unwrap() >= MIN_KERNEL);
        let err = Error::KernelTooOld {
            found: "5.10.0".into(),
        }
        .to_string();
        assert!(err.contains("5.10.0") && err.contains(">= 5.15"), "{err}");
    }

    #[test]
    fn ip_keys_round_trip_and_map_ipv4() {
        for text in [
            "10.244.1.11",
            "127.0.0.1",
            "fd00:10:244:1::b",
            "::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let back = ip_of_key(&ip_key(ip));
            let expected = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            assert_eq!(back, expected, "{text}");
        }
        let key = ip_key("10.244.1.11".parse().unwrap());
        assert!(meshlet_common::is_v4_mapped(&key));
        assert_eq!(key[3], u32::from_ne_bytes([10, 244, 1, 11]));
        assert!(!meshlet_common::is_v4_mapped(&ip_key(
            "fd00::1".parse().unwrap()
        )));
    }
}
