//! The devices kiln runs on, opened so that a missing driver or a failing device is an error with
//! advice, never a panic: the CPU (Burn's flex backend) and any GPU through wgpu (Vulkan, Metal,
//! DX12, or OpenGL where nothing else is there; Mesa's lavapipe and llvmpipe run both on a CPU).
//!
//! Burn reports most device failures lazily, at the next read-back (`try_into_data`), so every
//! read-back in kiln's libraries goes through [`read_floats`] / [`read_ints`], which name the
//! device and its adapter in the error.

use std::fmt;

use burn::tensor::kind::Basic;
use burn::tensor::{Device, Tensor, TensorData};

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// The CPU, through Burn's flex backend.
    #[default]
    Cpu,
    /// Any GPU through wgpu: Vulkan, Metal, DX12, or OpenGL as a fallback.
    Wgpu,
    /// LibTorch (Burn's tch backend): the first CUDA GPU when LibTorch was built with CUDA and one
    /// is present, LibTorch's CPU otherwise.
    Tch,
    /// LibTorch on the CPU.
    TchCpu,
    /// NVIDIA GPU `N` through Burn's CubeCL CUDA backend.
    Cuda(usize),
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Tch => "tch",
            Backend::TchCpu => "tch-cpu",
            Backend::Cuda(_) => "cuda",
        }
    }

    /// The Cargo feature a build needs for this backend.
    pub fn feature(self) -> &'static str {
        match self {
            Backend::Cpu => "flex",
            Backend::Wgpu => "wgpu",
            Backend::Tch | Backend::TchCpu => "tch",
            Backend::Cuda(_) => "cuda",
        }
    }

    /// Opens the device of this backend (for wgpu: once per process, see [`wgpu`]). A GPU that
    /// is not there is an error that says so, checked before any tensor is made (Burn's CUDA
    /// paths would panic at the first operation).
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Backend::Cpu => Ok(cpu()),
            Backend::Wgpu => wgpu(),
            Backend::Tch | Backend::TchCpu => libtorch(self == Backend::TchCpu),
            Backend::Cuda(index) => cuda(index),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Cuda(index) => write!(f, "cuda:{index}"),
            other => f.write_str(other.name()),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    /// `cpu`, `wgpu`, `tch`, `tch-cpu`, `cuda` or `cuda:N`.
    fn from_str(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" | "flex" => Ok(Backend::Cpu),
            "wgpu" => Ok(Backend::Wgpu),
            "tch" => Ok(Backend::Tch),
            "tch-cpu" => Ok(Backend::TchCpu),
            "cuda" => Ok(Backend::Cuda(0)),
            _ => match lower.strip_prefix("cuda:") {
                Some(index) if index.contains(',') => Err(format!(
                    "`{text}`: name one device here; several GPUs train one run in `kiln train-student` and \
                     `kiln train-teacher` (`--device cuda:0,1`)"
                )),
                Some(index) => index
                    .parse::<usize>()
                    .map(Backend::Cuda)
                    .map_err(|_| format!("`{text}`: the GPU index after `cuda:` must be a number, e.g. `cuda:1`")),
                None => Err(format!("`{text}` is not a device: use cpu, wgpu, tch, tch-cpu, cuda or cuda:N")),
            },
        }
    }
}

/// The devices of one training run: `cuda:0,1` (or `cuda:0,cuda:1`) for several NVIDIA GPUs
/// training together, or any one device. Each GPU once; several devices are CUDA GPUs.
pub fn parse_devices(text: &str) -> Result<Vec<Backend>, String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    if parts.len() == 1 {
        return Ok(vec![text.parse()?]);
    }
    let mut devices = Vec::new();
    for part in &parts {
        let backend = match (part.parse::<usize>(), devices.last()) {
            // `cuda:0,1`: a bare index continues the list of GPUs.
            (Ok(index), Some(Backend::Cuda(_))) => Backend::Cuda(index),
            _ => part.parse::<Backend>()?,
        };
        if !matches!(backend, Backend::Cuda(_)) {
            return Err(format!(
                "`{text}`: several devices in one run are NVIDIA GPUs (`cuda:0,1`); `{part}` is not one"
            ));
        }
        if devices.contains(&backend) {
            return Err(format!("`{text}`: {backend} is named twice; name each GPU once"));
        }
        devices.push(backend);
    }
    Ok(devices)
}

