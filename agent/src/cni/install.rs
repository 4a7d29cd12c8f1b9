//! Installing `meshlet-cni` on a node, as istio-cni and Cilium do: the binary goes into the
//! CNI bin directory, and an entry for it goes at the end of the `plugins` of the primary
//! network conf (the file the runtime uses: the first `.conf`, `.conflist` or `.json` of the
//! conf directory, by name).
//!
//! Every write is atomic (a temporary file renamed over the old one, keeping its mode), so the
//! runtime never reads half a conf. Installing twice changes nothing; a single-plugin `.conf` is
//! turned into the `.conflist` chaining needs. The primary plugin may rewrite its conf at any
//! time (Calico and Cilium do on restart), so the agent re-asserts the entry periodically
//! ([`keep_installed`]). Uninstalling removes the entry from every conf of the directory first,
//! then the binary: never a conf naming a plugin that is not there.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::plugin::PLUGIN_TYPE;
use crate::capture::FailMode;

/// Where and what to install.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstallConfig {
    /// The host's CNI bin directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The host's CNI conf directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The plugin binary to copy (next to `meshlet` in the image).
    pub plugin_binary: PathBuf,
    /// The agent's socket, as the plugin (on the host) sees it.
    pub agent_socket: PathBuf,
    /// `fail_mode` of the entry.
    pub fail_mode: FailMode,
}

/// What an install changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The conf now chaining the plugin; `None` while the directory has no conf (the primary
    /// plugin has not written it yet).
    pub conf: Option<PathBuf>,
    /// Whether the binary was (re)written.
    pub binary_changed: bool,
    /// Whether the conf was (re)written.
    pub conf_changed: bool,
}

/// The file extensions the runtime reads confs from (libcni's `ConfFiles`).
const CONF_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

/// The plugin's entry in a conflist.
pub fn entry(agent_socket: &Path, fail_mode: FailMode) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "agent_socket": agent_socket,
        "fail_mode": fail_mode,
    })
}

/// Every conf file of `dir`, in the order the runtime considers them.
fn conf_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| CONF_EXTENSIONS.contains(&e))
            })
            .collect(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err),
    };
    files.sort();
    Ok(files)
}

/// The conf the runtime uses: the first of [`conf_files`].
pub fn primary_conf(dir: &Path) -> io::Result<Option<PathBuf>> {
    Ok(conf_files(dir)?.into_iter().next())
}

/// `conf` (a conflist, or a single-plugin conf) with `entry` last in its plugins and no other
/// meshlet entry. The other plugins and fields are kept as they are.
pub fn chain(conf: &Value, entry: &Value) -> anyhow::Result<Value> {
    let object = conf.as_object().context("the conf is not a JSON object")?;
    let mut list = if object.contains_key("plugins") {
        conf.clone()
    } else if object.contains_key("type") {
        // A single-plugin conf: the conflist holding it.
        let mut plugin = object.clone();
        let mut list = serde_json::Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(value) = plugin.remove(key) {
                list.insert(key.to_owned(), value);
            }
        }
        list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
        Value::Object(list)
    } else {
        bail!("the conf has neither `plugins` nor `type`");
    };
    let plugins = list["plugins"]
        .as_array_mut()
        .context("`plugins` is not a list")?;
    plugins.retain(|plugin| !is_ours(plugin));
    if plugins.is_empty() {
        bail!("the conf lists no primary plugin to chain after");
    }
    plugins.push(entry.clone());
    Ok(list)
}

/// `conf` without meshlet's entry.
pub fn unchain(conf: &Value) -> Value {
    let mut conf = conf.clone();
    if let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|plugin| !is_ours(plugin));
    }
    conf
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Writes `contents` to `path` atomically, with mode `mode`.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_like(path, contents, mode, None)
}

/// [`write_atomic`] with the mode and owner of `like`, when given.
fn write_atomic_like(
    path: &Path,
    contents: &[u8],
    mode: u32,
    like: Option<&fs::Metadata>,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?
        .to_string_lossy();
    // A name the runtime ignores (not one of its extensions) while it is being written.
    let tmp = path.with_file_name(format!(".{name}.meshlet-tmp"));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(contents)?;
    file.set_permissions(fs::Permissions::from_mode(
        like.map_or(mode, |m| m.permissions().mode() & 0o7777),
    ))?;
    if let Some(like) = like {
        std::os::unix::fs::fchown(&file, Some(like.uid()), Some(like.gid()))?;
    }
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// What identifies a file's version without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    inode: u64,
    modified: Option<std::time::SystemTime>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path).ok()?;
    Some(Stamp {
        len: meta.len(),
        inode: meta.ino(),
        modified: meta.modified().ok(),
    })
}

