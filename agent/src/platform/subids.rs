//! Subordinate user and group ids (`/etc/subuid`, `/etc/subgid`) for a new account, chosen by
//! the rule `useradd` follows (shadow's `find_new_sub_uids` and `find_free_range`), so that they
//! can be given after the account's creation instead of inside it.

use std::path::Path;

/// The settings of `login.defs` that decide a new account's subordinate ids, with shadow's
/// defaults for those the file does not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubIdDefs {
    /// `UID_MIN`: the lowest uid of an account that gets subordinate ids.
    pub uid_min: u64,
    /// `UID_MAX`: the highest (system accounts, below, get none).
    pub uid_max: u64,
    /// `SUB_UID_MIN`, `SUB_UID_MAX`, `SUB_UID_COUNT`.
    pub uids: Pool,
    /// `SUB_GID_MIN`, `SUB_GID_MAX`, `SUB_GID_COUNT`.
    pub gids: Pool,
}

/// Where one kind of subordinate id is taken from and how many an account gets (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// The lowest id given.
    pub min: u64,
    /// The highest id given.
    pub max: u64,
    /// How many ids an account gets.
    pub count: u64,
}

impl SubIdDefs {
    /// Read from `login.defs` text: `NAME value` lines, `#` comments, values in decimal,
    /// `0x` hexadecimal or `0` octal (shadow reads them with `strtoul(…, 0)`); an unreadable
    /// value keeps the default, as shadow's `getdef_ulong` does.
    pub fn parse(text: &str) -> Self {
        let value = |name: &str, default: u64| -> u64 {
            // shadow keeps the last definition of a name.
            text.lines()
                .rev()
                .find_map(|line| {
                    let line = line.trim();
                    if line.starts_with('#') {
                        return None;
                    }
                    let mut words = line.split_whitespace();
                    (words.next() == Some(name)).then(|| words.next()).flatten()
                })
                .and_then(|v| parse_number(v.trim_matches('"')))
                .unwrap_or(default)
        };
        Self {
            uid_min: value("UID_MIN", 1000),
            uid_max: value("UID_MAX", 60000),
            uids: Pool {
                min: value("SUB_UID_MIN", 100_000),
                max: value("SUB_UID_MAX", 600_100_000),
                count: value("SUB_UID_COUNT", 65536),
            },
            gids: Pool {
                min: value("SUB_GID_MIN", 100_000),
                max: value("SUB_GID_MAX", 600_100_000),
                count: value("SUB_GID_COUNT", 65536),
            },
        }
    }

    /// `<root>/etc/login.defs`, or shadow's defaults when there is none.
    pub fn read(root: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(root.join("etc/login.defs")) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::parse("")),
            Err(e) => Err(e),
        }
    }

    /// Whether `useradd` gives an account with `uid` subordinate ids at all.
    pub fn covers(&self, uid: u32) -> bool {
        (self.uid_min..=self.uid_max).contains(&u64::from(uid))
    }
}

fn parse_number(text: &str) -> Option<u64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if text.len() > 1 && text.starts_with('0') {
        u64::from_str_radix(&text[1..], 8).ok()
    } else {
        text.parse().ok()
    }
}

/// One `owner:start:count` line of a subordinate id file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// A login name or a uid.
    pub owner: String,
    /// The first id.
    pub start: u64,
    /// How many ids.
    pub count: u64,
}

/// The ranges of a subordinate id file; lines that are not `owner:start:count` are skipped
/// (shadow skips what it cannot parse as well).
pub fn parse_ranges(text: &str) -> Vec<Range> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.trim().split(':');
            let (owner, start, count) = (fields.next()?, fields.next()?, fields.next()?);
            if fields.next().is_some() || owner.is_empty() {
                return None;
            }
            Some(Range {
                owner: owner.to_owned(),
                start: start.parse().ok()?,
                count: count.parse().ok()?,
            })
        })
        .collect()
}

/// Whether the account (by name or uid, as shadow matches owners) already has a range.
pub fn has_range(ranges: &[Range], name: &str, uid: u32) -> bool {
    let uid = uid.to_string();
    ranges.iter().any(|r| r.owner == name || r.owner == uid)
}

/// Why no range can be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// login.defs' minimum, maximum and count do not fit together.
    #[error("invalid login.defs pool: min {min}, max {max}, count {count}")]
    Invalid {
        /// The lowest id.
        min: u64,
        /// The highest id.
        max: u64,
        /// The count.
        count: u64,
    },
    /// Every large enough hole in the pool is taken.
    #[error("no {count} free ids between {min} and {max}")]
    Full {
        /// The lowest id.
        min: u64,
        /// The highest id.
        max: u64,
        /// The count.
        count: u64,
    },
}

