//! cloud-init's deferred `write_files` entries (`defer: true`) written by exoagent where
//! cloud-init predates `defer` (before 21.3: Debian 11's 20.4), once per cloud-init instance.
//! Such a cloud-init writes them in its first stage, before the users exist, stops at the first
//! owner it cannot find and skips the rest: Exosphere's credential files are left root's
//! (`openrc.sh`) or never written (`clouds.yaml`).

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use serde_norway::Value;

use super::{HostError, Outcome};
use crate::fsutil;
use crate::platform::users::UserManager;

/// The cloud-config cloud-init merged from the user data (every part), under the system root.
pub const CLOUD_CONFIG: &str = "var/lib/cloud/instance/cloud-config.txt";

/// cloud-init's current instance id: the deferred entries are written once per instance, as
/// cloud-init's `write_files_deferred` module would.
pub const INSTANCE_ID: &str = "var/lib/cloud/data/instance-id";

/// The module of cloud-init 21.3 and later that writes deferred entries: where it exists,
/// cloud-init does the work itself.
const DEFERRED_MODULE: &str = "cloudinit/config/cc_write_files_deferred.py";

/// One deferred entry, decoded as cloud-init decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    /// Absolute path on the instance.
    pub path: PathBuf,
    pub contents: Vec<u8>,
    /// `owner`'s user and group (the group `None` when only a user is named).
    pub user: String,
    pub group: Option<String>,
    pub mode: u32,
    pub append: bool,
}

/// Whether the cloud-init installed under `root` writes deferred entries itself; `None` when
/// no cloud-init is found (nothing to complete then).
pub(super) fn cloud_init_defers(root: &Path) -> Option<bool> {
    let lib = root.join("usr/lib");
    let mut found = None;
    for entry in std::fs::read_dir(&lib).ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("python3") {
            continue;
        }
        for packages in ["dist-packages", "site-packages"] {
            let dir = entry.path().join(packages);
            if dir.join("cloudinit/config").is_dir() {
                found = Some(found.unwrap_or(false) || dir.join(DEFERRED_MODULE).is_file());
            }
        }
    }
    found
}

/// The deferred entries of the cloud-config `text` (read from `source`), in order. An entry
/// that cannot be decoded is an error naming the file, the entry and the key, and nothing is
/// written for any entry.
pub(super) fn deferred_entries(source: &Path, text: &str) -> Result<Vec<Entry>, HostError> {
    let invalid = |message: String| HostError::CloudConfig {
        path: source.to_path_buf(),
        message,
    };
    // serde_norway resolves `!!binary` to the base64 text itself, indistinguishable from plain
    // text: such a file is refused rather than written wrong.
    if text.contains("!!binary") {
        return Err(invalid(
            "a `!!binary` value is not supported by exoagent (use `encoding: b64`)".into(),
        ));
    }
    let document: Value =
        serde_norway::from_str(text).map_err(|e| invalid(format!("not valid YAML: {e}")))?;
    let files = match document.get("write_files") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Sequence(files)) => files,
        Some(_) => return Err(invalid("write_files: expected a list".into())),
    };
    let mut entries = Vec::new();
    for (index, file) in files.iter().enumerate() {
        let at = |key: &str, what: String| invalid(format!("write_files[{index}].{key}: {what}"));
        let Value::Mapping(_) = file else {
            return Err(invalid(format!("write_files[{index}]: expected a mapping")));
        };
        if !flag(file, "defer").map_err(|what| at("defer", what))? {
            continue;
        }
        let path = match file.get("path") {
            Some(Value::String(p)) if !p.is_empty() => p.clone(),
            _ => return Err(at("path", "expected a non-empty string".into())),
        };
        let path = normalized(&path).ok_or_else(|| {
            at(
                "path",
                format!("{:?} has no file name", path.escape_debug().to_string()),
            )
        })?;
        let contents = contents(file).map_err(|what| at("content", what))?;
        let owner = match file.get("owner") {
            None | Some(Value::Null) => "root:root".to_owned(),
            Some(Value::String(owner)) => owner.clone(),
            Some(_) => return Err(at("owner", "expected 'user:group'".into())),
        };
        let (user, group) = match owner.split_once(':') {
            Some((user, group)) => (user.to_owned(), Some(group.to_owned())),
            None => (owner.clone(), None),
        };
        if user.is_empty() || group.as_deref() == Some("") {
            return Err(at("owner", format!("{owner:?} names no user or no group")));
        }
        let mode = permissions(file.get("permissions")).map_err(|what| at("permissions", what))?;
        let append = flag(file, "append").map_err(|what| at("append", what))?;
        entries.push(Entry {
            path,
            contents,
            user,
            group,
            mode,
            append,
        });
    }
    Ok(entries)
}

/// A boolean key, absent meaning false (cloud-init's `get_cfg_option_bool` also takes the
/// strings it lists).
fn flag(file: &Value, key: &str) -> Result<bool, String> {
    match file.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "on" | "yes" | "y" => Ok(true),
            "false" | "0" | "off" | "no" | "n" | "" => Ok(false),
            _ => Err(format!(
                "{:?} is not true or false",
                s.escape_debug().to_string()
            )),
        },
        Some(_) => Err("expected true or false".into()),
    }
}

/// `path` made absolute (relative to `/`, as cloud-init's `os.path.abspath` from its working
/// directory) with `.` and `..` resolved lexically; `None` when no file name is left.
fn normalized(path: &str) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(
        parts
            .iter()
            .fold(PathBuf::from("/"), |p, part| p.join(part)),
    )
}

