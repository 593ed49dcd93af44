//! How much memory a run will take, said before it starts (and checked against the measured peak
//! when it ends): the program and its data as they stand, the optimiser's state and the EMA copy
//! from the parameter counts, and one training step's peak (forward, the autodiff graph, backward,
//! gradients) measured on the run's own model, data and device at batch 1 and 2 and extrapolated
//! linearly to the batch size. Measuring the step instead of modelling each layer keeps one
//! mechanism for every model (YOLOv8, SAM, GroundingDINO) and every backend's own way of keeping
//! activations.
//!
//! On the CPU the step's bytes are counted by [`CountingAllocator`], which the `kiln` binary
//! installs as its global allocator; a GPU's come from the device's memory pools. Without either
//! (a library user's own binary), the step is "not measured" and the estimate says so.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use burn::train::TrainStep;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting the bytes live and their peak (two relaxed atomics per call).
pub struct CountingAllocator;

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        new
    }
}

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
    INSTALLED.store(true, Ordering::Relaxed);
}

/// Whether [`CountingAllocator`] is this process's allocator (it has counted something).
pub fn counting() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Bytes live on the heap now (with [`CountingAllocator`] installed).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Starts a new peak at the bytes live now, and returns them.
fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// This process's resident memory now (Linux), in bytes.
pub fn resident_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

/// This process's peak resident memory since it started or since [`reset_peak_resident`] (Linux).
pub fn peak_resident_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Starts the peak resident memory afresh (Linux; `/proc/self/clear_refs`), so a run's peak is
/// its own and not an earlier run's in the same process. Whether it could.
pub fn reset_peak_resident() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Hands the heap's free pages back to the system (glibc keeps what a large step freed).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only returns free pages to the system; it has no
        // preconditions.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// What the run will keep besides the model and one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    pub batch_size: usize,
    /// Tensors the optimiser keeps per trainable parameter (AdamW 2, SGD with momentum 1).
    pub optimizer_slots: usize,
    /// Gradient accumulation keeps the summed gradients between steps.
    pub accumulates: bool,
    /// An exponential moving average of the weights (the student's EMA) is kept beside them.
    pub ema: bool,
}

/// One step's peak above what was live before it, at batch 1 and 2.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepProbe {
    pub fixed_bytes: u64,
    pub per_image_bytes: u64,
}

/// The estimate printed before a run, and the figure it is checked against after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// Where the step was measured: `host` (the CPU's heap) or `device` (a GPU's memory pools).
    pub measured_on: String,
    pub batch_size: usize,
    pub parameters: usize,
    pub trainable_parameters: usize,
    /// The process as it stands before training: the program, its data, the model's weights.
    pub program_and_data_bytes: u64,
    /// Of which on the heap (with [`CountingAllocator`]; the rest is code, stacks and the
    /// allocator's slack).
    #[serde(default)]
    pub heap_bytes: u64,
    pub optimizer_bytes: u64,
    pub ema_bytes: u64,
    pub accumulation_bytes: u64,
    /// One step's peak at batch 1 and 2 (none: not measurable in this process).
    pub step: Option<StepProbe>,
    pub total_bytes: u64,
}

impl MemoryEstimate {
    pub fn step_bytes(&self) -> Option<u64> {
        self.step.map(|s| s.fixed_bytes + s.per_image_bytes * self.batch_size as u64)
    }

    /// One line for the start of a run.
    pub fn render(&self) -> String {
        let step = match self.step {
            Some(s) => format!(
                "one step at batch {} {} ({} + {} per image)",
                self.batch_size,
                human(self.step_bytes().unwrap_or(0)),
                human(s.fixed_bytes),
                human(s.per_image_bytes)
            ),
            None => "one step: not measured (no counting allocator in this program)".into(),
        };
        let resident = if self.measured_on == "device" {
            format!("weights {}", human(self.parameters as u64 * 4))
        } else {
            format!("program and data {}", human(self.program_and_data_bytes))
        };
        let mut parts = vec![
            resident,
            format!(
                "optimiser state {} ({} of {} parameters train)",
                human(self.optimizer_bytes),
                count(self.trainable_parameters),
                count(self.parameters)
            ),
        ];
        if self.ema_bytes > 0 {
            parts.push(format!("EMA {}", human(self.ema_bytes)));
        }
        if self.accumulation_bytes > 0 {
            parts.push(format!("accumulated gradients {}", human(self.accumulation_bytes)));
        }
        parts.push(step);
        let place = if self.measured_on == "device" { "on the device" } else { "of memory" };
        format!("memory estimate: {} {place} = {}", human(self.total_bytes), parts.join(" + "))
    }
}