/// The rebuild that adds `feature`, for errors.
#[allow(dead_code)] // only the backends a build lacks use it
fn rebuild_with(feature: &str) -> String {
    // LibTorch must be there before the build: the script installs PyTorch 2.9.0's and says where.
    let libtorch = if feature == "tch" { "eval \"$(scripts/libtorch.sh)\" && " } else { "" };
    format!("{libtorch}cargo build --release -p kiln-cli --features {feature}")
}

/// LibTorch: its CPU, or its first CUDA GPU unless `cpu_only` (its CPU when it has none).
pub fn libtorch(cpu_only: bool) -> Result<Device, DeviceError> {
    #[cfg(feature = "tch")]
    #[allow(deprecated)] // burn-tch is deprecated upstream in favour of CubeCL, not removed.
    {
        if !cpu_only && !Device::enumerate(burn::tensor::DeviceType::LibTorch).is_empty() {
            return Ok(Device::libtorch_cuda(0));
        }
        Ok(Device::libtorch())
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = cpu_only;
        Err(DeviceError::NotBuilt { backend: "tch", rebuild: rebuild_with("tch") })
    }
}

/// CUDA GPU `index` through CubeCL, after checking that the driver is there and has that GPU.
pub fn cuda(index: usize) -> Result<Device, DeviceError> {
    #[cfg(feature = "cuda")]
    {
        let found = Device::enumerate(burn::tensor::DeviceType::Cuda).len();
        if found == 0 {
            return Err(DeviceError::NoGpu {
                backend: "cuda",
                reason: "no NVIDIA driver (libcuda.so) or no CUDA GPU found".into(),
            });
        }
        if index >= found {
            return Err(DeviceError::NoGpu {
                backend: "cuda",
                reason: format!("GPU {index} asked for, the machine has {found} (cuda:0 to cuda:{})", found - 1),
            });
        }
        Ok(Device::cuda(index))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = index;
        Err(DeviceError::NotBuilt { backend: "cuda", rebuild: rebuild_with("cuda") })
    }
}

/// A device that could not be opened or failed while running.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "no GPU adapter found for wgpu ({reason}): install a Vulkan, Metal, DX12 or OpenGL driver (on Linux \
         without a GPU, Mesa's lavapipe: `apt-get install mesa-vulkan-drivers`), or use --device cpu"
    )]
    NoAdapter { reason: String },
    #[error("this build of kiln has no {backend} backend: rebuild with `{rebuild}`, or use --device cpu")]
    NotBuilt { backend: &'static str, rebuild: String },
    #[error("--device {backend}: {reason}; use --device cpu (or wgpu for another GPU API)")]
    NoGpu { backend: &'static str, reason: String },
    #[error("the {device} failed{hint}: {reason}{advice}")]
    Execution { device: String, hint: String, reason: String, advice: String },
}

/// What wgpu says about the adapter it opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuAdapter {
    /// The adapter's name (`NVIDIA GeForce RTX 4090`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// The graphics API: `Vulkan`, `Metal`, `DX12`, `GL`, `WebGPU`.
    pub api: String,
    /// The driver and its version, as the driver reports them.
    pub driver: String,
    /// A CPU running the API in software (Mesa's lavapipe for Vulkan, llvmpipe for GL, WARP).
    pub software: bool,
    /// Whether shaders may compute in half precision (`shader-f16`).
    pub shader_f16: bool,
}

impl GpuAdapter {
    /// `Vulkan (Mesa lavapipe)`, `GL (Mesa llvmpipe)`, `Metal`: the API with the software driver named.
    pub fn api_and_driver(&self) -> String {
        let lower = format!("{} {}", self.name, self.driver).to_lowercase();
        let software = if lower.contains("lavapipe") || (self.software && self.api == "Vulkan") {
            " (Mesa lavapipe, on the CPU)"
        } else if lower.contains("llvmpipe") || lower.contains("softpipe") {
            " (Mesa llvmpipe, on the CPU)"
        } else if self.software {
            " (software, on the CPU)"
        } else {
            ""
        };
        format!("{}{software}", self.api)
    }
}

impl fmt::Display for GpuAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via {}", self.name, self.api_and_driver())?;
        if !self.shader_f16 {
            write!(f, ", no shader f16")?;
        }
        Ok(())
    }
}

