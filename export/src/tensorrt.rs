//! `kiln export --format tensorrt`: a TensorRT engine built from kiln's ONNX by NVIDIA's `trtexec`
//! when it is on PATH; without it, the ONNX is written and the exact command is printed, to run on
//! the device (a Jetson builds its own engines: they are specific to the GPU and TensorRT version).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ExportError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    /// Explicit quantisation: the Q/DQ nodes of a calibrated ONNX decide what runs in INT8.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" => Ok(Self::Fp32),
            "fp16" => Ok(Self::Fp16),
            "int8" => Ok(Self::Int8),
            _ => Err(format!("unknown precision '{s}': fp32, fp16 or int8")),
        }
    }
}

/// `trtexec --onnx=… --saveEngine=…` with the precision flags (INT8 keeps FP16 on for the layers
/// left in float, as TensorRT's explicit-quantisation guide does).
pub fn trtexec_arguments(onnx: &Path, engine: &Path, precision: Precision) -> Vec<String> {
    let mut arguments = vec![format!("--onnx={}", onnx.display()), format!("--saveEngine={}", engine.display())];
    match precision {
        Precision::Fp32 => {}
        Precision::Fp16 => arguments.push("--fp16".into()),
        Precision::Int8 => arguments.extend(["--int8".into(), "--fp16".into()]),
    }
    arguments
}

/// The command line as a user would type it (paths quoted when they need it).
pub fn command_line(arguments: &[String]) -> String {
    let quote = |a: &String| {
        if a.chars().any(|c| c.is_whitespace() || "'\"$`\\".contains(c)) {
            format!("'{}'", a.replace('\'', r"'\''"))
        } else {
            a.clone()
        }
    };
    std::iter::once("trtexec".to_string()).chain(arguments.iter().map(quote)).collect::<Vec<_>>().join(" ")
}

/// `trtexec` on PATH, if any.
pub fn find_trtexec() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("trtexec")).find(|p| p.is_file())
}

/// Runs `trtexec` to build `engine`; its output is kept beside the engine as `<engine>.log`.
pub fn build_engine(trtexec: &Path, arguments: &[String], engine: &Path) -> Result<(), ExportError> {
    let output = Command::new(trtexec)
        .args(arguments)
        .output()
        .map_err(|e| ExportError::Io { path: trtexec.to_path_buf(), message: format!("cannot run trtexec: {e}") })?;
    let log = engine.with_extension("engine.log");
    let mut text = output.stdout.clone();
    text.extend_from_slice(&output.stderr);
    let _ = std::fs::write(&log, &text);
    if !output.status.success() || !engine.is_file() {
        let tail: String = String::from_utf8_lossy(&text)
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        let _ = std::fs::remove_file(engine);
        return Err(ExportError::Io {
            path: engine.to_path_buf(),
            message: format!("trtexec failed ({}); full log in {}:\n{tail}", output.status, log.display()),
        });
    }
    Ok(())
}
