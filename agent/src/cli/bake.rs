//! `exoagent bake`: pre-install service payloads into an image (run inside the image's root,
//! e.g. in a chroot or an image build hook).

use std::process::ExitCode;

use clap::Args;

use crate::agent::Mode;
use crate::delivery::bake::bake;
use crate::model::ServiceKind;
use crate::paths::Paths;

/// Arguments of `exoagent bake`.
#[derive(Debug, Args)]
pub struct BakeArgs {
    /// A service to bake (repeatable); default: those enabled in the configuration.
    #[arg(long = "service", value_name = "NAME", value_parser = crate::cli::ServiceParser)]
    pub services: Vec<ServiceKind>,
}

/// Bake and say what was done.
pub async fn run(args: BakeArgs, mode: Mode, paths: Paths) -> anyhow::Result<ExitCode> {
    match bake(mode, paths, &args.services).await {
        Ok(baked) => {
            let names: Vec<&str> = baked.services.iter().map(|s| s.as_str()).collect();
            println!("baked: {}", names.join(", "));
            if !baked.packages.is_empty() {
                let items: Vec<String> = baked.packages.iter().map(ToString::to_string).collect();
                println!("packages: {}", items.join(" "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("exoagent bake: {}: {e}", e.reason());
            Ok(ExitCode::FAILURE)
        }
    }
}