/// The CPU device (flex), or Burn's default device in a build without flex.
pub fn cpu() -> Device {
    #[cfg(feature = "flex")]
    return Device::flex();
    #[cfg(not(feature = "flex"))]
    return Device::default();
}

/// Lets the C allocator keep the memory of freed tensors for the next ones (Linux with glibc;
/// elsewhere nothing). glibc maps every block over 128 KiB (a threshold it raises as such blocks
/// are freed) and hands freed memory at the heap's top back to the system once 128 KiB are free
/// there, so the megabyte-sized tensors a training step allocates and frees by the hundred came
/// back as fresh pages, each faulted in and zeroed by the kernel: about 5 % of a yolov8n-seg step
/// at 320 px, batch 8, on flex (341-351 -> 325-331 ms, measured alternately). Blocks up to 32 MiB
/// (glibc's largest heap threshold) now come from the heap, and up to 256 MiB of free memory stay
/// at its top. The process keeps what it freed, up to that, instead of its peak dropping back.
/// Called once by the `kiln` binary at start (and by the benches that time what it runs); calling
/// it again does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only sets the allocator's parameters; both values are within glibc's
            // accepted ranges (mmap threshold at most HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit).
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            }
        });
    }
}

/// The wgpu device on the machine's preferred adapter (a high-performance GPU first; the graphics
/// API is wgpu's choice: Vulkan, Metal or DX12, OpenGL where none of those has a driver). Opened
/// once per process and shared; an error says what to install.
pub fn wgpu() -> Result<Device, DeviceError> {
    #[cfg(feature = "wgpu")]
    {
        opened_wgpu().clone().map(|(device, _)| device)
    }
    #[cfg(not(feature = "wgpu"))]
    Err(DeviceError::NotBuilt { backend: "wgpu", rebuild: rebuild_with("wgpu") })
}

/// The adapter behind [`wgpu`]'s device (`None` when it was not opened, or failed to open).
pub fn wgpu_adapter() -> Option<GpuAdapter> {
    #[cfg(feature = "wgpu")]
    {
        opened_wgpu().as_ref().ok().map(|(_, adapter)| adapter.clone())
    }
    #[cfg(not(feature = "wgpu"))]
    None
}

#[cfg(feature = "wgpu")]
fn opened_wgpu() -> &'static Result<(Device, GpuAdapter), DeviceError> {
    static OPENED: std::sync::OnceLock<Result<(Device, GpuAdapter), DeviceError>> = std::sync::OnceLock::new();
    OPENED.get_or_init(open_wgpu)
}

#[cfg(feature = "wgpu")]
fn open_wgpu() -> Result<(Device, GpuAdapter), DeviceError> {
    use burn::tensor::wgpu::{WgpuInitError, wgpu};
    // Adapter discovery calls into the system's driver loaders, which may panic on a broken
    // install (a dangling ICD file, a driver that fails to initialise); that is the machine's
    // "no adapter", not kiln's bug.
    let opened = std::panic::catch_unwind(|| Device::wgpu_options().init_with_setup());
    let (device, setup) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(WgpuInitError::AdapterUnavailable { message, .. })) => {
            return Err(DeviceError::NoAdapter { reason: message });
        }
        Ok(Err(error)) => return Err(DeviceError::NoAdapter { reason: error.to_string() }),
        Err(panic) => return Err(DeviceError::NoAdapter { reason: panic_message(panic) }),
    };
    let info = setup.adapter.get_info();
    let driver = [info.driver.as_str(), info.driver_info.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let adapter = GpuAdapter {
        name: info.name.clone(),
        api: match info.backend {
            wgpu::Backend::Vulkan => "Vulkan",
            wgpu::Backend::Metal => "Metal",
            wgpu::Backend::Dx12 => "DX12",
            wgpu::Backend::Gl => "GL",
            wgpu::Backend::BrowserWebGpu => "WebGPU",
            _ => "unknown API",
        }
        .to_string(),
        driver,
        software: info.device_type == wgpu::DeviceType::Cpu,
        shader_f16: setup.adapter.features().contains(wgpu::Features::SHADER_F16),
    };
    Ok((device, adapter))
}

#[cfg(feature = "wgpu")]
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "the driver loader failed".into())
}

