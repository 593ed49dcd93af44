//! Where a flex training step spends its time, kernel by kernel and convolution by convolution,
//! when `KILN_PROFILE=1` (`benches/step_breakdown.rs` prints it beside the step's phases). Off, a
//! kernel call pays one relaxed atomic load.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

/// A kind of kiln kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    ConvForward,
    ConvInputGradient,
    ConvWeightGradient,
    ConvBiasGradient,
    NormForward,
    NormBackward,
}

const KERNELS: [(Kernel, &str); 6] = [
    (Kernel::ConvForward, "convolution forward"),
    (Kernel::ConvInputGradient, "convolution input gradient"),
    (Kernel::ConvWeightGradient, "convolution weight gradient"),
    (Kernel::ConvBiasGradient, "convolution bias gradient"),
    (Kernel::NormForward, "BatchNorm (+ SiLU) forward"),
    (Kernel::NormBackward, "BatchNorm (+ SiLU) backward"),
];

/// 0: not read yet, 1: on, 2: off.
static STATE: AtomicU8 = AtomicU8::new(0);
static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
/// Per convolution shape: (shape, multiply-adds of one call, nanoseconds and calls forward /
/// input gradient / weight gradient).
static CONVOLUTIONS: Mutex<Vec<(String, u64, [(u64, u64); 3])>> = Mutex::new(Vec::new());

/// Whether `KILN_PROFILE=1` (read once).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("KILN_PROFILE").is_ok_and(|v| v == "1");
            STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
        state => state == 1,
    }
}

/// Times its kernel until dropped.
pub struct Span {
    kernel: Kernel,
    start: Instant,
    convolution: Option<(String, u64)>,
}

/// A span for `kernel`, or None when profiling is off.
pub fn span(kernel: Kernel) -> Option<Span> {
    enabled().then(|| Span { kernel, start: Instant::now(), convolution: None })
}

/// A span for a convolution kernel, also counted under the convolution's shape (`describe` is
/// called only when profiling is on): (name, multiply-adds).
pub fn convolution_span(kernel: Kernel, describe: impl FnOnce() -> (String, u64)) -> Option<Span> {
    enabled().then(|| Span { kernel, start: Instant::now(), convolution: Some(describe()) })
}

impl Drop for Span {
    fn drop(&mut self) {
        let nanos = self.start.elapsed().as_nanos() as u64;
        let index = KERNELS.iter().position(|(k, _)| *k == self.kernel).unwrap_or(0);
        NANOS[index].fetch_add(nanos, Ordering::Relaxed);
        let column = match self.kernel {
            Kernel::ConvForward => 0,
            Kernel::ConvInputGradient => 1,
            Kernel::ConvWeightGradient => 2,
            _ => return,
        };
        let Some((name, macs)) = self.convolution.take() else { return };
        let Ok(mut table) = CONVOLUTIONS.lock() else { return };
        match table.iter_mut().find(|(n, m, _)| *n == name && *m == macs) {
            Some(row) => {
                row.2[column].0 += nanos;
                row.2[column].1 += 1;
            }
            None => {
                let mut times = [(0, 0); 3];
                times[column] = (nanos, 1);
                table.push((name, macs, times));
            }
        }
    }
}

/// Clears what was counted.
pub fn reset() {
    NANOS.iter().for_each(|n| n.store(0, Ordering::Relaxed));
    if let Ok(mut table) = CONVOLUTIONS.lock() {
        table.clear();
    }
}

/// What was counted, per `steps` steps: milliseconds per kernel, then per convolution shape
/// milliseconds (all layers of that shape together), layers of that shape, and multiply-adds per
/// second each way.
pub fn report(steps: usize) -> String {
    let steps = steps.max(1) as f64;
    let ms = |nanos: u64| nanos as f64 / 1e6 / steps;
    let mut out = String::from("kernel                                   ms per step\n");
    for ((_, name), nanos) in KERNELS.iter().zip(&NANOS) {
        out += &format!("{name:<40} {:8.1}\n", ms(nanos.load(Ordering::Relaxed)));
    }
    out += "\nconvolution (batch x c_in -> c_out, kernel, stride, input side), layers: \
            forward | input gradient | weight gradient, ms per step (G multiply-adds/s)\n";
    if let Ok(table) = CONVOLUTIONS.lock() {
        for (name, macs, times) in table.iter() {
            let layers = (times.iter().map(|t| t.1).max().unwrap_or(0) as f64 / steps).round();
            let cells: Vec<String> = times
                .iter()
                .map(|&(nanos, calls)| {
                    let rate = if nanos == 0 { 0.0 } else { *macs as f64 * calls as f64 / nanos as f64 };
                    format!("{:6.2} ({:3.0})", ms(nanos), rate)
                })
                .collect();
            out += &format!("{name:<30} {layers:>2} {}\n", cells.join(" | "));
        }
    }
    out
}
