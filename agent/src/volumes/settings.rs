//! `[volumes]`: whether exoagent formats (when blank) and mounts attached volumes, and under
//! which directory; its keys.

use std::path::{Path, PathBuf};

use crate::schema::values::absolute_path;
use crate::schema::{set, value, Key, Located};

/// Where Exosphere's `auto-mount-volumes` role mounts volumes.
pub const DEFAULT_MOUNT_ROOT: &str = "/media/volume";

/// `[volumes]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSettings {
    /// Mount attached volumes (formatting blank ones first). Never in the sandbox.
    pub automount: bool,
    /// The directory holding one mount point per volume.
    pub mount_root: PathBuf,
}

impl Default for VolumeSettings {
    fn default() -> Self {
        Self {
            automount: false,
            mount_root: PathBuf::from(DEFAULT_MOUNT_ROOT),
        }
    }
}

/// What the files say about `[volumes]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Section {
    automount: Option<Located<bool>>,
    mount_root: Option<Located<PathBuf>>,
}

/// An absolute path other than `/` (mount points are made and removed under it).
fn mount_root(text: &str) -> Option<PathBuf> {
    absolute_path(text).filter(|p| p.parent().is_some() && p != Path::new("/"))
}

/// The keys of `[volumes]`.
pub const KEYS: &[Key<Section>] = &[
    Key {
        name: "automount",
        example: "true",
        read: |w, f, s| set(&mut s.automount, w.boolean(f)),
    },
    Key {
        name: "mount_root",
        example: "\"/mnt/volumes\"",
        read: |w, f, s| {
            set(
                &mut s.mount_root,
                w.parsed(f, "an absolute path other than /", mount_root),
            )
        },
    },
];

impl Section {
    /// The settings (every value was checked when read).
    pub fn settings(&self) -> VolumeSettings {
        let d = VolumeSettings::default();
        VolumeSettings {
            automount: value(&self.automount).unwrap_or(d.automount),
            mount_root: value(&self.mount_root).unwrap_or(d.mount_root),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_root_is_absolute_and_not_the_root() {
        assert_eq!(mount_root("/media/volume"), Some("/media/volume".into()));
        assert_eq!(mount_root("/"), None);
        assert_eq!(mount_root("media"), None);
    }
}
