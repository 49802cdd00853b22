//! The drop-in for Exosphere's user-data template: the same placeholders Exosphere fills in
//! today (`renderUserDataTemplate`), in a multipart document that hands the work to exoagent
//! instead of a shell bootstrap, Ansible and Docker.
//!
//! What each placeholder becomes, and why it is safe there:
//! - `{ssh-authorized-keys}` ends the `sudo:` line of the `exouser` entry, exactly where
//!   Exosphere's own template has it (Exosphere replaces it together with its newline). Exosphere
//!   spells the key `ssh-authorized-keys`: every cloud-init acts on it (it turns `-` into `_`);
//!   the schema of cloud-init 24.1 and later accepts it as deprecated, the schema of older ones
//!   (Debian 12's 22.4) rejects it — a schema bug fixed upstream, not a runtime one. `sudo` is
//!   one string rather than Exosphere's one-element list, which 22.4's schema also rejects.
//! - `{install-os-updates}` is the value of `package_upgrade`.
//! - `{ansible-extra-vars}` sits inside a YAML double-quoted string: Exosphere escapes its JSON
//!   for a double-quoted shell word (`{\"guac_enabled\":true}`), and YAML undoes `\"` the same
//!   way, so the file gets plain JSON and no shell ever sees it. The agent reads it from
//!   [`CHOICES_FILE`].
//! - `{openstack-credential-write-files}` is a whole `write_files:` block, so it gets a
//!   cloud-config part of its own, merged with list append: the two parts' `write_files`
//!   would otherwise replace each other.

use std::time::Duration;

use serde_norway::{Mapping, Value};

use super::userdata::{bootcmd, check_delivery, runcmd, Delivery, UserdataError};

/// Where the template writes Exosphere's choices (the agent's `Paths::exosphere_choices_file`).
pub const CHOICES_FILE: &str = "/etc/exoagent/exosphere-choices.json";

/// The MIME boundary; Exosphere's own template uses the same name.
const BOUNDARY: &str = "=================exosphere-user-data====";

/// Every placeholder Exosphere fills in that this template uses.
pub const PLACEHOLDERS: [&str; 4] = [
    "{ssh-authorized-keys}",
    "{install-os-updates}",
    "{ansible-extra-vars}",
    "{openstack-credential-write-files}",
];

const MAIN_PART_HEAD: &str = r#"#cloud-config
# exoagent's drop-in for Exosphere's user-data template (docs/exosphere.md).
users:
  - default
  - name: exouser
    shell: /bin/bash
    groups: sudo, admin
    sudo: 'ALL=(ALL) NOPASSWD:ALL'{ssh-authorized-keys}
ssh_pwauth: true
package_update: true
package_upgrade: {install-os-updates}
write_files:
  - path: /etc/exoagent/exosphere-choices.json
    owner: root:root
    permissions: '0644'
    content: "{ansible-extra-vars}"
"#;

const CREDENTIALS_PART: &str = r#"#cloud-config
# Exosphere adds the project's application credential here when the user opts in. Its
# write_files list is appended to the other part's instead of replacing it.
merge_how:
  - name: list
    settings: [append]
  - name: dict
    settings: [no_replace, recurse_list]
{openstack-credential-write-files}
"#;

fn part(filename: &str, body: &str) -> String {
    format!(
        "--{BOUNDARY}\nContent-Type: text/cloud-config; charset=\"us-ascii\"\n\
         Content-Transfer-Encoding: 7bit\n\
         Content-Disposition: attachment; filename=\"{filename}\"\n\n{body}\n"
    )
}

/// The template text for `delivery`, placeholders intact; with `wait`, cloud-init waits that
/// long at most for the setup (on by default: `exoagent userdata --exosphere-template`).
pub fn template(delivery: &Delivery, wait: Option<Duration>) -> Result<String, UserdataError> {
    check_delivery(delivery)?;
    let mut entries = Mapping::new();
    if let Some(early) = bootcmd(delivery) {
        entries.insert("bootcmd".into(), early);
    }
    entries.insert("runcmd".into(), runcmd(delivery, wait));
    let runcmd = entries;
    let runcmd = serde_norway::to_string(&Value::Mapping(runcmd))
        .map_err(|e| UserdataError::Config(e.to_string()))?;
    let main = format!("{MAIN_PART_HEAD}{runcmd}");
    Ok(format!(
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\n\n{}{}--{BOUNDARY}--\n",
        part("exosphere.yml", &main),
        part("exosphere-credentials.yml", CREDENTIALS_PART),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_appears_once_and_nothing_else_looks_like_one() {
        for delivery in [
            Delivery::Baked,
            Delivery::Bootstrap {
                url: "https://example.org/exoagent".into(),
                sha256: "ab".repeat(32),
            },
            Delivery::Package {
                url: "https://example.org/exoagent_0.1.0-1_amd64.deb".into(),
                sha256: "ab".repeat(32),
                format: super::super::userdata::PackageFormat::Deb,
            },
        ] {
            let text = template(&delivery, Some(super::super::userdata::DEFAULT_WAIT)).unwrap();
            for placeholder in PLACEHOLDERS {
                assert_eq!(text.matches(placeholder).count(), 1, "{placeholder}");
            }
            // Exosphere replaces this one together with its newline.
            assert!(text.contains("{ssh-authorized-keys}\n"));
            assert!(text.is_ascii(), "declared us-ascii, 7bit");
            for other in [
                "{instance-config-mgt-repo-url}",
                "{instance-config-mgt-repo-checkout}",
                "{create-cluster-command}",
                "{write-files}",
            ] {
                assert!(!text.contains(other), "{other}");
            }
        }
    }

    #[test]
    fn the_choices_file_is_where_the_agent_reads_it() {
        let text = template(&Delivery::Baked, None).unwrap();
        assert!(text.contains(&format!("  - path: {CHOICES_FILE}\n")));
        assert_eq!(
            crate::paths::Paths::system().exosphere_choices_file,
            std::path::Path::new(CHOICES_FILE)
        );
    }

    #[test]
    fn a_bad_download_is_refused() {
        let err = template(
            &Delivery::Bootstrap {
                url: "file:///x".into(),
                sha256: "ab".repeat(32),
            },
            None,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("--binary-url"), "{err}");
    }
}