/// The first free range of `pool.count` ids in `pool.min..=pool.max` below, between and above
/// the `taken` ranges (shadow's `find_free_range`, with `find_new_sub_uids`' checks); `None`
/// when the pool gives none (`count` 0).
pub fn free_range(pool: Pool, taken: &[Range]) -> Result<Option<(u64, u64)>, RangeError> {
    let Pool { min, max, count } = pool;
    if count == 0 {
        return Ok(None);
    }
    let invalid = RangeError::Invalid { min, max, count };
    if min > max || count >= max || min.saturating_add(count - 1) > max {
        return Err(invalid);
    }
    let mut sorted: Vec<&Range> = taken.iter().collect();
    sorted.sort_by_key(|r| (r.start, r.count));
    let mut low = min;
    for range in sorted {
        let first = range.start;
        let last = first.saturating_add(range.count).saturating_sub(1);
        let high = first.min(max + 1);
        if high > low && high - low >= count {
            return Ok(Some((low, low + count - 1)));
        }
        if low < last + 1 {
            low = last + 1;
        }
        if low > max {
            return Err(RangeError::Full { min, max, count });
        }
    }
    if max - low + 1 >= count {
        Ok(Some((low, low + count - 1)))
    } else {
        Err(RangeError::Full { min, max, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(owner: &str, start: u64, count: u64) -> Range {
        Range {
            owner: owner.into(),
            start,
            count,
        }
    }

    const POOL: Pool = Pool {
        min: 100_000,
        max: 600_100_000,
        count: 65536,
    };

    #[test]
    fn the_first_account_gets_the_pool_start_and_the_next_follows() {
        assert_eq!(free_range(POOL, &[]), Ok(Some((100_000, 165_535))));
        let taken = [range("debian", 100_000, 65536)];
        assert_eq!(free_range(POOL, &taken), Ok(Some((165_536, 231_071))));
    }

    #[test]
    fn a_hole_large_enough_is_used_and_a_small_one_skipped() {
        // Unsorted on purpose: shadow sorts before looking.
        let taken = [
            range("c", 400_000, 65536),
            range("a", 100_000, 65536),
            range("b", 200_000, 65536),
        ];
        // 165536..200000 is too small (34464); 265536..400000 fits.
        assert_eq!(free_range(POOL, &taken), Ok(Some((265_536, 331_071))));
        let small = Pool {
            count: 1000,
            ..POOL
        };
        assert_eq!(free_range(small, &taken), Ok(Some((165_536, 166_535))));
    }

    #[test]
    fn ranges_below_the_pool_and_a_full_pool() {
        let taken = [range("x", 10, 5)];
        assert_eq!(free_range(POOL, &taken), Ok(Some((100_000, 165_535))));
        let tiny = Pool {
            min: 100_000,
            max: 165_535,
            count: 65536,
        };
        assert!(matches!(
            free_range(tiny, &[range("a", 100_000, 1)]),
            Err(RangeError::Full { .. })
        ));
        assert_eq!(free_range(Pool { count: 0, ..POOL }, &[]), Ok(None));
        assert!(matches!(
            free_range(
                Pool {
                    min: 5,
                    max: 4,
                    count: 1
                },
                &[]
            ),
            Err(RangeError::Invalid { .. })
        ));
    }

    #[test]
    fn login_defs_values_defaults_and_comments() {
        let defs = SubIdDefs::parse(
            "# SUB_UID_COUNT 1\nUID_MIN\t\t 2000\nSUB_UID_COUNT 0x100\nSUB_GID_MIN 0400\nSUB_GID_COUNT nonsense\n",
        );
        assert_eq!(defs.uid_min, 2000);
        assert_eq!(defs.uid_max, 60000);
        assert_eq!(defs.uids.count, 256);
        assert_eq!(defs.gids.min, 256);
        assert_eq!(defs.gids.count, 65536);
        assert!(defs.covers(2000) && !defs.covers(999) && !defs.covers(60001));
    }

    #[test]
    fn ranges_are_parsed_and_owners_matched_by_name_or_uid() {
        let ranges = parse_ranges("debian:100000:65536\n\nbad line\n1001:165536:65536\n");
        assert_eq!(ranges.len(), 2);
        assert!(has_range(&ranges, "debian", 1000));
        assert!(has_range(&ranges, "someone", 1001));
        assert!(!has_range(&ranges, "exouser", 1002));
    }
}