/// The device in words, for progress output and errors: `CPU (flex)`, `wgpu device (llvmpipe
/// (LLVM 15.0.6, 256 bits) via GL (Mesa llvmpipe, on the CPU), no shader f16)`.
pub fn describe(device: &Device) -> String {
    if *device == cpu() {
        return "CPU (flex)".into();
    }
    #[cfg(feature = "wgpu")]
    if let Ok((opened, adapter)) = opened_wgpu()
        && device == opened
    {
        return format!("wgpu device ({adapter})");
    }
    // Burn's own names: `Device<LibTorch(Cpu)>`, `Device<LibTorch(Cuda(0))>`, `Device<Cube(Cuda(..))>`.
    let debug = format!("{:?}", device.clone().without_autodiff());
    if debug.contains("LibTorch(Cpu)") {
        return "LibTorch CPU (tch)".into();
    }
    if let Some(rest) = debug.split("LibTorch(Cuda(").nth(1) {
        return format!("LibTorch CUDA GPU {} (tch)", rest.split(')').next().unwrap_or("?"));
    }
    if debug.contains("Cuda") {
        return format!("CUDA GPU (Burn's CubeCL CUDA backend: {debug})");
    }
    format!("device {debug}")
}

/// Reads a tensor back to the host: its values as `f32`, or the device's failure as an error.
pub fn read_floats<const D: usize, K: Basic>(tensor: Tensor<D, K>) -> Result<Vec<f32>, DeviceError> {
    let device = tensor.device();
    let data = read(tensor, &device)?;
    data.convert::<f32>().try_into_vec::<f32>().map_err(|e| execution_error(&device, format!("{e:?}")))
}

/// Reads a tensor back to the host: its values as `i64`, or the device's failure as an error.
pub fn read_ints<const D: usize, K: Basic>(tensor: Tensor<D, K>) -> Result<Vec<i64>, DeviceError> {
    let device = tensor.device();
    let data = read(tensor, &device)?;
    data.convert::<i64>().try_into_vec::<i64>().map_err(|e| execution_error(&device, format!("{e:?}")))
}

fn read<const D: usize, K: Basic>(tensor: Tensor<D, K>, device: &Device) -> Result<TensorData, DeviceError> {
    tensor.try_into_data().map_err(|e| execution_error(device, e.to_string()))
}

