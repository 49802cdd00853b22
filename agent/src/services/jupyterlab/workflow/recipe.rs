//! From a repository's files to a build plan, or a refusal naming the file and the reason: a
//! pure function of the file names and the contents of the few files whose content decides
//! (`runtime.txt`, `environment.yml`, `apt.txt`).
//!
//! repo2docker's rules followed here: a `binder/` (or `.binder/`) directory, when present, holds
//! the configuration files and the root's are ignored; `environment.yml` takes the place of
//! `requirements.txt`; a `Dockerfile` means the repository builds its own image.
//! <https://repo2docker.readthedocs.io/en/latest/config_files.html>

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::WorkflowError;

/// A Python `(major, minor)`.
pub type PythonVersion = (u32, u32);

/// The lowest Python the pinned JupyterLab runs on: the JupyterLab lock's (3.9, which gets
/// JupyterLab 4.5; 3.10 and newer get 4.6).
pub const MIN_PYTHON: (u32, u32) = super::super::MIN_PYTHON;

/// What the recipe reads: the names in the configuration directory and in the repository's
/// root, and the contents of the files whose content decides.
#[derive(Debug, Clone, Default)]
pub struct Files {
    /// File names in the configuration directory (`binder/`, `.binder/` or the root).
    pub config: BTreeSet<String>,
    /// File names in the repository's root (`setup.py`, `pyproject.toml` are read there).
    pub root: BTreeSet<String>,
    /// Contents of `runtime.txt`, `environment.yml`/`environment.yaml` and `apt.txt` in the
    /// configuration directory, by name.
    pub contents: BTreeMap<String, String>,
}

/// The build, in the order it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipe {
    /// `runtime.txt`'s (or `environment.yml`'s) Python `major.minor`; `None`: the system's.
    pub python: Option<(u32, u32)>,
    /// `apt.txt`'s packages (validated names).
    pub apt: Vec<String>,
    /// Install `requirements.txt` from the configuration directory.
    pub requirements: bool,
    /// Requirements translated from a pip-only `environment.yml` (pip requirement strings).
    pub environment: Vec<String>,
    /// Install the repository itself (`setup.py` or `pyproject.toml` in the root).
    pub project: bool,
    /// Run `postBuild` from the configuration directory.
    pub post_build: bool,
}

/// Files that mean something exoagent cannot do, and why.
const REFUSED: [(&str, &str); 9] = [
    (
        "Dockerfile",
        "the repository builds its own container image; exoagent runs no container runtime \
         (Docker): describe the environment with requirements.txt, runtime.txt, apt.txt and \
         postBuild instead",
    ),
    (
        "install.R",
        "R packages need R, which exoagent does not set up for workflows yet",
    ),
    (
        "DESCRIPTION",
        "an R package needs R, which exoagent does not set up for workflows yet",
    ),
    ("Project.toml", "Julia environments are not supported"),
    ("JuliaProject.toml", "Julia environments are not supported"),
    ("REQUIRE", "Julia environments are not supported"),
    (
        "default.nix",
        "Nix environments are not supported",
    ),
    (
        "Pipfile",
        "Pipenv is not supported; list the packages in requirements.txt",
    ),
    (
        "Pipfile.lock",
        "Pipenv is not supported; list the packages in requirements.txt",
    ),
];

/// The build plan for `files`, or the first convention that cannot be honoured.
pub fn plan(files: &Files) -> Result<Recipe, WorkflowError> {
    for (file, why) in REFUSED {
        if files.config.contains(file) {
            return Err(WorkflowError::Unsupported {
                file: file.to_owned(),
                why: why.to_owned(),
            });
        }
    }
    let mut recipe = Recipe::default();
    if let Some(text) = files.contents.get("runtime.txt") {
        recipe.python = Some(runtime_python(text)?);
    }
    let environment = ["environment.yml", "environment.yaml"]
        .into_iter()
        .find_map(|name| files.contents.get(name).map(|text| (name, text)));
    match environment {
        Some((name, text)) => {
            let (python, pip) = environment_requirements(name, text)?;
            if recipe.python.is_none() {
                recipe.python = python;
            }
            recipe.environment = pip;
        }
        None => recipe.requirements = files.config.contains("requirements.txt"),
    }
    if let Some(python) = recipe.python {
        if python < MIN_PYTHON {
            return Err(WorkflowError::Unsupported {
                file: "runtime.txt".into(),
                why: format!(
                    "Python {}.{} is older than {}.{}, the oldest the pinned JupyterLab runs on",
                    python.0, python.1, MIN_PYTHON.0, MIN_PYTHON.1
                ),
            });
        }
    }
    if let Some(text) = files.contents.get("apt.txt") {
        recipe.apt = apt_packages(text)?;
    }
    recipe.project = files.root.contains("setup.py") || files.root.contains("pyproject.toml");
    recipe.post_build = files.config.contains("postBuild");
    // `start` is looked for when JupyterLab launches (`START_SCRIPT`), not planned here.
    Ok(recipe)
}