impl MemoryEstimate {
    /// The estimate part by part, one per line (for `--dry-run`).
    pub fn render_parts(&self) -> String {
        let mut out = format!(
            "memory estimate: {}{}\n",
            human(self.total_bytes),
            if self.measured_on == "device" { " on the device" } else { "" }
        );
        let mut line = |what: &str, bytes: u64, how: String| {
            out.push_str(&format!("  {what:<24}{:>10}  {how}\n", human(bytes)));
        };
        if self.measured_on == "device" {
            line("weights", self.parameters as u64 * 4, format!("{} parameters, f32", count(self.parameters)));
        } else {
            line("program and data", self.program_and_data_bytes, "resident now, the model's weights included".into());
        }
        line(
            "optimiser state",
            self.optimizer_bytes,
            format!("{} trainable parameters of {}", count(self.trainable_parameters), count(self.parameters)),
        );
        if self.ema_bytes > 0 {
            line("EMA of the weights", self.ema_bytes, "one copy".into());
        }
        if self.accumulation_bytes > 0 {
            line("accumulated gradients", self.accumulation_bytes, "one copy of the trainable ones".into());
        }
        match self.step {
            Some(s) => line(
                &format!("one step, batch {}", self.batch_size),
                self.step_bytes().unwrap_or(0),
                format!(
                    "{} + {} per image (activations, gradients; measured at batch 1 and 2)",
                    human(s.fixed_bytes),
                    human(s.per_image_bytes)
                ),
            ),
            None => out.push_str("  one step                not measured (no counting allocator in this program)\n"),
        }
        out
    }
}

/// Bytes as people read them (binary units, 3 significant figures).
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.0} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

fn count(n: usize) -> String {
    if n >= 1_000_000 { format!("{:.1} M", n as f64 / 1e6) } else { format!("{:.1} k", n as f64 / 1e3) }
}

/// Parameters of `module`: all of them, and those that train.
pub fn parameter_counts<M: Module>(module: &M) -> (usize, usize) {
    #[derive(Default)]
    struct Counter {
        total: usize,
        trainable: usize,
    }
    impl ModuleVisitor for Counter {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.lazy_shape().num_elements();
            self.total += n;
            if param.is_require_grad() {
                self.trainable += n;
            }
        }
    }
    let mut counter = Counter::default();
    module.visit(&mut counter);
    (counter.total, counter.trainable)
}

/// Where a step's bytes are counted.
enum Meter {
    /// The CPU's heap, through [`CountingAllocator`].
    Host,
    /// A GPU's memory pools: they keep the pages a step needed, so what they reserve after it
    /// is its peak.
    Device(Device),
}

impl Meter {
    fn on(device: &Device) -> Option<Meter> {
        if device.memory_pool_usage().is_some_and(|u| u.bytes_reserved > 0) {
            Some(Meter::Device(device.clone()))
        } else {
            counting().then_some(Meter::Host)
        }
    }

    fn place(&self) -> &'static str {
        match self {
            Meter::Host => "host",
            Meter::Device(_) => "device",
        }
    }

    /// Starts counting a step: the level its peak is measured from.
    fn start(&self) -> u64 {
        match self {
            Meter::Host => reset_peak() as u64,
            Meter::Device(device) => device.memory_pool_usage().map_or(0, |u| u.bytes_reserved),
        }
    }

    fn peak(&self) -> u64 {
        match self {
            Meter::Host => peak_bytes() as u64,
            Meter::Device(device) => device.memory_pool_usage().map_or(0, |u| u.bytes_reserved),
        }
    }
}

/// The estimate for training `model` with `plan`: one warm-up step at batch 1 (first-use
/// allocations of the backend), then batch 1 and batch 2 measured. The batches come from
/// `batch_of(n)`, the run's own data as its loader would give it.
pub fn estimate<M>(
    model: &M,
    batch_of: impl Fn(usize) -> Result<M::Input, TrainError>,
    plan: MemoryPlan,
    device: &Device,
) -> Result<MemoryEstimate, TrainError>
where
    M: TrainStep + Module,
{
    let (parameters, trainable) = parameter_counts(model);
    // The run's measured peak starts here, not at an earlier run of the same process.
    reset_peak_resident();
    let program_and_data = resident_bytes().unwrap_or(live_bytes() as u64);
    let heap_bytes = live_bytes() as u64;
    let meter = Meter::on(device);
    let step = match &meter {
        Some(meter) => {
            // A copy with its own BatchNorm running statistics (`train` gives each a new
            // state; the tensors are shared, not copied): the probe's steps leave the run's
            // model as it was.
            let model = model.valid().train();
            let mut peaks = Vec::new();
            // At batch 1 the step itself is measured: a probe at 2 would be larger than the run.
            let sizes: &[usize] = if plan.batch_size == 1 { &[1, 1] } else { &[1, 1, 2] };
            // A GPU's pools keep what the warm-up reserved, so its steps are measured from before it.
            let device_base = meter.start();
            for (i, &images) in sizes.iter().enumerate() {
                let start = match meter {
                    Meter::Host => meter.start(),
                    Meter::Device(_) => device_base,
                };
                drop(model.step(batch_of(images)?));
                if i > 0 {
                    peaks.push(meter.peak().saturating_sub(start));
                }
            }
            // The run's own peaks start after the probe, without what the allocator kept of it.
            release_free_memory();
            reset_peak();
            reset_peak_resident();
            match peaks[..] {
                [one, two] => {
                    let per_image = two.saturating_sub(one);
                    Some(StepProbe { fixed_bytes: one.saturating_sub(per_image), per_image_bytes: per_image })
                }
                _ => Some(StepProbe { fixed_bytes: 0, per_image_bytes: peaks[0] }),
            }
        }
        None => None,
    };
    let measured_on = meter.as_ref().map_or("host", Meter::place).to_string();
    let float = 4u64;
    let optimizer_bytes = plan.optimizer_slots as u64 * trainable as u64 * float;
    let ema_bytes = if plan.ema { parameters as u64 * float } else { 0 };
    let accumulation_bytes = if plan.accumulates { trainable as u64 * float } else { 0 };
    let mut estimate = MemoryEstimate {
        measured_on,
        batch_size: plan.batch_size,
        parameters,
        trainable_parameters: trainable,
        program_and_data_bytes: program_and_data,
        heap_bytes,
        optimizer_bytes,
        ema_bytes,
        accumulation_bytes,
        step,
        total_bytes: 0,
    };
    // On a GPU the program and its data stay on the host: the device holds the weights, the
    // optimiser's state and the step.
    let resident_part = if estimate.measured_on == "device" { parameters as u64 * float } else { program_and_data };
    estimate.total_bytes =
        resident_part + optimizer_bytes + ema_bytes + accumulation_bytes + estimate.step_bytes().unwrap_or(0);
    Ok(estimate)
}