/// The bytes to write: `content` decoded per `encoding`.
fn contents(file: &Value) -> Result<Vec<u8>, String> {
    let text = match file.get("content") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(text)) => text.clone(),
        Some(_) => return Err("expected a string".into()),
    };
    let base64 = |text: &str| {
        let compact: String = text.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| format!("not valid base64: {e}"))
    };
    let encoding = match file.get("encoding") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(e)) => e.trim().to_ascii_lowercase(),
        Some(_) => return Err("encoding: expected a string".into()),
    };
    let decoded = match encoding.as_str() {
        "b64" | "base64" => base64(&text)?,
        "gz" | "gzip" | "gz+base64" | "gzip+base64" | "gz+b64" | "gzip+b64" => {
            return Err(format!(
                "encoding {encoding:?} is not supported by exoagent (plain text and base64 are)"
            ))
        }
        // cloud-init takes an unknown encoding as plain text.
        _ => text.into_bytes(),
    };
    Ok(decoded)
}

/// `permissions`: an integer taken as it is, or a string of octal digits; 0644 when absent.
fn permissions(value: Option<&Value>) -> Result<u32, String> {
    let mode = match value {
        None | Some(Value::Null) => return Ok(0o644),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| format!("{n} is not a mode"))?,
        Some(Value::String(s)) => u64::from_str_radix(s.trim(), 8)
            .map_err(|_| format!("{:?} is not an octal mode", s.escape_debug().to_string()))?,
        Some(_) => return Err("expected an octal mode such as '0400'".into()),
    };
    u32::try_from(mode)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{mode:o} is not a file mode"))
}

/// Write every deferred entry of cloud-init's cloud-config under `root` when cloud-init does
/// not, once per cloud-init instance (`marker` records the instance done).
pub(super) fn complete(
    root: &Path,
    marker: &Path,
    users: &UserManager,
) -> Result<Outcome, HostError> {
    match cloud_init_defers(root) {
        None => return Ok(Outcome::Skipped("no cloud-init found".into())),
        Some(true) => return Ok(Outcome::Unchanged),
        Some(false) => {}
    }
    let instance = std::fs::read_to_string(root.join(INSTANCE_ID))
        .map(|id| id.trim().to_owned())
        .unwrap_or_default();
    if std::fs::read_to_string(marker).is_ok_and(|done| done.trim() == instance) {
        return Ok(Outcome::Unchanged);
    }
    let source = root.join(CLOUD_CONFIG);
    let text = match std::fs::read_to_string(&source) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(HostError::io("read", &source)(e)),
    };
    let entries = deferred_entries(&source, &text)?;
    for entry in &entries {
        write_entry(root, entry, users)?;
    }
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir).map_err(HostError::io("create", dir))?;
    }
    fsutil::write_atomic(marker, instance.as_bytes(), 0o644, None)
        .map_err(HostError::io("write", marker))?;
    Ok(if entries.is_empty() {
        Outcome::Unchanged
    } else {
        Outcome::Changed
    })
}

/// One entry written as cloud-init's deferred stage would: parents created (0755; the owner's
/// when inside the owner's home, root's elsewhere), the file replaced (or appended to) with its
/// mode and owner. Never through a symbolic link that someone other than root made.
fn write_entry(root: &Path, entry: &Entry, users: &UserManager) -> Result<(), HostError> {
    let owner_error = |message: String| HostError::CloudConfig {
        path: root.join(CLOUD_CONFIG),
        message: format!("write_files {}: {message}", entry.path.display()),
    };
    let account = users
        .lookup(&entry.user)?
        .ok_or_else(|| owner_error(format!("owner '{}' does not exist", entry.user)))?;
    let gid = match &entry.group {
        None => 0,
        Some(group) => users
            .group_id(group)?
            .ok_or_else(|| owner_error(format!("group '{group}' does not exist")))?,
    };
    let target = root.join(entry.path.strip_prefix("/").unwrap_or(&entry.path));
    let io = HostError::io;
    // Each ancestor: created when missing, refused when a link not root's.
    let mut dir = root.to_path_buf();
    let relative_parent = entry
        .path
        .parent()
        .and_then(|p| p.strip_prefix("/").ok())
        .unwrap_or(Path::new(""));
    for part in relative_parent.components() {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() && m.uid() != 0 => {
                return Err(owner_error(format!(
                    "'{}' is a symbolic link that root did not make: not followed",
                    dir.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir).map_err(io("create", &dir))?;
                let on_instance = Path::new("/").join(dir.strip_prefix(root).unwrap_or(&dir));
                if on_instance.starts_with(&account.home) && account.home != Path::new("/") {
                    std::os::unix::fs::lchown(&dir, Some(account.uid), Some(account.gid))
                        .map_err(io("give to the owner", &dir))?;
                }
            }
            Err(e) => return Err(io("inspect", &dir)(e)),
        }
    }
    if let Ok(m) = std::fs::symlink_metadata(&target) {
        if m.file_type().is_symlink() && m.uid() != 0 {
            return Err(owner_error(format!(
                "'{}' is a symbolic link that root did not make: not followed",
                target.display()
            )));
        }
    }
    if entry.append {
        // cloud-init may have appended before it stopped at the owner: not twice.
        let done = std::fs::read(&target).is_ok_and(|now| now.ends_with(&entry.contents));
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(entry.mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)
            .map_err(io("append to", &target))?;
        if !done {
            std::io::Write::write_all(&mut file, &entry.contents)
                .map_err(io("append to", &target))?;
        }
        std::os::unix::fs::fchown(&file, Some(account.uid), Some(gid))
            .map_err(io("give to the owner", &target))?;
        return Ok(());
    }
    fsutil::write_atomic(
        &target,
        &entry.contents,
        entry.mode,
        Some((account.uid, gid)),
    )
    .map_err(io("write", &target))
}
