//! Deployment on a trained student (`tests/fixtures/students`, stored in half precision): the
//! `Detector` API, and `kiln infer` on wgpu (Mesa's lavapipe in CI, and once more on OpenGL alone,
//! which has no shader f16) giving flex's detections: same classes, boxes within 1e-2 px, scores
//! within 1e-3. Device failures (no driver, a computation the GPU cannot run) are errors.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use indicatif::ProgressBar;
use kiln_data::{SynthLabels, SynthOptions, synthesize};
use kiln_models::{Detector, PredictOptions};
use kiln_tests::{Scratch, fixture, in_child_test, no_gpu_driver_environment, run_test_in_child};

fn student() -> PathBuf {
    fixture("students/synth160_yolov8n_seg.safetensors")
}

/// Images of the student's domain (a synth seed it was not trained on).
fn images(dir: &Path) -> PathBuf {
    let options = SynthOptions {
        images: 10,
        classes: 3,
        size: 160,
        labels: SynthLabels::Both,
        seed: 11,
        max_objects: 2,
        ..Default::default()
    };
    synthesize(&options, dir, &ProgressBar::hidden()).unwrap().images_dir
}

#[test]
fn detector_finds_the_shapes_with_their_names() {
    let scratch = Scratch::new("detector");
    let dir = images(scratch.path());
    let detector = Detector::load(student(), &Device::flex()).unwrap();
    assert_eq!(detector.classes(), ["circle", "square", "triangle"]);
    assert_eq!(detector.imgsz, 160);
    let mut found = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let image = image::open(entry.unwrap().path()).unwrap().to_rgb8();
        for d in detector.predict(&image).unwrap() {
            assert_eq!(d.class_name, detector.classes()[d.class_id]);
            assert_eq!(d.category_id, d.class_id as u64 + 1);
            let mask = d.mask.expect("a segmentation student gives masks");
            assert_eq!((mask.width, mask.height), (image.width(), image.height()));
            assert!(d.bbox[0] < d.bbox[2] && d.bbox[1] < d.bbox[3] && d.bbox[2] <= image.width() as f32);
            found += 1;
        }
    }
    // 10 images with 1-2 shapes each; a trained student finds most of them.
    assert!(found >= 8, "only {found} detections");
}

#[test]
fn detector_refuses_a_file_that_is_not_a_student() {
    let scratch = Scratch::new("detector-bad");
    let not_student = scratch.path().join("weights.safetensors");
    std::fs::write(&not_student, b"not a safetensors file").unwrap();
    let error = Detector::load(&not_student, &Device::flex()).unwrap_err().to_string();
    assert!(error.contains("weights.safetensors"), "{error}");
    let error = Detector::load(scratch.path().join("missing"), &Device::flex()).unwrap_err().to_string();
    assert!(error.contains("no such weights file"), "{error}");
}

