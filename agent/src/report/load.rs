//! Load sampling for Exosphere's resource charts: CPU, memory and root filesystem use, and GPU
//! utilisation through NVML where the NVIDIA driver is installed, else `nvidia-smi` when it is
//! present.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::Nvml;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::platform::exec::find_on_path;

/// How long `nvidia-smi` may take before the GPU figure is reported as unknown.
const GPU_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The NVML library the driver installs (the unversioned `.so` comes only with development
/// packages). It is dlopened at run time: the binary has no link-time dependency on it.
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// Where GPU figures come from.
#[derive(Clone)]
pub enum GpuQuery {
    /// NVML, loaded from the driver's library.
    Nvml(Arc<Nvml>),
    /// An `nvidia-smi`-compatible executable.
    Smi(PathBuf),
    /// No GPU figures (reported as `null`).
    None,
}

impl std::fmt::Debug for GpuQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nvml(_) => f.write_str("Nvml"),
            Self::Smi(path) => f.debug_tuple("Smi").field(path).finish(),
            Self::None => f.write_str("None"),
        }
    }
}

impl GpuQuery {
    /// NVML from `library` when it loads and initialises (the driver is present), else `smi`
    /// (`nvidia-smi`), else nothing.
    pub fn detect(library: &OsStr, smi: Option<PathBuf>) -> Self {
        match Nvml::builder().lib_path(library).init() {
            Ok(nvml) => Self::Nvml(Arc::new(nvml)),
            Err(e) => {
                tracing::debug!(target: "exoagent::report", error = %e, "NVML not available; nvidia-smi is used if present");
                smi.map_or(Self::None, Self::Smi)
            }
        }
    }

    /// Per-GPU utilisation, `None` when unknown.
    async fn utilisation(&self) -> Option<Vec<u8>> {
        match self {
            Self::Nvml(nvml) => {
                let nvml = Arc::clone(nvml);
                // NVML calls are blocking ioctls into the driver.
                tokio::task::spawn_blocking(move || nvml_utilisation(&nvml))
                    .await
                    .ok()
                    .flatten()
            }
            Self::Smi(exe) => query_gpus(exe).await,
            Self::None => None,
        }
    }
}

/// Every device's utilisation as NVML reports it; `None` if any device cannot be read.
fn nvml_utilisation(nvml: &Nvml) -> Option<Vec<u8>> {
    let count = nvml.device_count().ok()?;
    let values: Option<Vec<u8>> = (0..count)
        .map(|i| {
            let rates = nvml.device_by_index(i).ok()?.utilization_rates().ok()?;
            Some(percent(f64::from(rates.gpu)))
        })
        .collect();
    values.filter(|v| !v.is_empty())
}

/// One load sample, already rounded to the integers Exosphere requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSample {
    /// Seconds since the Unix epoch (load lines use seconds, status lines milliseconds).
    pub epoch_s: u64,
    /// CPU use in percent since the previous sample.
    pub cpu_pct: u8,
    /// Memory in use (total minus available) in percent.
    pub mem_pct: u8,
    /// Root filesystem use in percent, computed like `df`.
    pub rootfs_pct: u8,
    /// Per-GPU utilisation; `None` when there is no GPU or it cannot be queried.
    pub gpu_pct: Option<Vec<u8>>,
}

/// Takes load samples. CPU use is measured over the time since the previous sample (the first
/// one covers the time since the sampler was created), which is what a once-a-minute chart
/// wants; only CPU and memory are refreshed, never the process table, to keep the agent small.
pub struct LoadSampler {
    root: PathBuf,
    system: System,
    gpu_query: GpuQuery,
}

impl std::fmt::Debug for LoadSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSampler")
            .field("root", &self.root)
            .field("gpu_query", &self.gpu_query)
            .finish()
    }
}

impl LoadSampler {
    /// A sampler for the filesystem at `root`, with NVML from the driver, else `nvidia-smi`
    /// looked up on `PATH`.
    pub fn new(root: &Path) -> Self {
        let gpu_query = GpuQuery::detect(OsStr::new(NVML_LIBRARY), find_on_path("nvidia-smi"));
        Self::with_gpu_query(root, gpu_query)
    }

    /// A sampler using `gpu_query` for GPU figures.
    pub fn with_gpu_query(root: &Path, gpu_query: GpuQuery) -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Self {
            root: root.to_path_buf(),
            system,
            gpu_query,
        }
    }

    /// Take a sample now.
    pub async fn sample(&mut self) -> LoadSample {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let cpu_pct = percent(f64::from(self.system.global_cpu_usage()));
        let total = self.system.total_memory();
        let available = self.system.available_memory();
        let mem_pct = if total == 0 {
            0
        } else {
            percent(100.0 * (total.saturating_sub(available)) as f64 / total as f64)
        };
        let rootfs_pct = rootfs_percent(&self.root).unwrap_or(0);
        let gpu_pct = self.gpu_query.utilisation().await;
        LoadSample {
            epoch_s: crate::state::now_ms() / 1000,
            cpu_pct,
            mem_pct,
            rootfs_pct,
            gpu_pct,
        }
    }
}

