//! The smallest edge app: load a student that `kiln train-student` made, run it on an image and
//! print what it found. No CLI and no training code: `kiln-models` is the only kiln dependency, and
//! the backend is a Cargo feature (`flex`: the CPU; `wgpu`: any GPU through Vulkan, Metal, DX12 or OpenGL).
//!
//! ```sh
//! cargo run --release -p kiln-models --example detect -- runs/student/weights/best.safetensors photo.jpg
//! cargo run --release -p kiln-models --features wgpu --example detect -- MODEL IMAGE --wgpu
//! ```

use std::time::Instant;

use kiln_models::device::{Backend, describe};
use kiln_models::{Detector, PredictOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, ..] = args.as_slice() else {
        eprintln!("usage: detect MODEL(.safetensors or run dir) IMAGE [--wgpu] [--conf 0.25]");
        std::process::exit(2);
    };
    let backend = if args.iter().any(|a| a == "--wgpu") { Backend::Wgpu } else { Backend::Cpu };
    let conf = match args.iter().position(|a| a == "--conf") {
        Some(i) => args.get(i + 1).ok_or("--conf needs a value")?.parse()?,
        None => 0.25,
    };

    // A missing GPU driver is an error that says what to install, not a panic.
    let detector = Detector::open(model, backend)?.with_options(PredictOptions { conf, ..Default::default() });
    let image = image::open(image)?.to_rgb8();
    let start = Instant::now();
    let detections = detector.predict(&image)?;
    println!(
        "{} objects in {:.1} ms on the {}",
        detections.len(),
        start.elapsed().as_secs_f64() * 1e3,
        describe(detector.device())
    );
    for d in &detections {
        let [x1, y1, x2, y2] = d.bbox;
        let area = d.mask.as_ref().map(|m| m.data.iter().filter(|&&v| v > 0).count());
        println!(
            "  {:<16} {:.2}  box [{x1:.0}, {y1:.0}, {x2:.0}, {y2:.0}]{}",
            d.class_name,
            d.score,
            area.map(|a| format!("  mask {a} px")).unwrap_or_default()
        );
    }
    Ok(())
}
