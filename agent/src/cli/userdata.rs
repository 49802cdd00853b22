//! `exoagent userdata`: print cloud-init userdata for a set of choices (for launchers other
//! than Exosphere, and for the tests).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use crate::delivery::exosphere;
use crate::delivery::userdata::{render, Choices, Delivery, PackageFormat, DEFAULT_WAIT};
use crate::model::ServiceKind;

/// How the agent reaches the instance.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeliveryArg {
    /// The image already has exoagent and its unit.
    Baked,
    /// A stock image: download the binary (or a .deb/.rpm package) at boot and check its
    /// SHA-256.
    Bootstrap,
}

/// Which package tool installs a bootstrap's package.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PackageFormatArg {
    /// A .deb, installed with apt-get.
    Deb,
    /// An .rpm, installed with dnf (rpm without it).
    Rpm,
}

/// Arguments of `exoagent userdata`.
#[derive(Debug, Args)]
pub struct UserdataArgs {
    /// How exoagent gets onto the instance.
    #[arg(long, value_enum, default_value = "baked")]
    pub delivery: DeliveryArg,
    /// With `--delivery bootstrap`: where to download the binary.
    #[arg(long, value_name = "URL")]
    pub binary_url: Option<String>,
    /// With `--delivery bootstrap`: the binary's SHA-256.
    #[arg(long, value_name = "HEX")]
    pub binary_sha256: Option<String>,
    /// With `--delivery bootstrap`, instead of a binary: where to download exoagent's .deb or
    /// .rpm, installed with the distribution's package tool.
    #[arg(long, value_name = "URL", conflicts_with = "binary_url")]
    pub package_url: Option<String>,
    /// With `--package-url`: the package's SHA-256.
    #[arg(long, value_name = "HEX", conflicts_with = "binary_sha256")]
    pub package_sha256: Option<String>,
    /// With `--package-url`: deb or rpm (default: from the URL's extension).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub package_format: Option<PackageFormatArg>,
    /// A service to enable (repeatable).
    #[arg(long = "service", value_name = "NAME", default_value = "jupyterlab",
          value_parser = crate::cli::ServiceParser)]
    pub services: Vec<ServiceKind>,
    /// A clouds.yaml to install, so the agent reports to Nova (keep it restricted: see
    /// docs/openstack.md).
    #[arg(long, value_name = "FILE")]
    pub clouds_yaml: Option<PathBuf>,
    /// The cloud in that clouds.yaml.
    #[arg(long, default_value = "openstack")]
    pub cloud_name: String,
    /// An SSH public key for the distribution's default user (repeatable).
    #[arg(long = "ssh-public-key", value_name = "KEY")]
    pub ssh_public_keys: Vec<String>,
    /// Do not update and upgrade OS packages at first boot.
    #[arg(long)]
    pub no_os_updates: bool,
    /// Make `cloud-init status --wait` return only once exoagent's setup is complete or has
    /// failed (cloud-init then reports the failure); `--cloud-init-waits=false` turns it off.
    /// Default: off, on with --exosphere-template.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub cloud_init_waits: Option<bool>,
    /// How long cloud-init waits at most ("1800", "30m", "1h").
    #[arg(long, value_name = "DURATION", value_parser = crate::cli::status::parse_duration)]
    pub wait_timeout: Option<std::time::Duration>,
    /// Print the drop-in for Exosphere's user-data template instead, with Exosphere's
    /// placeholders for the key, OS updates, its choices and credentials (docs/exosphere.md).
    #[arg(
        long,
        conflicts_with_all = ["services", "clouds_yaml", "ssh_public_keys", "no_os_updates"]
    )]
    pub exosphere_template: bool,
}

/// Render and print; exit 2 with the offending option on bad input.
pub async fn run(args: UserdataArgs) -> anyhow::Result<ExitCode> {
    let delivery = match delivery(&args) {
        Ok(delivery) => delivery,
        Err(message) => return usage(&message),
    };
    let waits = args.cloud_init_waits.unwrap_or(args.exosphere_template);
    let cloud_init_waits = match (waits, args.wait_timeout) {
        (true, timeout) => Some(timeout.unwrap_or(DEFAULT_WAIT)),
        (false, None) => None,
        (false, Some(_)) => return usage("--wait-timeout: only when cloud-init waits"),
    };
    if cloud_init_waits.is_some_and(|t| t.is_zero()) {
        return usage("--wait-timeout: must be longer than 0s");
    }
    if args.exosphere_template {
        return match exosphere::template(&delivery, cloud_init_waits) {
            Ok(text) => {
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => usage(&e.to_string()),
        };
    }
    let clouds_yaml = match &args.clouds_yaml {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some((text, args.cloud_name.clone())),
            Err(e) => return usage(&format!("--clouds-yaml: '{}': {e}", path.display())),
        },
    };
    let choices = Choices {
        delivery,
        services: args.services,
        clouds_yaml,
        ssh_authorized_keys: args.ssh_public_keys,
        install_os_updates: !args.no_os_updates,
        cloud_init_waits,
    };
    match render(&choices) {
        Ok(text) => {
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => usage(&e.to_string()),
    }
}

/// The delivery the options describe, or what is wrong with them.
fn delivery(args: &UserdataArgs) -> Result<Delivery, String> {
    let binary = (args.binary_url.clone(), args.binary_sha256.clone());
    let package = (args.package_url.clone(), args.package_sha256.clone());
    match (args.delivery, binary, package) {
        (DeliveryArg::Baked, (None, None), (None, None)) if args.package_format.is_none() => {
            Ok(Delivery::Baked)
        }
        (DeliveryArg::Baked, _, _) => Err(
            "--binary-url/--binary-sha256/--package-url/--package-sha256/--package-format: \
             only with --delivery bootstrap"
                .into(),
        ),
        (DeliveryArg::Bootstrap, (Some(url), Some(sha256)), (None, None))
            if args.package_format.is_none() =>
        {
            Ok(Delivery::Bootstrap { url, sha256 })
        }
        (DeliveryArg::Bootstrap, (None, None), (Some(url), Some(sha256))) => {
            let format = match args.package_format {
                Some(PackageFormatArg::Deb) => PackageFormat::Deb,
                Some(PackageFormatArg::Rpm) => PackageFormat::Rpm,
                None => PackageFormat::from_url(&url).ok_or_else(|| {
                    format!("--package-format: '{url}' ends in neither .deb nor .rpm; say which")
                })?,
            };
            Ok(Delivery::Package {
                url,
                sha256,
                format,
            })
        }
        (DeliveryArg::Bootstrap, _, _) => Err("--delivery bootstrap needs --binary-url and \
             --binary-sha256, or --package-url and --package-sha256"
            .into()),
    }
}

fn usage(message: &str) -> anyhow::Result<ExitCode> {
    eprintln!("exoagent userdata: {message}");
    Ok(ExitCode::from(2))
}