/// `kiln infer` on `device` finds what it finds on flex: the same detections in the same order,
/// boxes within 1e-2 px, scores within 1e-3.
#[cfg(any(feature = "wgpu", feature = "tch"))]
fn assert_infer_equals_flex(device: Device, name: &str) {
    use kiln_training::commands::{load_student, run_infer};
    let scratch = Scratch::new(&format!("infer-{name}"));
    let dir = images(&scratch.path().join("data"));
    let options = PredictOptions { conf: 0.25, ..Default::default() };
    let run = |device: Device, name: &str| {
        let student = load_student(&student(), &device).unwrap();
        let output = scratch.path().join(name);
        let summary =
            run_infer(&student, &dir, &output, &options, None, false, &device, &ProgressBar::hidden()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(summary.predictions).unwrap()).unwrap();
        json["annotations"].as_array().unwrap().clone()
    };
    let flex = run(Device::flex(), "flex");
    let other = run(device, name);
    assert!(flex.len() >= 8, "only {} detections on flex", flex.len());
    assert_eq!(flex.len(), other.len(), "detection counts differ");
    for (a, b) in flex.iter().zip(&other) {
        assert_eq!(a["image_id"], b["image_id"]);
        assert_eq!(a["category_id"], b["category_id"]);
        let boxes = |v: &serde_json::Value| -> Vec<f64> {
            v["bbox"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
        };
        for (p, q) in boxes(a).iter().zip(boxes(b)) {
            assert!((p - q).abs() <= 1e-2, "boxes differ: {a} vs {b}");
        }
        assert!((a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs() <= 1e-3, "{a} vs {b}");
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn infer_on_wgpu_equals_flex() {
    assert_infer_equals_flex(kiln_models::device::wgpu().unwrap(), "wgpu");
}

/// LibTorch on the CPU (`--device tch-cpu`), the backend CI can run without a GPU.
#[cfg(feature = "tch")]
#[test]
fn infer_on_libtorch_cpu_equals_flex() {
    assert_infer_equals_flex(kiln_models::Backend::TchCpu.open().unwrap(), "tch-cpu");
}

/// TensorRT through `trtexec`: the arguments for each precision, and a build that runs the tool,
/// keeps its log and leaves no engine behind when the tool fails (a stand-in `trtexec` script here;
/// this machine has no TensorRT).
#[test]
fn tensorrt_engine_is_built_by_trtexec_or_reported_as_a_failure() {
    use kiln_export::tensorrt::{Precision, build_engine, command_line, trtexec_arguments};
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new("trtexec");
    let (onnx, engine) = (scratch.path().join("my model.onnx"), scratch.path().join("best.engine"));
    let arguments = trtexec_arguments(&onnx, &engine, Precision::Int8);
    assert_eq!(arguments[2..], ["--int8", "--fp16"]);
    assert!(trtexec_arguments(&onnx, &engine, Precision::Fp16).ends_with(&["--fp16".to_string()]));
    assert!(command_line(&arguments).starts_with(&format!("trtexec '--onnx={}'", onnx.display())));

    let fake = scratch.path().join("trtexec");
    let script = "#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in --saveEngine=*) echo engine > \"${a#--saveEngine=}\";; esac; done\necho built\n";
    std::fs::write(&fake, script).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    build_engine(&fake, &arguments, &engine).unwrap();
    assert!(engine.is_file());
    assert!(std::fs::read_to_string(engine.with_extension("engine.log")).unwrap().contains("built"));

    std::fs::write(&fake, "#!/bin/sh\necho 'Error: unsupported layer' >&2\nexit 1\n").unwrap();
    let failed = scratch.path().join("failed.engine");
    let error = build_engine(&fake, &trtexec_arguments(&onnx, &failed, Precision::Fp16), &failed).unwrap_err();
    assert!(error.to_string().contains("unsupported layer"), "{error}");
    assert!(!failed.exists());
}

/// Burn's INT8 weights find the shapes on the CPU; on wgpu (where Burn 0.22's packed int8 weights
/// gave no detections at all) kiln refuses them with a message pointing to the INT8 export.
#[test]
fn int8_weights_run_on_flex_and_are_refused_on_wgpu() {
    let scratch = Scratch::new("int8-weights");
    let dir = images(scratch.path());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let pictures: Vec<_> = files.iter().take(4).map(|f| image::open(f).unwrap().to_rgb8()).collect();
    let detector = Detector::load(student(), &Device::flex()).unwrap().quantized_int8().unwrap();
    let found: usize = pictures.iter().map(|p| detector.predict(p).unwrap().len()).sum();
    assert!(found >= 3, "only {found} detections in 4 images with INT8 weights");
    #[cfg(feature = "wgpu")]
    {
        let error =
            Detector::load(student(), &kiln_models::device::wgpu().unwrap()).unwrap().quantized_int8().unwrap_err();
        assert!(error.contains("kiln export --int8"), "{error}");
    }
}

/// A machine without any GPU driver: the embedding API says what to install, no panic.
#[cfg(feature = "wgpu")]
#[test]
fn without_a_gpu_driver_the_detector_is_an_error_that_says_what_to_install() {
    use kiln_models::{Backend, DetectorError};
    if in_child_test() {
        let error = Detector::open(student(), Backend::Wgpu).unwrap_err();
        assert!(matches!(error, DetectorError::Device(_)), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("no GPU adapter found"), "{message}");
        assert!(message.contains("mesa-vulkan-drivers") && message.contains("--device cpu"), "{message}");
        // The CPU still works in the same process.
        let detector = Detector::open(student(), Backend::Cpu).unwrap();
        assert_eq!(detector.classes().len(), 3);
        return;
    }
    let child = run_test_in_child(
        "without_a_gpu_driver_the_detector_is_an_error_that_says_what_to_install",
        &no_gpu_driver_environment(),
    );
    let output = format!("{}{}", String::from_utf8_lossy(&child.stdout), String::from_utf8_lossy(&child.stderr));
    assert!(child.status.success() && output.contains("1 passed"), "{output}");
}

/// A computation the GPU cannot run fails at the read-back, as Burn reports device errors:
/// half precision on an adapter without shader f16 (OpenGL; CI runs this test there) is an
/// error naming the device and the missing feature; where the adapter has shader f16 (lavapipe,
/// most GPUs) the same computation is right.
#[cfg(feature = "wgpu")]
#[test]
fn half_precision_without_shader_f16_is_an_error_not_a_panic() {
    use burn::tensor::{DType, Tensor};
    use kiln_models::device::{read_floats, wgpu, wgpu_adapter};
    if !in_child_test() {
        // A device that failed may stay failed: the test runs in a process of its own.
        let child = run_test_in_child("half_precision_without_shader_f16_is_an_error_not_a_panic", &[]);
        let output = format!("{}{}", String::from_utf8_lossy(&child.stdout), String::from_utf8_lossy(&child.stderr));
        assert!(child.status.success() && output.contains("1 passed"), "{output}");
        return;
    }
    let device = wgpu().unwrap();
    let adapter = wgpu_adapter().unwrap();
    eprintln!("adapter: {adapter}");
    let half = Tensor::<1>::from_floats([0.5, 1.5, -2.0], &device).cast(DType::F16) * 2.0;
    let result = read_floats(half);
    if adapter.shader_f16 {
        assert_eq!(result.unwrap(), [1.0, 3.0, -4.0]);
    } else {
        let message = result.unwrap_err().to_string();
        eprintln!("error: {message}");
        assert!(message.contains("wgpu device") && message.contains("no shader f16"), "{message}");
        assert!(message.contains("--device cpu"), "{message}");
    }
    let scratch = Scratch::new("half-precision-child");
    let dir = images(scratch.path());
    let file = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    let image = image::open(file).unwrap().to_rgb8();
    // The failure does not poison the device: the student (its half-precision weights made
    // float32 on the host) still runs on it.
    let found = Detector::load(student(), &device).unwrap().predict(&image).unwrap();
    assert!(!found.is_empty() && found.iter().all(|d| d.score >= 0.25));
}

/// The student fixture is stored in half precision; loaded, every float parameter is float32
/// (converted on the host), so no device needs shader f16 to load it.
#[test]
fn half_precision_files_load_as_float32() {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::{DType, Tensor};
    let header = kiln_tests::safetensors_dtypes(&student());
    assert!(header.iter().any(|d| d == "F16"), "the fixture is stored in half precision: {header:?}");
    struct Dtypes(Vec<DType>);
    impl ModuleVisitor for Dtypes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().dtype());
        }
    }
    let detector = Detector::load(student(), &Device::flex()).unwrap();
    let mut dtypes = Dtypes(Vec::new());
    detector.model().visit(&mut dtypes);
    assert!(dtypes.0.len() > 100 && dtypes.0.iter().all(|d| *d == DType::F32), "{:?}", dtypes.0);
}
