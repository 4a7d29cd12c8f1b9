//! The layout of meshlet's pins under the bpffs directory, and their cleanup.
//!
//! ```text
//! <bpffs-dir>/maps/v<N>/<MAP>                          maps of layout version N (see
//!                                                      [`super::migrate`]), reused by every
//!                                                      agent of that layout
//! <bpffs-dir>/links/cgroup-<cgroup inode>/<program>    cgroup programs, one link each: the
//!                                                      cgroup root's, and kubelet's cgroup's
//!                                                      meshlet_probe_ops
//! <bpffs-dir>/links/netns-<netns cookie>/<program>     sk_lookup, one link per enrolled netns
//! ```
//!
//! A link stays attached as long as its pin exists (or a process holds it), so an agent that
//! stops leaves capture in place; removing a pin detaches the program.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use tracing::{debug, info, warn};

use super::Error;

/// Paths of the pins under one bpffs directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// The directory of this build's maps: `maps/v<N>`.
    pub fn maps_dir(&self) -> PathBuf {
        self.root
            .join("maps")
            .join(format!("v{}", super::migrate::MAP_LAYOUT_VERSION))
    }

    /// Where map `name` was pinned before map layouts were versioned.
    pub fn unversioned_map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    /// The map pins of every other layout: pins directly in `maps/` (before layouts were
    /// versioned: "v0") and in `maps/v<M>` for every other M, by layout.
    #[allow(clippy::type_complexity)]
    pub fn other_map_layouts(&self) -> Result<Vec<(String, Vec<(String, PathBuf)>)>, Error> {
        let maps = self.root.join("maps");
        let mut layouts = vec![("v0".to_owned(), super::migrate::pins_in(&maps)?)];
        for dir in read_dir(&maps)? {
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if dir.is_dir() && name.starts_with('v') && dir != self.maps_dir() {
                layouts.push((name, super::migrate::pins_in(&dir)?));
            }
        }
        layouts.retain(|(_, pins)| !pins.is_empty());
        Ok(layouts)
    }

    /// Removes the directories of other map layouts once they are empty.
    pub fn remove_empty_map_layouts(&self) -> Result<(), Error> {
        for dir in read_dir(&self.root.join("maps"))? {
            if dir.is_dir() && dir != self.maps_dir() && read_dir(&dir)?.is_empty() {
                fs::remove_dir(&dir).map_err(Error::io("remove", &dir))?;
            }
        }
        Ok(())
    }

    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The directory of the links attached to the cgroup with inode `cgroup_id`.
    pub fn cgroup_links(&self, cgroup_id: u64) -> PathBuf {
        self.links().join(format!("cgroup-{cgroup_id}"))
    }

    /// The directory of the links attached to the network namespace `cookie`.
    pub fn netns_links(&self, cookie: u64) -> PathBuf {
        self.links().join(format!("netns-{cookie}"))
    }

    /// The cookies of the network namespaces that have links pinned (`links/netns-<cookie>`):
    /// the pods capture holds.
    pub fn netns_cookies(&self) -> Result<Vec<u64>, Error> {
        Ok(read_dir(&self.links())?
            .iter()
            .filter_map(|dir| {
                dir.file_name()?
                    .to_str()?
                    .strip_prefix("netns-")?
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// The pins of `program`'s links in every network namespace's directory.
    pub fn netns_link_pins(&self, program: &str) -> Result<Vec<PathBuf>, Error> {
        Ok(read_dir(&self.links())?
            .into_iter()
            .filter(|dir| {
                dir.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("netns-"))
            })
            .map(|dir| dir.join(program))
            .filter(|pin| pin.exists())
            .collect())
    }

    /// The ids of the programs that the links pinned for cgroups run (`links/cgroup-*/*`):
    /// capture attached by this agent or by the one before it, still pinned while it drains
    /// during an upgrade. A pin that cannot be read (a link whose cgroup is gone) attaches
    /// nothing and is left out.
    pub fn cgroup_program_ids(&self) -> Result<Vec<u32>, Error> {
        let mut ids = Vec::new();
        for dir in read_dir(&self.links())? {
            let is_cgroup = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cgroup-"));
            if !is_cgroup || !dir.is_dir() {
                continue;
            }
            for pin in read_dir(&dir)? {
                let info = PinnedLink::from_pin(&pin)
                    .map(FdLink::from)
                    .and_then(|link| link.info());
                match info {
                    Ok(info) => ids.push(info.program_id()),
                    Err(err) => debug!(pin = %pin.display(), %err, "unreadable link pin"),
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Creates the directories that pins go into.
    pub fn create(&self, cgroup_id: u64) -> Result<(), Error> {
        let maps = self.maps_dir();
        fs::create_dir_all(&maps).map_err(Error::io("create pin directory", &maps))?;
        self.create_cgroup_links(cgroup_id)
    }

    /// Creates the directory of the links of the cgroup with inode `cgroup_id`.
    pub fn create_cgroup_links(&self, cgroup_id: u64) -> Result<(), Error> {
        let dir = self.cgroup_links(cgroup_id);
        fs::create_dir_all(&dir).map_err(Error::io("create pin directory", &dir))
    }

    /// Unpins links of cgroups not in `wanted` (cgroup inode, the programs it gets), links of
    /// programs a wanted cgroup does not get, and per-netns links of namespaces for which
    /// `enrolled` says no.
    pub fn remove_stale(
        &self,
        wanted: &[(u64, &[&str])],
        enrolled: impl Fn(u64) -> bool,
    ) -> Result<(), Error> {
        for entry in read_dir(&self.links())? {
            let name = entry
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let current = wanted
                .iter()
                .find(|(id, _)| self.cgroup_links(*id) == entry)
                .map(|(_, programs)| *programs);
            let stale = if let Some(programs) = current {
                for link in read_dir(&entry)? {
                    let known = link
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| programs.contains(&n));
                    if !known {
                        info!(pin = %link.display(), "unpinning a program this build does not ship");
                        fs::remove_file(&link).map_err(Error::io("unpin", &link))?;
                    }
                }
                false
            } else if let Some(cookie) = name.strip_prefix("netns-").and_then(|c| c.parse().ok()) {
                !enrolled(cookie)
            } else {
                true
            };
            if stale {
                info!(pin = %entry.display(), "unpinning capture that is no longer wanted");
                fs::remove_dir_all(&entry).map_err(Error::io("remove stale pins", &entry))?;
            }
        }
        Ok(())
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.path()).map_err(Error::io("list", dir)))
            .collect(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(Error::io("list", dir)(err)),
    }
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
/// when nothing is installed is not an error. Every pinned link is detached first
/// (`BPF_LINK_DETACH`), so capture ends at once even while an agent still holds the links open
/// (an agent releasing capture as its DaemonSet is deleted, or `meshlet uninstall` beside a
/// running agent).
pub fn uninstall(bpffs_dir: &Path) -> Result<Uninstalled, Error> {
    if !bpffs_dir.exists() {
        return Ok(Uninstalled::default());
    }
    let links = pinned_files(&bpffs_dir.join("links"));
    // Every link, whatever one of them does: a link left attached is a pod left captured.
    let mut failed = None;
    for link in &links {
        if let Err(err) = detach(link) {
            warn!(%err, "cannot detach a pinned link; unpinning it (it detaches once no process holds it)");
            failed.get_or_insert(err);
        }
    }
    let removed = Uninstalled {
        links: links.len(),
        maps: pinned_files(&bpffs_dir.join("maps")).len(),
    };
    fs::remove_dir_all(bpffs_dir).map_err(Error::io("remove", bpffs_dir))?;
    match failed {
        Some(err) => Err(err),
        None => Ok(removed),
    }
}

/// Detaches the link pinned at `pin`. A pin that is not a link (or a link the kernel cannot
/// detach, before Linux 5.9) is only unpinned by the caller, which detaches it once no process
/// holds it.
fn detach(pin: &Path) -> Result<(), Error> {
    use std::os::fd::AsFd as _;
    let link = crate::sys::bpf::obj_get(pin).map_err(Error::io("open pinned link", pin))?;
    match crate::sys::bpf::link_detach(link.as_fd()) {
        Ok(()) => Ok(()),
        Err(err) if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
            info!(pin = %pin.display(), %err, "link not detachable; unpinning it only");
            Ok(())
        }
        Err(err) => Err(Error::io("detach pinned link", pin)(err)),
    }
}

/// Every file under `dir`, recursively.
fn pinned_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                pinned_files(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}