/// A percentage rounded and clamped to 0..=100.
fn percent(value: f64) -> u8 {
    if value.is_nan() {
        return 0;
    }
    value.round().clamp(0.0, 100.0) as u8
}

/// Used space like `df`: (blocks - free) / (blocks - free + available to unprivileged users).
fn rootfs_percent(root: &Path) -> Option<u8> {
    let stat = nix::sys::statvfs::statvfs(root).ok()?;
    let (used, total) = crate::alerts::df_blocks(&stat);
    if total == 0 {
        return Some(0);
    }
    Some(percent(100.0 * used as f64 / total as f64))
}

/// Parse `nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits` output.
pub fn parse_gpu_utilisation(output: &str) -> Option<Vec<u8>> {
    let values: Option<Vec<u8>> = output
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| line.parse::<f64>().ok().map(percent))
        .collect();
    values.filter(|v| !v.is_empty())
}

async fn query_gpus(exe: &Path) -> Option<Vec<u8>> {
    let mut command = tokio::process::Command::new(exe);
    command
        .args([
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(GPU_QUERY_TIMEOUT, command.output())
        .await
        .ok()?
        .ok()?;
    if !output.status.success() {
        return None;
    }
    parse_gpu_utilisation(&String::from_utf8_lossy(&output.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_output_parses_per_gpu_and_rejects_garbage() {
        assert_eq!(parse_gpu_utilisation("12\n 99 \n"), Some(vec![12, 99]));
        assert_eq!(parse_gpu_utilisation("150\n"), Some(vec![100]));
        assert_eq!(parse_gpu_utilisation(""), None);
        assert_eq!(parse_gpu_utilisation("No devices were found\n"), None);
    }

    #[test]
    fn percentages_are_clamped_integers() {
        assert_eq!(percent(-3.0), 0);
        assert_eq!(percent(49.5), 50);
        assert_eq!(percent(f64::NAN), 0);
        assert_eq!(percent(1e9), 100);
    }

    #[tokio::test]
    async fn a_sample_of_this_machine_is_in_range_and_has_no_gpu_without_a_query() {
        let mut sampler = LoadSampler::with_gpu_query(Path::new("/"), GpuQuery::None);
        let sample = sampler.sample().await;
        assert!(sample.cpu_pct <= 100 && sample.mem_pct <= 100);
        assert!(sample.mem_pct > 0, "some memory is always in use");
        assert!(sample.rootfs_pct > 0, "the root filesystem is not empty");
        assert_eq!(sample.gpu_pct, None);
        assert!(sample.epoch_s > 1_700_000_000);
    }

    #[tokio::test]
    async fn a_gpu_query_executable_is_used_when_given() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("nvidia-smi");
        std::fs::write(&exe, "#!/bin/sh\necho 7\necho 93\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut sampler = LoadSampler::with_gpu_query(Path::new("/"), GpuQuery::Smi(exe));
        assert_eq!(sampler.sample().await.gpu_pct, Some(vec![7, 93]));
    }

    /// A fake `nvidia-smi` printing `lines`, in `dir`.
    fn fake_smi(dir: &Path, lines: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let exe = dir.join("nvidia-smi");
        std::fs::write(&exe, format!("#!/bin/sh\nprintf '{lines}'\n")).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        exe
    }

    #[tokio::test]
    async fn without_nvml_nvidia_smi_is_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let smi = fake_smi(dir.path(), "41\\n");
        // No NVIDIA driver here: neither the driver's library nor a missing path loads.
        for library in [NVML_LIBRARY, "/nonexistent/libnvidia-ml.so.1"] {
            let query = GpuQuery::detect(OsStr::new(library), Some(smi.clone()));
            assert!(matches!(&query, GpuQuery::Smi(p) if *p == smi), "{query:?}");
            let mut sampler = LoadSampler::with_gpu_query(Path::new("/"), query);
            assert_eq!(sampler.sample().await.gpu_pct, Some(vec![41]));
        }
    }

    #[tokio::test]
    async fn without_nvml_and_nvidia_smi_there_is_no_gpu_figure() {
        // A library that exists but is not NVML (no nvmlInit_v2) is refused the same way.
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("libc.so.6");
        for library in [NVML_LIBRARY, libc] {
            let query = GpuQuery::detect(OsStr::new(library), None);
            assert!(matches!(query, GpuQuery::None), "{library}: {query:?}");
            let mut sampler = LoadSampler::with_gpu_query(Path::new("/"), query);
            assert_eq!(sampler.sample().await.gpu_pct, None);
        }
    }
}