/// Runs a small convolution with a cast and reads it back: a device that cannot run kiln's models
/// fails here, at the start of a command, rather than in its middle.
pub fn check(device: &Device) -> Result<(), DeviceError> {
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    let device = device.clone().without_autodiff();
    let x: Tensor<4> =
        Tensor::from_data(TensorData::new((0..48).map(|v| v as f32 / 48.0).collect(), [1, 3, 4, 4]), &device);
    let weight: Tensor<4> = Tensor::ones([2, 3, 3, 3], &device);
    let y = conv2d(x, weight, None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
    let values = read_floats(burn::tensor::activation::sigmoid(y).sum())?;
    if values.len() == 1 && values[0].is_finite() {
        Ok(())
    } else {
        Err(execution_error(&device, format!("a test convolution read back {values:?}")))
    }
}

fn execution_error(device: &Device, reason: String) -> DeviceError {
    let reason = reason
        .trim_start_matches("An error happened during execution")
        .trim()
        .trim_start_matches("Caused by:")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let half = reason.contains("f16") || reason.contains("F16");
    let hint = match wgpu_adapter() {
        Some(adapter) if half && !adapter.shader_f16 => {
            " (it has no shader f16 and was asked to compute in half precision)".to_string()
        }
        _ => String::new(),
    };
    let advice = if *device == cpu() { String::new() } else { "; run on the CPU with --device cpu".into() };
    DeviceError::Execution { device: describe(device), hint, reason, advice }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_are_described_with_their_api_and_software_driver() {
        let lavapipe = GpuAdapter {
            name: "llvmpipe (LLVM 15.0.6, 256 bits)".into(),
            api: "Vulkan".into(),
            driver: "llvmpipe Mesa 22.3.6".into(),
            software: true,
            shader_f16: true,
        };
        assert_eq!(lavapipe.to_string(), "llvmpipe (LLVM 15.0.6, 256 bits) via Vulkan (Mesa lavapipe, on the CPU)");
        let gl = GpuAdapter { api: "GL".into(), driver: String::new(), shader_f16: false, ..lavapipe.clone() };
        assert_eq!(
            gl.to_string(),
            "llvmpipe (LLVM 15.0.6, 256 bits) via GL (Mesa llvmpipe, on the CPU), no shader f16"
        );
        let gpu = GpuAdapter {
            name: "NVIDIA H200".into(),
            api: "Vulkan".into(),
            driver: "NVIDIA 580".into(),
            software: false,
            shader_f16: true,
        };
        assert_eq!(gpu.to_string(), "NVIDIA H200 via Vulkan");
    }

    #[test]
    fn device_names_parse_and_print_back() {
        for (text, backend) in [
            ("cpu", Backend::Cpu),
            ("wgpu", Backend::Wgpu),
            ("tch", Backend::Tch),
            ("TCH-CPU", Backend::TchCpu),
            ("cuda", Backend::Cuda(0)),
            ("cuda:3", Backend::Cuda(3)),
        ] {
            assert_eq!(text.parse::<Backend>().unwrap(), backend, "{text}");
        }
        assert_eq!(Backend::Cuda(3).to_string(), "cuda:3");
        assert_eq!(Backend::TchCpu.to_string(), "tch-cpu");
        assert!("cuda:x".parse::<Backend>().unwrap_err().contains("must be a number"));
        assert!("cuda:0,1".parse::<Backend>().unwrap_err().contains("several GPUs"));
        assert!("tpu".parse::<Backend>().unwrap_err().contains("cpu, wgpu, tch, tch-cpu, cuda or cuda:N"));
    }

    /// The training commands' lists: several NVIDIA GPUs, each once, or one device of any kind.
    #[test]
    fn device_lists_name_several_gpus_once_each() {
        for (text, devices) in [
            ("cpu", vec![Backend::Cpu]),
            ("tch-cpu", vec![Backend::TchCpu]),
            ("cuda:0,1", vec![Backend::Cuda(0), Backend::Cuda(1)]),
            ("cuda:2, cuda:0", vec![Backend::Cuda(2), Backend::Cuda(0)]),
            ("cuda,1,3", vec![Backend::Cuda(0), Backend::Cuda(1), Backend::Cuda(3)]),
        ] {
            assert_eq!(parse_devices(text).unwrap(), devices, "{text}");
        }
        assert!(parse_devices("cpu,cuda:1").unwrap_err().contains("`cpu` is not one"));
        assert!(parse_devices("cuda:0,tch").unwrap_err().contains("NVIDIA GPUs"));
        assert!(parse_devices("cuda:1,1").unwrap_err().contains("named twice"));
        assert!(parse_devices("cuda:0,x").unwrap_err().contains("not a device"));
    }

    /// A GPU-less machine (this project's CI): a backend that is not built names the rebuild, one
    /// that is built but has no GPU says so; neither panics.
    #[test]
    fn gpu_backends_without_a_gpu_or_a_build_are_clear_errors() {
        match Backend::Cuda(0).open() {
            Err(DeviceError::NotBuilt { rebuild, .. }) => {
                assert!(!cfg!(feature = "cuda"));
                assert_eq!(rebuild, "cargo build --release -p kiln-cli --features cuda");
            }
            Err(error @ DeviceError::NoGpu { .. }) => {
                assert!(error.to_string().contains("--device cuda: no NVIDIA driver"), "{error}")
            }
            Err(other) => panic!("unexpected error: {other}"),
            // A machine with a CUDA GPU and a cuda build.
            Ok(device) => check(&device).unwrap(),
        }
        if !cfg!(feature = "tch") {
            let error = Backend::TchCpu.open().unwrap_err().to_string();
            let rebuild =
                "rebuild with `eval \"$(scripts/libtorch.sh)\" && cargo build --release -p kiln-cli --features tch`";
            assert!(error.contains(rebuild), "{error}");
        }
    }

    #[cfg(feature = "tch")]
    #[test]
    fn libtorch_on_the_cpu_runs_the_device_check() {
        let device = Backend::TchCpu.open().unwrap();
        assert_eq!(describe(&device), "LibTorch CPU (tch)");
        check(&device).unwrap();
    }

    #[test]
    fn the_cpu_runs_the_device_check() {
        assert_eq!(describe(&cpu()), "CPU (flex)");
        check(&cpu()).unwrap();
    }

    #[test]
    fn execution_errors_name_the_device_and_drop_burn_boilerplate() {
        let error = execution_error(&cpu(), "An error happened during execution\nCaused by:\n  out of memory".into());
        assert_eq!(error.to_string(), "the CPU (flex) failed: out of memory");
    }
}