/// Installs repeatedly without re-reading the binaries each time: the installed binary is
/// compared byte for byte only when its size, inode or mtime moved since it was last checked.
#[derive(Debug)]
pub struct Installer {
    config: InstallConfig,
    verified: Option<Stamp>,
}

impl Installer {
    /// An installer for `config`.
    pub fn new(config: InstallConfig) -> Self {
        Self {
            config,
            verified: None,
        }
    }

    /// Installs the binary, then chains the plugin in the primary conf. Idempotent.
    pub fn install(&mut self) -> anyhow::Result<Installed> {
        let config = &self.config;
        let target = config.bin_dir.join(PLUGIN_TYPE);
        let binary_changed = match stamp(&target) {
            Some(current) if self.verified.as_ref() == Some(&current) => false,
            _ => {
                let changed = install_binary(config, &target)?;
                self.verified = stamp(&target);
                changed
            }
        };
        let (conf, conf_changed) = chain_primary(config)?;
        Ok(Installed {
            conf,
            binary_changed,
            conf_changed,
        })
    }
}

/// Installs the binary, then chains the plugin in the primary conf. Idempotent.
pub fn install(config: &InstallConfig) -> anyhow::Result<Installed> {
    Installer::new(config.clone()).install()
}

/// Copies the plugin to `target` unless it is there already; says whether it wrote.
fn install_binary(config: &InstallConfig, target: &Path) -> anyhow::Result<bool> {
    let binary = fs::read(&config.plugin_binary).with_context(|| {
        format!(
            "read the plugin binary {} (it ships next to meshlet)",
            config.plugin_binary.display()
        )
    })?;
    if fs::read(target).ok().as_deref() == Some(binary.as_slice()) {
        return Ok(false);
    }
    fs::create_dir_all(&config.bin_dir)
        .with_context(|| format!("create {}", config.bin_dir.display()))?;
    write_atomic(target, &binary, 0o755).with_context(|| format!("write {}", target.display()))?;
    Ok(true)
}

/// Chains the plugin in the primary conf, if there is one; returns it and whether it was
/// written.
fn chain_primary(config: &InstallConfig) -> anyhow::Result<(Option<PathBuf>, bool)> {
    let Some(primary) = primary_conf(&config.conf_dir)
        .with_context(|| format!("list {}", config.conf_dir.display()))?
    else {
        return Ok((None, false));
    };
    let conf = read_json(&primary)?;
    let chained = chain(&conf, &entry(&config.agent_socket, config.fail_mode))
        .with_context(|| format!("chain meshlet-cni into {}", primary.display()))?;
    if chained == conf {
        return Ok((Some(primary), false));
    }
    // A single-plugin conf becomes the `.conflist` of the same name (sorting first still).
    let target = if conf.get("plugins").is_some() {
        primary.clone()
    } else {
        let list = primary.with_extension("conflist");
        if fs::symlink_metadata(&list).is_ok() {
            bail!(
                "{} would become {}, which exists: resolve the two by hand",
                primary.display(),
                list.display()
            );
        }
        list
    };
    rewrite(&primary, &target, &chained, &conf)?;
    if target != primary {
        fs::remove_file(&primary).with_context(|| format!("remove {}", primary.display()))?;
    }
    Ok((Some(target), true))
}

/// Writes `value` as the new version of the conf `source` (read as `read`) to `target`:
/// through a symlink to the file it names, with the source's mode and owner, and only if the
/// source still holds what was read (the primary plugin may rewrite its conf at any time: its
/// version wins, and the next pass chains it again).
fn rewrite(source: &Path, target: &Path, value: &Value, read: &Value) -> anyhow::Result<()> {
    let resolve = |path: &Path| fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let source_file = resolve(source);
    let target_file = if source == target {
        source_file.clone()
    } else {
        target.to_owned()
    };
    let meta = fs::metadata(&source_file)?;
    let mut text = serde_json::to_vec_pretty(value)?;
    text.push(b'\n');
    if read_json(&source_file).ok().as_ref() != Some(read) {
        bail!(
            "{} changed while meshlet was editing it; will chain again",
            source.display()
        );
    }
    write_atomic_like(&target_file, &text, 0o644, Some(&meta))
        .with_context(|| format!("write {}", target_file.display()))
}

/// What an uninstall removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// Confs meshlet's entry was removed from.
    pub confs: Vec<PathBuf>,
    /// Whether the binary was removed.
    pub binary: bool,
}

