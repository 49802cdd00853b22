//! Volume names and mount points: which volume a disk is (its serial against the volume UUIDs,
//! also when the bus truncated the serial), the name Exosphere gave it in the instance metadata
//! (v5 `meta` items, their older form, v6 device tags), and the directory name made from it.

use std::collections::BTreeMap;

use serde_json::Value;

/// virtio-blk keeps this many characters of a serial (a Cinder volume UUID has 36).
pub const VIRTIO_BLK_SERIAL_LEN: usize = 20;
/// ext4 keeps at most this many bytes of a label.
pub const MAX_LABEL_BYTES: usize = 16;
/// Longest directory name made from a volume name, in bytes (a file name may have 255).
const MAX_DIR_BYTES: usize = 200;
/// v5 `meta` key prefix: `exoVolumes::<uuid>` = `{"name": "…"}`.
const META_PREFIX: &str = "exoVolumes::";
/// v6 device tag prefix: `exoVolume::{"name": "…"}`.
const TAG_PREFIX: &str = "exoVolume::";

/// Volume UUID (lowercase) → the name Exosphere gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeNames {
    by_uuid: BTreeMap<String, String>,
}

/// A disk's serial matched against the known volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// The full volume UUID.
    pub volume_id: String,
    /// Its name.
    pub name: String,
}

impl VolumeNames {
    /// The names in an OpenStack `meta_data.json` document. Device tags (v6) win over `meta`
    /// items (v5) for the same volume; anything malformed is skipped.
    pub fn from_meta_data(doc: &Value) -> Self {
        let mut by_uuid = BTreeMap::new();
        if let Some(meta) = doc.get("meta").and_then(Value::as_object) {
            for (key, text) in meta {
                let Some(text) = text.as_str() else { continue };
                let Ok(parsed) = serde_json::from_str::<Value>(text) else {
                    continue;
                };
                if let Some(uuid) = key.strip_prefix(META_PREFIX) {
                    // `{"name": "data"}`, or the older `{"<uuid>": "data"}`.
                    let name = parsed
                        .get("name")
                        .or_else(|| parsed.get(uuid))
                        .and_then(Value::as_str);
                    if let Some(name) = name {
                        insert(&mut by_uuid, uuid, name);
                    }
                } else if key == "exoVolumes" {
                    // The oldest form: one item mapping every UUID to its name.
                    for (uuid, name) in parsed.as_object().into_iter().flatten() {
                        if let Some(name) = name.as_str() {
                            insert(&mut by_uuid, uuid, name);
                        }
                    }
                }
            }
        }
        for device in doc
            .get("devices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(serial) = device.get("serial").and_then(Value::as_str) else {
                continue;
            };
            let tags = device.get("tags").and_then(Value::as_array);
            for tag in tags.into_iter().flatten().filter_map(Value::as_str) {
                let Some(json) = tag.strip_prefix(TAG_PREFIX) else {
                    continue;
                };
                let name = serde_json::from_str::<Value>(json)
                    .ok()
                    .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned));
                if let Some(name) = name {
                    insert(&mut by_uuid, serial, &name);
                }
            }
        }
        Self { by_uuid }
    }

    /// How many volumes have a name.
    pub fn len(&self) -> usize {
        self.by_uuid.len()
    }

    /// Whether no volume has a name.
    pub fn is_empty(&self) -> bool {
        self.by_uuid.is_empty()
    }

    /// The volume whose UUID `serial` is: equal, or the UUID's first 20 characters when the
    /// serial has exactly that many (virtio-blk). A truncated serial matching two volumes
    /// matches none.
    pub fn lookup(&self, serial: &str) -> Option<Matched> {
        let serial = serial.trim().to_ascii_lowercase();
        if serial.is_empty() {
            return None;
        }
        if let Some(name) = self.by_uuid.get(&serial) {
            return Some(Matched {
                volume_id: serial,
                name: name.clone(),
            });
        }
        if serial.len() != VIRTIO_BLK_SERIAL_LEN {
            return None;
        }
        let mut found = self.by_uuid.iter().filter(|(u, _)| u.starts_with(&serial));
        match (found.next(), found.next()) {
            (Some((uuid, name)), None) => Some(Matched {
                volume_id: uuid.clone(),
                name: name.clone(),
            }),
            _ => None,
        }
    }
}

fn insert(by_uuid: &mut BTreeMap<String, String>, uuid: &str, name: &str) {
    let uuid = uuid.trim().to_ascii_lowercase();
    if !uuid.is_empty() && !name.is_empty() {
        by_uuid.insert(uuid, name.to_owned());
    }
}