/// The estimate a run makes when it starts, printed with its settings (none when it resumes: it
/// keeps its first). `training_images` caps the batch: a batch holds at most the whole training
/// set (none for a dry run, whose set is cut short; its command capped the batch already).
pub fn estimate_at_start<M>(
    model: &M,
    batch_of: impl Fn(usize) -> Result<M::Input, TrainError>,
    mut plan: MemoryPlan,
    training_images: Option<usize>,
    device: &Device,
    resuming: bool,
    verbosity: super::Verbosity,
) -> Result<Option<MemoryEstimate>, TrainError>
where
    M: TrainStep + Module,
{
    if resuming {
        return Ok(None);
    }
    if let Some(images) = training_images {
        plan.batch_size = plan.batch_size.min(images.max(1));
    }
    let estimate = estimate(model, batch_of, plan, device)?;
    if verbosity == super::Verbosity::Progress {
        eprintln!("{}", estimate.render());
    }
    Ok(Some(estimate))
}

/// `memory.json` of a run: the estimate made before it and the peak measured after.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryRecord {
    pub estimate: MemoryEstimate,
    /// Peak resident memory of the process over the run (Linux `VmHWM`), when known.
    pub measured_peak_bytes: Option<u64>,
    /// Peak of the bytes allocated on the heap over the run (with [`CountingAllocator`]): the
    /// part of the resident peak that is the program's own data, not its code, stacks or the
    /// allocator's slack.
    pub measured_peak_heap_bytes: Option<u64>,
    /// What the device's memory pools hold at the end of the run (a GPU's pools keep the pages
    /// its largest step needed: its peak), when the run was on one.
    #[serde(default)]
    pub measured_device_bytes: Option<u64>,
}

impl MemoryRecord {
    /// The record of a run that has just ended with `estimate`.
    pub fn now(estimate: MemoryEstimate, device: &Device) -> Self {
        Self {
            estimate,
            measured_peak_bytes: peak_resident_bytes(),
            measured_peak_heap_bytes: counting().then(|| peak_bytes() as u64),
            measured_device_bytes: device.memory_pool_usage().map(|u| u.bytes_reserved).filter(|&b| b > 0),
        }
    }
}

impl MemoryRecord {
    /// The closing line: measured against estimated.
    pub fn render(&self) -> Option<String> {
        let (measured, place) = if self.estimate.measured_on == "device" {
            (self.measured_device_bytes?, " on the device")
        } else {
            (self.measured_peak_bytes?, "")
        };
        let ratio = self.estimate.total_bytes as f64 / measured.max(1) as f64;
        Some(format!(
            "memory: peak {}{place} measured, {} estimated ({:+.0} %)",
            human(measured),
            human(self.estimate.total_bytes),
            (ratio - 1.0) * 100.0
        ))
    }
}

/// The scratch directory of a dry run (`--dry-run`): the run is built as for real inside it, on
/// the first few images, and the directory is removed when this is dropped, so the user's output
/// is never touched.
pub struct DryRunDir(std::path::PathBuf);

impl DryRunDir {
    pub fn new(command: &str) -> Result<Self, TrainError> {
        let path = std::env::temp_dir().join(format!("kiln-dry-run-{command}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for DryRunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Images a dry run keeps of each training set (a mosaic draws from four).
pub const DRY_RUN_IMAGES: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_leaves_no_directory_behind() {
        let path = {
            let dir = DryRunDir::new("test").unwrap();
            std::fs::write(dir.path().join("file"), b"x").unwrap();
            dir.path().to_path_buf()
        };
        assert!(!path.exists());
    }

    #[test]
    fn bytes_read_as_people_read_them() {
        assert_eq!(human(512 * 1024), "512 KiB");
        assert_eq!(human(300 * 1024 * 1024), "300 MiB");
        assert_eq!(human(3 * 1024 * 1024 * 1024 / 2), "1.50 GiB");
    }
}