/// `runtime.txt`: `python-X.Y` or `python-X.Y.Z` (repo2docker's form); R's `r-…` is refused.
pub fn runtime_python(text: &str) -> Result<(u32, u32), WorkflowError> {
    let line = text.trim();
    let invalid = |why: String| WorkflowError::Invalid {
        file: "runtime.txt".into(),
        why,
    };
    if line.starts_with("r-") {
        return Err(WorkflowError::Unsupported {
            file: "runtime.txt".into(),
            why: "asks for R, which exoagent does not set up for workflows yet".into(),
        });
    }
    let shown: String = line.chars().take(40).collect();
    let Some(version) = line.strip_prefix("python-") else {
        return Err(invalid(format!(
            "expected one line such as python-3.11, found {shown:?}"
        )));
    };
    let mut parts = version.split('.');
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    let patch_ok = parts.next().map_or(true, |p| p.parse::<u32>().is_ok());
    match (major, minor, patch_ok, parts.next()) {
        (Some(3), Some(minor), true, None) if minor < 100 => Ok((3, minor)),
        (Some(major), Some(_), true, None) if major != 3 => Err(WorkflowError::Unsupported {
            file: "runtime.txt".into(),
            why: format!("Python {major} is not supported (Python 3 only)"),
        }),
        _ => Err(invalid(format!(
            "expected one line such as python-3.11, found {shown:?}"
        ))),
    }
}

/// `apt.txt`: one Debian package name per line; `#` comments and blank lines skipped.
pub fn apt_packages(text: &str) -> Result<Vec<String>, WorkflowError> {
    let mut names = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if !valid_debian_name(line) {
            let shown: String = line.chars().take(40).collect();
            return Err(WorkflowError::Invalid {
                file: "apt.txt".into(),
                why: format!(
                    "line {}: {shown:?} is not a Debian package name (lowercase letters, digits, \
                     '+', '-', '.', starting with a letter or digit)",
                    i + 1
                ),
            });
        }
        if !names.iter().any(|n| n == line) {
            names.push(line.to_owned());
        }
    }
    Ok(names)
}

/// Debian policy §5.6.1: at least two characters of `[a-z0-9+.-]`, starting alphanumeric.
pub fn valid_debian_name(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
}

#[derive(Deserialize)]
struct Environment {
    #[serde(default)]
    channels: Vec<serde_norway::Value>,
    #[serde(default)]
    dependencies: Vec<serde_norway::Value>,
}

/// Conda packages that are the toolchain itself, not a dependency to install.
const CONDA_TOOLING: [&str; 3] = ["pip", "setuptools", "wheel"];