/// Python's `\w` for text (`str.isalnum()` or `_`): letters (`Lu Ll Lt Lm Lo`) and numbers
/// (`Nd Nl No`) of any script. Not Rust's `is_alphanumeric`, which also keeps combining marks
/// such as Devanagari vowel signs that Python replaces.
fn is_word(c: char) -> bool {
    use icu_properties::props::GeneralCategory as G;
    if c == '_' {
        return true;
    }
    matches!(
        icu_properties::CodePointMapData::<G>::new().get(c),
        G::UppercaseLetter
            | G::LowercaseLetter
            | G::TitlecaseLetter
            | G::ModifierLetter
            | G::OtherLetter
            | G::DecimalNumber
            | G::LetterNumber
            | G::OtherNumber
    )
}

/// Exosphere's `re.sub(r"\W+", "-", name)`: every run of characters that are not letters,
/// digits or `_` becomes one `-`. Empty only when `name` is; cut to a sane file-name length.
pub fn sanitise(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_run = false;
    for c in name.chars() {
        if is_word(c) {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('-');
            in_run = true;
        }
    }
    cut_bytes(&out, MAX_DIR_BYTES).to_owned()
}

/// The directory name for a partition `number` of a disk named `name` (already sanitised).
pub fn partition_dir(dir: &str, number: u32) -> String {
    format!("{dir}.part{number}")
}

/// The directory name when `dir` is taken: Exosphere's `<name>-<last 4 characters of the
/// volume UUID>`, or of the kernel device name without a UUID.
pub fn clash_dir(dir: &str, volume_id: Option<&str>, kernel_name: &str) -> String {
    let source = volume_id.unwrap_or(kernel_name);
    let chars: Vec<char> = source.chars().collect();
    let tail: String = chars[chars.len().saturating_sub(4)..].iter().collect();
    format!("{dir}-{tail}")
}

/// An ext4 label from a volume name: at most 16 bytes, cut at a character boundary, control
/// characters left out.
pub fn label(name: &str) -> String {
    let clean: String = name.chars().filter(|c| !c.is_control()).collect();
    cut_bytes(&clean, MAX_LABEL_BYTES).to_owned()
}

