//! TurboVNC and VirtualGL from their vendors' repositories (GPU instances): the repository
//! definitions, the signing keys, the packages, and VirtualGL's EGL set-up — as a list of
//! steps, so what would be done can be shown and tested without doing it.
//!
//! Not run in this project's tests: packagecloud and GitHub are not reachable from its machines
//! and there is no GPU. The definitions follow the vendors' instructions (`TurboVNC/repo`,
//! `VirtualGL/repo`, `doc/unixconfig.txt`).

use std::path::PathBuf;

use crate::platform::os::Family;

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Download `url` and store it dearmored (binary OpenPGP) at `path` (apt keyring).
    Keyring {
        /// The armored key.
        url: String,
        /// Where apt's `signed-by` expects it.
        path: PathBuf,
    },
    /// Write `content` to `path` (0644).
    File {
        /// The file.
        path: PathBuf,
        /// Its text.
        content: String,
    },
    /// Download `url` to `path` (0644): a yum/dnf repository definition.
    Download {
        /// Where from.
        url: String,
        /// Where to.
        path: PathBuf,
    },
    /// Run a command (argv).
    Run(Vec<String>),
}

fn run(argv: &[&str]) -> Step {
    Step::Run(argv.iter().map(|s| (*s).to_owned()).collect())
}

/// The steps that install TurboVNC (and VirtualGL with `virtualgl`) on `family`.
pub fn install_steps(family: Family, virtualgl: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    match family {
        Family::Debian => {
            let mut products = vec![("turbovnc", "TurboVNC")];
            if virtualgl {
                products.push(("virtualgl", "VirtualGL"));
            }
            for (product, name) in &products {
                let keyring = PathBuf::from(format!("/etc/apt/trusted.gpg.d/{name}.gpg"));
                steps.push(Step::Keyring {
                    url: format!("https://packagecloud.io/dcommander/{product}/gpgkey"),
                    path: keyring.clone(),
                });
                steps.push(Step::File {
                    path: PathBuf::from(format!("/etc/apt/sources.list.d/{name}.list")),
                    content: format!(
                        "# Written by exoagent (GPU desktop): {name} from its vendor.\n\
                         deb [signed-by={}] https://packagecloud.io/dcommander/{product}/any/ any main\n",
                        keyring.display()
                    ),
                });
            }
            steps.push(run(&[
                "apt-get",
                "-o",
                "DPkg::Lock::Timeout=600",
                "update",
                "-q",
            ]));
            let mut install = vec![
                "apt-get",
                "-o",
                "DPkg::Lock::Timeout=600",
                "install",
                "-y",
                "-q",
                "turbovnc",
            ];
            if virtualgl {
                install.push("virtualgl");
            }
            steps.push(run(&install));
        }
        Family::RedHat => {
            let mut repos = vec!["TurboVNC"];
            if virtualgl {
                repos.push("VirtualGL");
            }
            for repo in &repos {
                steps.push(Step::Download {
                    url: format!("https://raw.githubusercontent.com/{repo}/repo/main/{repo}.repo"),
                    path: PathBuf::from(format!("/etc/yum.repos.d/{repo}.repo")),
                });
            }
            let mut install = vec!["dnf", "install", "-y", "turbovnc"];
            if virtualgl {
                install.push("VirtualGL");
            }
            steps.push(run(&install));
        }
    }
    if virtualgl {
        // EGL back end only (headless GPU, no 3D X server), unattended; the framebuffer stays
        // restricted to the vglusers group, which the desktop's user joins.
        steps.push(run(&[
            "/opt/VirtualGL/bin/vglserver_config",
            "+egl",
            "-s",
            "-f",
            "+t",
        ]));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_gets_signed_repositories_then_the_packages() {
        let steps = install_steps(Family::Debian, true);
        let list = steps
            .iter()
            .find_map(|s| match s {
                Step::File { path, content } if path.ends_with("TurboVNC.list") => Some(content),
                _ => None,
            })
            .unwrap();
        assert!(list.contains(
            "deb [signed-by=/etc/apt/trusted.gpg.d/TurboVNC.gpg] https://packagecloud.io/dcommander/turbovnc/any/ any main"
        ));
        assert!(
            matches!(&steps[0], Step::Keyring { url, .. } if url.ends_with("/turbovnc/gpgkey"))
        );
        let runs: Vec<_> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Run(argv) => Some(argv.join(" ")),
                _ => None,
            })
            .collect();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert!(runs[1].ends_with("install -y -q turbovnc virtualgl"));
        assert!(runs[2].contains("vglserver_config +egl"));
    }

    #[test]
    fn without_a_gpu_only_turbovnc_and_el_uses_the_vendor_repo_files() {
        let steps = install_steps(Family::RedHat, false);
        assert_eq!(
            steps,
            [
                Step::Download {
                    url: "https://raw.githubusercontent.com/TurboVNC/repo/main/TurboVNC.repo"
                        .into(),
                    path: "/etc/yum.repos.d/TurboVNC.repo".into()
                },
                run(&["dnf", "install", "-y", "turbovnc"]),
            ]
        );
    }
}