/// A pip-only `environment.yml`: the Python it asks for (`python=3.X`) and its dependencies as
/// pip requirements (plain `name`, `name=ver`, `name==ver`, `name>=ver`, and everything under
/// `pip:`). A channel-qualified, build-pinned or otherwise conda-only dependency is refused,
/// naming it; so is a channel other than `conda-forge`/`defaults`.
pub fn environment_requirements(
    file: &str,
    text: &str,
) -> Result<(Option<PythonVersion>, Vec<String>), WorkflowError> {
    let invalid = |why: String| WorkflowError::Invalid {
        file: file.to_owned(),
        why,
    };
    let unsupported = |why: String| WorkflowError::Unsupported {
        file: file.to_owned(),
        why,
    };
    let env: Environment =
        serde_norway::from_str(text).map_err(|e| invalid(format!("not a conda environment file: {e}")))?;
    for channel in &env.channels {
        match channel.as_str() {
            Some("conda-forge" | "defaults") => {}
            other => {
                return Err(unsupported(format!(
                    "channel {:?} is conda-only; only packages pip can install are supported",
                    other.unwrap_or("?")
                )))
            }
        }
    }
    let mut python = None;
    let mut pip = Vec::new();
    for dep in &env.dependencies {
        match dep {
            serde_norway::Value::String(spec) => {
                let spec = spec.trim();
                let name_end = spec
                    .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
                    .unwrap_or(spec.len());
                let (name, constraint) = spec.split_at(name_end);
                let constraint = constraint.trim();
                if name.is_empty() {
                    return Err(unsupported(format!("{spec:?} is not a plain package name")));
                }
                if name == "python" {
                    python = Some(conda_python(file, constraint)?);
                    continue;
                }
                if CONDA_TOOLING.contains(&name) {
                    continue;
                }
                pip.push(pip_requirement(name, constraint).ok_or_else(|| {
                    unsupported(format!(
                        "{spec:?} is a conda-only dependency (a build string, channel or \
                         conda version syntax); only packages pip can install are supported"
                    ))
                })?);
            }
            serde_norway::Value::Mapping(map) => {
                for (key, value) in map {
                    if key.as_str() != Some("pip") {
                        return Err(unsupported(format!(
                            "{:?} is a conda-only dependency section; only `pip:` is supported",
                            key.as_str().unwrap_or("?")
                        )));
                    }
                    let Some(list) = value.as_sequence() else {
                        return Err(invalid("`pip:` must be a list".into()));
                    };
                    for item in list {
                        let Some(req) = item.as_str() else {
                            return Err(invalid("`pip:` entries must be strings".into()));
                        };
                        let req = req.trim();
                        // pip options (`-r`, `--index-url`, `-e`) could reach outside the
                        // repository; only requirement specifiers are taken.
                        if req.starts_with('-') || req.is_empty() {
                            return Err(unsupported(format!(
                                "pip option {:?} is not supported in environment.yml; \
                                 use requirements.txt",
                                req.chars().take(40).collect::<String>()
                            )));
                        }
                        pip.push(req.to_owned());
                    }
                }
            }
            _ => return Err(invalid("dependencies must be strings or a `pip:` list".into())),
        }
    }
    Ok((python, pip))
}

/// `python=3.11`, `python=3.11.4`, `python==3.11`, `python>=3.10` (then the system's).
fn conda_python(file: &str, constraint: &str) -> Result<(u32, u32), WorkflowError> {
    let version = constraint.trim_start_matches(['=', '>', '<', '~', '!']);
    runtime_python(&format!("python-{}", version.trim_end_matches(".*"))).map_err(|_| {
        WorkflowError::Unsupported {
            file: file.to_owned(),
            why: format!("python{constraint} is not a Python version exoagent can provide"),
        }
    })
}