/// The longest prefix of `text` of at most `max` bytes that ends at a character boundary.
fn cut_bytes(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The shape of Nova's `openstack/latest/meta_data.json` for an instance with two volumes,
    /// one named by a v5 `meta` item and one by a v6 device tag.
    fn nova_meta_data() -> Value {
        json!({
            "uuid": "6d5b4a0c-9a2b-4c8e-8f5a-3c1d2e7f9b10",
            "meta": {
                "exoUserPassword": "",
                "exoCreatorUsername": "alice",
                "exoSetup": "{\"status\":\"complete\",\"epoch\":1700000000000}",
                "exoVolumes::0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41": "{\"name\":\"My Data (2024)\"}",
                "exoVolumes::11111111-2222-3333-4444-555555555555": "not json",
            },
            "public_keys": {"alice": "ssh-ed25519 AAAAC3Nza alice@laptop\n"},
            "keys": [{"name": "alice", "type": "ssh", "data": "ssh-ed25519 AAAAC3Nza alice@laptop\n"}],
            "hostname": "exo-test.novalocal",
            "name": "exo-test",
            "launch_index": 0,
            "availability_zone": "nova",
            "random_seed": "cmFuZG9t",
            "project_id": "8f3ee0a5e7e5400ba7c1d3a2f0e9b8c7",
            "devices": [
                {
                    "type": "nic",
                    "bus": "pci",
                    "address": "0000:00:03.0",
                    "mac": "fa:16:3e:00:11:22",
                    "tags": ["trusted"]
                },
                {
                    "type": "disk",
                    "bus": "virtio",
                    "serial": "9c4e5a6b-7d8e-4f01-a2b3-c4d5e6f7a8b9",
                    "path": "/dev/vdc",
                    "address": "0000:00:05.0",
                    "tags": ["exoVolume::{\"name\":\"scratch\"}"]
                }
            ],
            "dedicated_cpus": []
        })
    }

    #[test]
    fn v5_items_and_v6_device_tags_name_volumes() {
        let names = VolumeNames::from_meta_data(&nova_meta_data());
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(
            names
                .lookup("0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41")
                .unwrap()
                .name,
            "My Data (2024)"
        );
        assert_eq!(
            names
                .lookup("9c4e5a6b-7d8e-4f01-a2b3-c4d5e6f7a8b9")
                .unwrap()
                .name,
            "scratch"
        );
    }

    #[test]
    fn the_older_v5_forms_name_volumes() {
        let doc = json!({
            "uuid": "x",
            "meta": {
                "exoVolumes::0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41":
                    "{\"0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41\":\"old\"}",
                "exoVolumes": "{\"9C4E5A6B-7D8E-4F01-A2B3-C4D5E6F7A8B9\":\"oldest\"}"
            }
        });
        let names = VolumeNames::from_meta_data(&doc);
        assert_eq!(
            names
                .lookup("0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41")
                .unwrap()
                .name,
            "old"
        );
        assert_eq!(
            names
                .lookup("9c4e5a6b-7d8e-4f01-a2b3-c4d5e6f7a8b9")
                .unwrap()
                .name,
            "oldest"
        );
    }

    #[test]
    fn a_document_without_volumes_names_none() {
        assert!(VolumeNames::from_meta_data(&json!({"uuid": "x"})).is_empty());
        assert!(VolumeNames::from_meta_data(&json!([1, 2])).is_empty());
    }

    #[test]
    fn serials_match_whole_or_truncated_to_twenty() {
        let names = VolumeNames::from_meta_data(&nova_meta_data());
        // virtio-scsi: the whole UUID (any case).
        let full = names
            .lookup("0B7D2F7C-0A88-4C3F-9D59-3F6E0A5B8C41")
            .unwrap();
        assert_eq!(full.volume_id, "0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41");
        // virtio-blk: the first 20 characters.
        let cut = names.lookup("9c4e5a6b-7d8e-4f01-a").unwrap();
        assert_eq!(cut.volume_id, "9c4e5a6b-7d8e-4f01-a2b3-c4d5e6f7a8b9");
        assert_eq!(cut.name, "scratch");
        // Another prefix length is no match, nor is an unknown serial.
        assert_eq!(names.lookup("9c4e5a6b-7d8e-4f01-a2"), None);
        assert_eq!(names.lookup("9c4e5a6b"), None);
        assert_eq!(names.lookup("ffffffff-7d8e-4f01-a"), None);
        assert_eq!(names.lookup(""), None);
    }

    #[test]
    fn a_truncated_serial_shared_by_two_volumes_matches_neither() {
        let doc = json!({"meta": {
            "exoVolumes::9c4e5a6b-7d8e-4f01-a2b3-000000000001": "{\"name\":\"a\"}",
            "exoVolumes::9c4e5a6b-7d8e-4f01-a2b3-000000000002": "{\"name\":\"b\"}"
        }});
        assert_eq!(
            VolumeNames::from_meta_data(&doc).lookup("9c4e5a6b-7d8e-4f01-a"),
            None
        );
    }

    #[test]
    fn sanitising_is_pythons_non_word_runs_to_a_dash() {
        assert_eq!(sanitise("My Data (2024)"), "My-Data-2024-");
        assert_eq!(sanitise("a  b"), "a-b");
        assert_eq!(sanitise("a.-/b"), "a-b");
        assert_eq!(sanitise("keep_under_score"), "keep_under_score");
        assert_eq!(sanitise("../../etc"), "-etc");
        assert_eq!(sanitise("données été"), "données-été");
        assert_eq!(sanitise("数据 卷"), "数据-卷");
        // Python: re.sub(r"\W+", "-", "नमस्ते") == "नमस-त-" (vowel signs and virama are marks).
        assert_eq!(sanitise("नमस्ते"), "नमस-त-");
        assert_eq!(sanitise("x²½Ⅻ"), "x²½Ⅻ");
        assert_eq!(sanitise("x\n\ty"), "x-y");
        assert_eq!(sanitise(""), "");
        let long = sanitise(&"é".repeat(300));
        assert!(long.len() <= MAX_DIR_BYTES && long.chars().all(|c| c == 'é'));
    }

    #[test]
    fn clashes_and_partitions_get_exospheres_suffixes() {
        assert_eq!(
            clash_dir("data", Some("0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41"), "vdb"),
            "data-8c41"
        );
        assert_eq!(clash_dir("vdb", None, "vdb"), "vdb-vdb");
        assert_eq!(partition_dir("data", 2), "data.part2");
        assert_eq!(
            clash_dir(&partition_dir("data", 1), Some("abcd"), "vdb1"),
            "data.part1-abcd"
        );
    }

    #[test]
    fn labels_are_cut_to_sixteen_bytes_at_a_character_boundary() {
        assert_eq!(label("short"), "short");
        assert_eq!(label("exactly-sixteen!"), "exactly-sixteen!");
        assert_eq!(label("seventeen-chars-x"), "seventeen-chars-");
        // 'é' is two bytes: eight of them fill sixteen bytes; a ninth does not fit.
        assert_eq!(label(&"é".repeat(9)), "é".repeat(8));
        assert_eq!(label("éa".repeat(6).as_str()).len(), 15);
        assert_eq!(label("a\nb"), "ab");
    }
}