/// Removes meshlet's entry from every conf in `conf_dir`, then the binary from `bin_dir`.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> anyhow::Result<Uninstalled> {
    let mut removed = Uninstalled::default();
    for path in conf_files(conf_dir)? {
        let Ok(conf) = read_json(&path) else {
            continue;
        };
        let unchained = unchain(&conf);
        if unchained != conf {
            rewrite(&path, &path, &unchained, &conf)?;
            removed.confs.push(path);
        }
    }
    match fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Ok(()) => removed.binary = true,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).context("remove the plugin binary"),
    }
    Ok(removed)
}

/// Installs now and then every `every`, so a primary plugin that rewrites its conf (or writes
/// it after the agent started) is chained again. Says each change and each new failure once.
/// `chained` says, after each pass, whether the plugin is chained in the primary conf (for
/// readiness).
pub async fn keep_installed(
    config: InstallConfig,
    every: Duration,
    chained: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut last_error = None;
    let mut installer = Installer::new(config.clone());
    loop {
        let result = installer.install();
        chained.store(
            result
                .as_ref()
                .is_ok_and(|installed| installed.conf.is_some()),
            Ordering::Release,
        );
        match result {
            Ok(installed) => {
                last_error = None;
                if installed.binary_changed {
                    info!(dir = %config.bin_dir.display(), "CNI plugin binary installed");
                }
                match &installed.conf {
                    Some(conf) if installed.conf_changed => {
                        info!(conf = %conf.display(), "meshlet-cni chained in the primary CNI conf");
                    }
                    None if installed.binary_changed => {
                        warn!(dir = %config.conf_dir.display(), "no CNI conf yet; meshlet-cni is chained once the primary plugin writes one");
                    }
                    _ => {}
                }
            }
            Err(err) => {
                let message = format!("{err:#}");
                if last_error.as_ref() != Some(&message) {
                    warn!(err = %message, "cannot install the CNI plugin; will retry");
                    last_error = Some(message);
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &[(&str, &str)] = &[
        (
            "10-bridge.conflist",
            include_str!("fixtures/10-bridge.conflist"),
        ),
        (
            "10-calico.conflist",
            include_str!("fixtures/10-calico.conflist"),
        ),
        (
            "05-cilium.conflist",
            include_str!("fixtures/05-cilium.conflist"),
        ),
        (
            "10-flannel.conflist",
            include_str!("fixtures/10-flannel.conflist"),
        ),
        ("10-mynet.conf", include_str!("fixtures/10-mynet.conf")),
    ];

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("meshlet-install-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("net.d")).unwrap();
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("meshlet-cni"), b"\x7fELF plugin").unwrap();
        Scratch(dir)
    }

    fn config(dir: &Path) -> InstallConfig {
        InstallConfig {
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            plugin_binary: dir.join("meshlet-cni"),
            agent_socket: "/var/lib/meshlet/cni.sock".into(),
            fail_mode: FailMode::Closed,
        }
    }

    /// Each provider's conf shape: chained last, the rest untouched, idempotent, reversible.
    #[test]
    fn every_fixture_is_chained_idempotently_and_restored_on_uninstall() {
        for (name, text) in FIXTURES {
            let dir = scratch(name);
            let config = config(&dir.0);
            let original: Value = serde_json::from_str(text).unwrap();
            fs::write(config.conf_dir.join(name), text).unwrap();
            // Another conf sorting later is not the runtime's, and stays as it is.
            fs::write(config.conf_dir.join("99-other.conflist"), text).unwrap();

            let installed = install(&config).unwrap();
            assert!(installed.binary_changed && installed.conf_changed, "{name}");
            let conf_path = installed.conf.clone().unwrap();
            assert_eq!(
                conf_path,
                config.conf_dir.join(name).with_extension("conflist")
            );
            let chained = read_json(&conf_path).unwrap();
            let plugins = chained["plugins"].as_array().unwrap();
            assert_eq!(
                plugins.last().unwrap(),
                &entry(&config.agent_socket, FailMode::Closed)
            );
            assert_eq!(chained["cniVersion"], original["cniVersion"], "{name}");
            assert_eq!(chained["name"], original["name"], "{name}");
            let primary_plugins: Vec<Value> = match original.get("plugins") {
                Some(list) => list.as_array().unwrap().clone(),
                None => {
                    let mut plugin = original.as_object().unwrap().clone();
                    plugin.remove("cniVersion");
                    plugin.remove("name");
                    vec![Value::Object(plugin)]
                }
            };
            assert_eq!(
                &plugins[..plugins.len() - 1],
                primary_plugins.as_slice(),
                "{name}"
            );
            assert_eq!(
                fs::read(config.bin_dir.join(PLUGIN_TYPE)).unwrap(),
                b"\x7fELF plugin"
            );
            let mode = fs::metadata(config.bin_dir.join(PLUGIN_TYPE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755);

            let bytes = fs::read(&conf_path).unwrap();
            let again = install(&config).unwrap();
            assert!(
                !again.binary_changed && !again.conf_changed,
                "{name}: {again:?}"
            );
            assert_eq!(fs::read(&conf_path).unwrap(), bytes, "{name}: idempotent");
            assert_eq!(
                read_json(&config.conf_dir.join("99-other.conflist")).unwrap(),
                original,
                "{name}: other confs untouched"
            );

            // A changed setting replaces the entry, never adds a second one.
            let open = InstallConfig {
                fail_mode: FailMode::Open,
                ..config.clone()
            };
            assert!(install(&open).unwrap().conf_changed);
            let reinstalled = read_json(&conf_path).unwrap();
            let ours = reinstalled["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| is_ours(p))
                .count();
            assert_eq!(ours, 1, "{name}");

            let removed = uninstall(&config.conf_dir, &config.bin_dir).unwrap();
            assert_eq!(removed.confs, vec![conf_path.clone()], "{name}");
            assert!(removed.binary);
            let restored = read_json(&conf_path).unwrap();
            let want = if original.get("plugins").is_some() {
                original.clone()
            } else {
                json!({
                    "cniVersion": original["cniVersion"],
                    "name": original["name"],
                    "plugins": primary_plugins,
                })
            };
            assert_eq!(restored, want, "{name}: reversible");
            assert!(!config.bin_dir.join(PLUGIN_TYPE).exists());
            assert_eq!(
                uninstall(&config.conf_dir, &config.bin_dir).unwrap(),
                Uninstalled::default(),
                "uninstalling twice is a no-op"
            );
            let leftovers: Vec<_> = fs::read_dir(&config.conf_dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("meshlet-tmp"))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
        }
    }

    #[test]
    fn a_rewritten_conf_is_chained_again_and_bad_confs_are_left_alone() {
        let dir = scratch("rewrite");
        let config = config(&dir.0);
        assert_eq!(
            install(&config).unwrap(),
            Installed {
                conf: None,
                binary_changed: true,
                conf_changed: false
            },
            "no conf yet: binary only"
        );
        let path = config.conf_dir.join("05-cilium.conflist");
        fs::write(&path, FIXTURES[2].1).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(install(&config).unwrap().conf_changed);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600,
            "mode kept"
        );
        // The primary plugin restarts and rewrites its conf without the entry.
        fs::write(&path, FIXTURES[2].1).unwrap();
        assert!(install(&config).unwrap().conf_changed, "chained again");

        // The long-running installer reads the binaries only when the installed one moved.
        let mut installer = Installer::new(config.clone());
        assert!(!installer.install().unwrap().binary_changed);
        assert!(!installer.install().unwrap().binary_changed);
        fs::write(config.bin_dir.join(PLUGIN_TYPE), b"tampered").unwrap();
        assert!(
            installer.install().unwrap().binary_changed,
            "a replaced binary is restored"
        );
        assert_eq!(
            fs::read(config.bin_dir.join(PLUGIN_TYPE)).unwrap(),
            b"\x7fELF plugin"
        );

        for (bad, why) in [
            ("{not json", "not valid JSON"),
            ("[1, 2]", "not a JSON object"),
            (
                r#"{"cniVersion":"1.0.0","name":"x"}"#,
                "neither `plugins` nor `type`",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
                "no primary plugin",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","plugins":{}}"#,
                "not a list",
            ),
        ] {
            fs::write(&path, bad).unwrap();
            let err = format!("{:#}", install(&config).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                bad,
                "a bad conf is not touched"
            );
        }
        // A conf that is a symlink is edited where it points; the link stays.
        let real = dir.0.join("real.conflist");
        fs::write(&real, FIXTURES[0].1).unwrap();
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&real, &path).unwrap();
        assert!(install(&config).unwrap().conf_changed);
        assert!(
            fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let plugins = read_json(&real).unwrap()["plugins"].clone();
        assert!(is_ours(plugins.as_array().unwrap().last().unwrap()));
        fs::remove_file(&path).unwrap();
        // A .conf whose .conflist twin exists is not converted over it.
        fs::write(config.conf_dir.join("01-single.conf"), FIXTURES[4].1).unwrap();
        fs::write(config.conf_dir.join("01-single.conflist"), "{}").unwrap();
        let err = format!("{:#}", install(&config).unwrap_err());
        assert!(err.contains("which exists"), "{err}");
        assert!(config.conf_dir.join("01-single.conf").exists());

        let missing = InstallConfig {
            plugin_binary: dir.0.join("nope"),
            ..config
        };
        let err = format!("{:#}", install(&missing).unwrap_err());
        assert!(err.contains("read the plugin binary"), "{err}");
    }
}