/// A conda `name[=|==|>=|<=]version` as a pip requirement; `None` for conda-only syntax
/// (build strings, `|`, wildcards beyond a trailing `.*`, channel prefixes).
fn pip_requirement(name: &str, constraint: &str) -> Option<String> {
    if constraint.is_empty() {
        return Some(name.to_owned());
    }
    let (op, version) = if let Some(v) = constraint.strip_prefix("==") {
        ("==", v)
    } else if let Some(v) = constraint.strip_prefix(">=") {
        (">=", v)
    } else if let Some(v) = constraint.strip_prefix("<=") {
        ("<=", v)
    } else if let Some(v) = constraint.strip_prefix('=') {
        ("==", v)
    } else {
        return None;
    };
    let version = version.strip_suffix(".*").unwrap_or(version);
    let plain = !version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.');
    if !plain {
        return None;
    }
    // conda's `=1.2` means 1.2.*, pip's `==1.2` means exactly 1.2(.0): keep conda's meaning.
    if op == "==" && !constraint.starts_with("==") {
        return Some(format!("{name}=={version}.*"));
    }
    Some(format!("{name}{op}{version}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(config: &[&str], contents: &[(&str, &str)]) -> Files {
        let config: BTreeSet<String> = config.iter().map(|s| s.to_string()).collect();
        Files {
            root: config.clone(),
            config,
            contents: contents
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn requirements_runtime_postbuild_and_start_are_planned() {
        let r = plan(&files(
            &["requirements.txt", "runtime.txt", "postBuild", "start", "README.md"],
            &[("runtime.txt", "python-3.11\n")],
        ))
        .unwrap();
        assert_eq!(
            r,
            Recipe {
                python: Some((3, 11)),
                requirements: true,
                post_build: true,
                ..Recipe::default()
            }
        );
        // Nothing at all: JupyterLab on the system's Python.
        assert_eq!(plan(&files(&["README.md"], &[])).unwrap(), Recipe::default());
    }

    #[test]
    fn the_project_is_installed_from_the_root() {
        for file in ["setup.py", "pyproject.toml"] {
            let mut f = files(&[], &[]);
            f.root.insert(file.into());
            assert!(plan(&f).unwrap().project, "{file}");
        }
        // Only the root's count (a binder/setup.py is not the project).
        let mut f = files(&[], &[]);
        f.config.insert("setup.py".into());
        assert!(!plan(&f).unwrap().project);
    }

    #[test]
    fn refusals_name_the_file() {
        for file in ["Dockerfile", "install.R", "Project.toml", "REQUIRE", "DESCRIPTION"] {
            let e = plan(&files(&[file, "requirements.txt"], &[])).unwrap_err();
            assert_eq!(e.reason(), "workflow-unsupported", "{file}");
            assert!(e.to_string().contains(file), "{e}");
        }
        let e = plan(&files(&["Dockerfile"], &[])).unwrap_err();
        assert!(e.to_string().contains("Docker"), "{e}");
    }

    #[test]
    fn runtime_txt_is_parsed_strictly() {
        assert_eq!(runtime_python("python-3.11").unwrap(), (3, 11));
        assert_eq!(runtime_python("python-3.12.4\n").unwrap(), (3, 12));
        assert_eq!(runtime_python("  python-3.10  ").unwrap(), (3, 10));
        for bad in ["python3.11", "python-3", "python-3.x", "3.11", "python-3.11.1.1", ""] {
            let e = runtime_python(bad).unwrap_err();
            assert_eq!(e.reason(), "workflow-invalid", "{bad}");
            assert!(e.to_string().contains("runtime.txt"), "{e}");
        }
        assert_eq!(runtime_python("python-2.7").unwrap_err().reason(), "workflow-unsupported");
        assert_eq!(runtime_python("r-4.1-2022-01-01").unwrap_err().reason(), "workflow-unsupported");
        // Too old for the pinned JupyterLab.
        let e = plan(&files(&["runtime.txt"], &[("runtime.txt", "python-3.8")])).unwrap_err();
        assert_eq!(e.reason(), "workflow-unsupported");
        assert!(e.to_string().contains("3.8"), "{e}");
        // Debian 11's 3.9 is not: the lock has pins for it.
        let recipe = plan(&files(&["runtime.txt"], &[("runtime.txt", "python-3.9")])).unwrap();
        assert_eq!(recipe.python, Some((3, 9)));
    }

    #[test]
    fn apt_txt_skips_comments_and_refuses_bad_names() {
        let text = "# tools\ngraphviz\n\n  libxml2-dev  # for lxml\ng++\ngraphviz\n";
        assert_eq!(apt_packages(text).unwrap(), ["graphviz", "libxml2-dev", "g++"]);
        for bad in ["Graphviz", "-o=x", "a", "pkg;rm", "pkg name", "../x", "pkg$"] {
            let e = apt_packages(&format!("ok-pkg\n{bad}\n")).unwrap_err();
            assert_eq!(e.reason(), "workflow-invalid", "{bad}");
            assert!(e.to_string().contains("apt.txt") && e.to_string().contains("line 2"), "{e}");
        }
        let r = plan(&files(&["apt.txt"], &[("apt.txt", "curl\n")])).unwrap();
        assert_eq!(r.apt, ["curl"]);
    }

    #[test]
    fn a_pip_only_environment_yml_is_translated() {
        let text = "name: demo\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n  - numpy=1.26\n  - six==1.16.0\n  - requests>=2\n  - pip\n  - toolz\n  - pip:\n    - rich==13.7.1\n";
        let r = plan(&files(
            &["environment.yml", "requirements.txt"],
            &[("environment.yml", text)],
        ))
        .unwrap();
        assert_eq!(r.python, Some((3, 11)));
        assert_eq!(
            r.environment,
            ["numpy==1.26.*", "six==1.16.0", "requests>=2", "toolz", "rich==13.7.1"]
        );
        // environment.yml takes requirements.txt's place, as in repo2docker.
        assert!(!r.requirements);
    }

    #[test]
    fn a_conda_only_environment_yml_is_refused_naming_the_package() {
        for (text, named) in [
            ("dependencies:\n  - numpy=1.26=py311h0\n", "numpy=1.26=py311h0"),
            ("dependencies:\n  - conda-forge::gdal\n", "conda-forge::gdal"),
            ("dependencies:\n  - r-base>=4|r-base<5\n", "r-base"),
            ("channels:\n  - bioconda\ndependencies:\n  - samtools\n", "bioconda"),
            ("dependencies:\n  - pip:\n    - --index-url=http://evil\n", "--index-url"),
        ] {
            let e = environment_requirements("environment.yml", text).unwrap_err();
            assert_eq!(e.reason(), "workflow-unsupported", "{text}");
            let msg = e.to_string();
            assert!(msg.contains("environment.yml") && msg.contains(named), "{msg}");
        }
        let e = environment_requirements("environment.yml", "dependencies: [").unwrap_err();
        assert_eq!(e.reason(), "workflow-invalid");
    }
}
