//! The `kiln` binary as a user runs it: reports, exit codes, files written and files left alone.

use std::path::Path;
use std::process::{Command, Output};

use kiln_tests::{Scratch, coco8_dir};

fn kiln(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(cwd).output().expect("run kiln")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn validate_coco8_seg_derives_every_box_and_area_and_reports() {
    let scratch = Scratch::new("cli-coco8");
    let input = coco8_dir().join("annotations.json");
    let before = std::fs::read(&input).unwrap();
    let out = scratch.path().join("splits");
    let output =
        kiln(&["validate", "--data", input.to_str().unwrap(), "--output-dir", out.to_str().unwrap()], scratch.path());
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", text(&output.stderr));
    for expected in [
        "valid COCO JSON",
        "8 listed, 8 found, 8 readable",
        "Boxes        0 given, 30 derived from masks",
        "Areas        30 derived from masks",
        "person",
        "SAM (box prompt -> masks)",
        "Student      yolov8n-seg",
        "Next         kiln train-teacher --data",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    assert_eq!(std::fs::read(&input).unwrap(), before, "the input is never modified");
    let repaired: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("annotations.repaired.json")).unwrap()).unwrap();
    let annotations = repaired["annotations"].as_array().unwrap();
    assert_eq!(annotations.len(), 30);
    assert!(
        annotations.iter().all(|a| a["bbox"].as_array().map(Vec::len) == Some(4) && a["area"].as_f64().unwrap() > 0.0)
    );
    for part in ["train.json", "val.json", "test.json"] {
        assert!(out.join(part).is_file(), "{part}");
    }

    // Running again refuses to replace what is there, and says how to proceed.
    let again =
        kiln(&["validate", "--data", input.to_str().unwrap(), "--output-dir", out.to_str().unwrap()], scratch.path());
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("refusing to overwrite"), "{}", text(&again.stderr));
}

#[test]
fn validate_json_report_is_machine_readable() {
    let scratch = Scratch::new("cli-json");
    let input = coco8_dir().join("annotations.json");
    let out = scratch.path().join("o");
    let output = kiln(
        &["validate", "--data", input.to_str().unwrap(), "--output-dir", out.to_str().unwrap(), "--json"],
        scratch.path(),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    assert_eq!(report["ok"], true);
    assert_eq!(report["summary"]["images"], 8);
    assert_eq!(report["summary"]["has_masks"], true);
    assert_eq!(report["repair"]["bbox_from_mask"], 30);
    assert_eq!(report["recommendation"]["student"], "yolov8n-seg");
    assert_eq!(report["split"]["parts"].as_array().unwrap().len(), 3);
}

#[test]
fn malformed_file_exits_non_zero_with_a_clear_message() {
    let scratch = Scratch::new("cli-malformed");
    let path = scratch.path().join("export.json");
    std::fs::write(&path, "{\"images\": [], \"annotations\": [}").unwrap();
    let output = kiln(&["validate", "--data", "export.json"], scratch.path());
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("export.json") && stderr.contains("not valid COCO JSON") && stderr.contains("line 1"),
        "{stderr}"
    );
    assert!(!scratch.path().join("splits").exists(), "no partial output");

    let output = kiln(&["validate", "--data", "missing.json"], scratch.path());
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("missing.json: no such file"), "{}", text(&output.stderr));

    let output = kiln(&["validate", "--data", "export.json", "--split", "train:0.5,val:0.2"], scratch.path());
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("ratios sum to 0.7"), "{}", text(&output.stderr));
}

#[test]
fn data_errors_exit_non_zero_and_list_the_problems() {
    let scratch = Scratch::new("cli-data-errors");
    let input = coco8_dir().join("annotations.json");
    let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&input).unwrap()).unwrap();
    value["annotations"][3]["category_id"] = serde_json::json!(4242);
    let path = scratch.path().join("bad.json");
    std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
    let images = coco8_dir().join("images");
    let output = kiln(&["validate", "--data", "bad.json", "--images", images.to_str().unwrap()], scratch.path());
    assert_eq!(output.status.code(), Some(1));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("unknown_category") && stdout.contains("annotation 4 (category 4242)"), "{stdout}");
    assert!(stdout.contains("nothing was written"));
    assert!(!scratch.path().join("splits").exists());
}

/// `kiln demo` (small settings) runs the five steps in one experiment directory and ends with the
/// optimize report; a second demo takes a fresh directory and never touches the first.
#[test]
fn demo_runs_the_whole_chain_into_one_experiment_directory() {
    let scratch = Scratch::new("cli-demo");
    let args = [
        "demo",
        "--output",
        "runs/demo",
        "--num-images",
        "30",
        "--size",
        "96",
        "--classes",
        "2",
        "--max-objects",
        "2",
        "--imgsz",
        "96",
        "--epochs",
        "2",
        "--teacher-epochs",
        "1",
    ];
    let first = kiln(&args, scratch.path());
    let stdout = text(&first.stdout);
    assert!(first.status.success(), "{stdout}\n{}", text(&first.stderr));
    for expected in [
        "kiln synth: 30 images",
        "[2/5] kiln validate --data runs/demo/data/annotations.json --name runs/demo",
        "[3/5] kiln train-teacher --name runs/demo --sam tiny --gdino tiny_minilm",
        "[4/5] kiln train-student --name runs/demo",
        "[5/5] kiln optimize --name runs/demo",
        "| ONNX INT8 Q/DQ | `model.int8.onnx` |",
        "kiln demo: done in",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    let run = scratch.path().join("runs/demo");
    for file in [
        "splits/train.json",
        "splits/unl.json",
        "splits/metadata.json",
        "teachers/teacher_config.yaml",
        "student/weights/best.safetensors",
        "student/distillation_config.yaml",
        "optimized/report.md",
        "optimized/model.fp16.onnx",
    ] {
        assert!(run.join(file).is_file(), "{file}");
    }
    let before = contents(&run);
    let second = kiln(
        &["demo", "--output", "runs/demo", "--num-images", "12", "--size", "64", "--validate-only"],
        scratch.path(),
    );
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(scratch.path().join("runs/demo2/splits/train.json").is_file(), "a second run takes a fresh directory");
    assert_eq!(contents(&run), before, "a second run never touches the first");
}

/// The four commands chained through `experiments/NAME` with no path but the data file: each step
/// finds the previous one's output (splits and images, teachers and the unlabelled split, the
/// student and the splits it recorded); a second validate of the same name is refused.
#[test]
fn four_commands_chain_through_an_experiment_name() {
    let scratch = Scratch::new("cli-chain");
    let step = |args: &[&str]| {
        let output = kiln(args, scratch.path());
        let stdout = text(&output.stdout);
        assert!(output.status.success(), "kiln {}:\n{stdout}\n{}", args.join(" "), text(&output.stderr));
        stdout
    };
    step(&[
        "synth",
        "--output",
        "shapes",
        "--num-images",
        "30",
        "--classes",
        "2",
        "--size",
        "96",
        "--max-objects",
        "2",
    ]);
    let validated = step(&[
        "validate",
        "--data",
        "shapes/annotations.json",
        "--name",
        "shapes",
        "--split",
        "train:0.3,unl:0.4,val:0.3",
    ]);
    assert!(validated.contains("kiln train-teacher --name experiments/shapes"), "{validated}");
    let experiment = scratch.path().join("experiments/shapes");
    let metadata: serde_json::Value =
        serde_json::from_slice(&std::fs::read(experiment.join("splits/metadata.json")).unwrap()).unwrap();
    assert!(Path::new(metadata["images"].as_str().unwrap()).ends_with("shapes/images"), "{metadata}");
    step(&[
        "train-teacher",
        "--name",
        "shapes",
        "--sam",
        "tiny",
        "--gdino",
        "tiny_minilm",
        "--imgsz",
        "96",
        "--epochs",
        "1",
    ]);
    assert!(experiment.join("teachers/sam_lora").is_dir() && experiment.join("teachers/grounding_dino_lora").is_dir());
    let trained = step(&[
        "train-student",
        "--name",
        "shapes",
        "--imgsz",
        "96",
        "--epochs",
        "2",
        "--set",
        "nbs=8",
        "--set",
        "distill.box_threshold=0.05",
        "--set",
        "distill.text_threshold=0.05",
    ]);
    assert!(trained.contains("experiments/shapes/student"), "{trained}");
    let distillation = std::fs::read_to_string(experiment.join("student/distillation_config.yaml")).unwrap();
    assert!(distillation.contains("unl.json"), "taught on the experiment's unlabelled split:\n{distillation}");
    let optimized =
        step(&["optimize", "--name", "shapes", "--runs", "2", "--calibration-images", "4", "--no-onnxruntime"]);
    assert!(
        optimized.contains("experiments/shapes/splits/val.json"),
        "scored on the experiment's val split:\n{optimized}"
    );
    assert!(experiment.join("optimized/report.json").is_file());

    // The same name again: refused, nothing overwritten.
    let before = contents(&experiment.join("splits"));
    let again = kiln(&["validate", "--data", "shapes/annotations.json", "--name", "shapes"], scratch.path());
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("refusing to overwrite"), "{}", text(&again.stderr));
    assert_eq!(contents(&experiment.join("splits")), before);
}

#[test]
fn help_explains_every_command() {
    let output = kiln(&["--help"], Path::new("."));
    let stdout = text(&output.stdout);
    for command in ["validate", "synth", "demo"] {
        assert!(stdout.contains(command), "{stdout}");
    }
    let output = kiln(&["validate", "--help"], Path::new("."));
    let stdout = text(&output.stdout);
    for flag in ["--data", "--images", "--split", "--stratify", "--seed", "--output-dir", "--json"] {
        assert!(stdout.contains(flag), "{flag} in {stdout}");
    }
    let output = kiln(&["train-student", "--help"], Path::new("."));
    let stdout = text(&output.stdout);
    for flag in ["--teachers", "--unlabeled", "--gdino-weights", "--sam-weights", "distill.KEY=VALUE"] {
        assert!(stdout.contains(flag), "{flag} in {stdout}");
    }
}

#[test]
fn info_describes_a_model_and_checks_weights() {
    let output = kiln(&["info", "--model", "yolov8n-seg"], Path::new("."));
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.contains("parameters   3,409,968"), "{stdout}");
    assert!(stdout.contains("GFLOPs       12.0 at 640x640"), "{stdout}");
    let weights = kiln_tests::repo_root().join("tests/fixtures/yolov8/yolov8n.pt");
    let output = kiln(&["info", "--model", "yolov8n", "--weights", weights.to_str().unwrap()], Path::new("."));
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("every key loaded"));
    let output = kiln(&["info", "--model", "yolov8s", "--weights", weights.to_str().unwrap()], Path::new("."));
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("does not fit yolov8s") && stderr.contains("mis-shaped"), "{stderr}");
    let output = kiln(&["info", "--model", "yolov9t"], Path::new("."));
    assert!(!output.status.success() && text(&output.stderr).contains("unknown model 'yolov9t'"));
}

#[test]
fn train_student_runs_end_to_end_on_coco8_seg_then_eval_reads_the_run() {
    // Real photos, 80 classes, polygons only (no bbox): the boxes come from the masks.
    let scratch = Scratch::new("cli-train-coco8");
    let data = coco8_dir().join("annotations.json");
    let inputs = contents(&coco8_dir());
    let run = scratch.path().join("run");
    let args = [
        "train-student",
        "--data",
        data.to_str().unwrap(),
        "--val",
        data.to_str().unwrap(),
        "--epochs",
        "1",
        "--imgsz",
        "64",
        "--batch-size",
        "4",
        "--output",
        run.to_str().unwrap(),
    ];
    let output = kiln(&args, scratch.path());
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", text(&output.stderr));
    assert!(stdout.contains("yolov8n-seg trained for 1 epochs"), "{stdout}");
    let config = std::fs::read_to_string(run.join("student_config.yaml")).unwrap();
    assert!(config.contains("model: yolov8n-seg") && config.contains("- person"), "{config}");
    let metadata: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(metadata["train_images"], 8);

    // The same output again is refused: nothing of the first run is replaced.
    let before = std::fs::read(run.join("weights/best.safetensors")).unwrap();
    let again = kiln(&args, scratch.path());
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("--resume"), "{}", text(&again.stderr));
    assert_eq!(std::fs::read(run.join("weights/best.safetensors")).unwrap(), before);

    let eval = kiln(&["eval", "--model", run.to_str().unwrap(), "--data", data.to_str().unwrap()], scratch.path());
    let stdout = text(&eval.stdout);
    assert!(eval.status.success(), "{stdout}\n{}", text(&eval.stderr));
    assert!(stdout.contains("all") && stdout.contains("Mask(P") && stdout.contains("person"), "{stdout}");

    // The run as a teacher of a new student on unlabelled photos (this barely trained teacher is
    // unsure of everything: its best 5 boxes per image, whatever their score), and scored as a
    // teacher.
    let unlabeled = coco8_dir().join("images/val");
    let taught = scratch.path().join("taught");
    let mut distil = args.to_vec();
    let (run_arg, taught_arg) = (run.to_str().unwrap(), taught.to_str().unwrap());
    *distil.last_mut().unwrap() = taught_arg;
    distil.extend(["--teachers", run_arg, "--unlabeled", unlabeled.to_str().unwrap()]);
    distil.extend(["--set", "distill.box_threshold=0", "--set", "distill.max_labels=5"]);
    let output = kiln(&distil, scratch.path());
    assert!(output.status.success(), "{}\n{}", text(&output.stdout), text(&output.stderr));
    let record = std::fs::read_to_string(taught.join("distillation_config.yaml")).unwrap();
    assert!(record.contains("unlabelled_images: 4") && record.contains("kiln student yolov8n-seg"), "{record}");
    assert!(taught.join("teacher_labels.json").is_file() && taught.join("weights/best.safetensors").is_file());
    let eval = kiln(&["eval", "--teachers", run_arg, "--data", data.to_str().unwrap()], scratch.path());
    assert!(eval.status.success(), "{}", text(&eval.stderr));
    assert!(text(&eval.stdout).contains("kiln student yolov8n-seg"), "{}", text(&eval.stdout));
    // Unlabelled images without teachers are refused by the argument parser, saying why.
    let refused = kiln(&["train-student", "--data", "a.json", "--val", "b.json", "--unlabeled", "dir"], scratch.path());
    assert!(!refused.status.success() && text(&refused.stderr).contains("--teachers"), "{}", text(&refused.stderr));
    // Training, evaluating, distilling and labelling left every input file as it was.
    assert!(contents(&coco8_dir()) == inputs, "an input file under {} changed", coco8_dir().display());
}

/// Every file under `dir` (recursively) with its bytes.
fn contents(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// Synth images of the fixture student's domain (a seed it was not trained on).
fn student_images(dir: &Path) -> std::path::PathBuf {
    let options = kiln_data::SynthOptions {
        images: 6,
        classes: 3,
        size: 160,
        labels: kiln_data::SynthLabels::Both,
        seed: 11,
        max_objects: 2,
        ..Default::default()
    };
    kiln_data::synthesize(&options, dir, &indicatif::ProgressBar::hidden()).unwrap().images_dir
}

/// `kiln infer --device wgpu` on the half-precision student finds what `--device cpu` finds, on
/// whichever adapter the machine has (lavapipe's Vulkan in CI, OpenGL alone on a machine without
/// Vulkan: CI runs this test on both), and says which adapter and graphics API it got.
#[cfg(feature = "wgpu")]
#[test]
fn infer_on_wgpu_finds_what_the_cpu_finds_and_names_the_adapter() {
    let scratch = Scratch::new("cli-infer-wgpu");
    let images = student_images(&scratch.path().join("data"));
    let model = kiln_tests::fixture("students/synth160_yolov8n_seg.safetensors");
    let infer = |device: &str| {
        let output = scratch.path().join(device);
        let run = kiln(
            &[
                "infer",
                "--model",
                model.to_str().unwrap(),
                "--images",
                images.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
                "--device",
                device,
            ],
            scratch.path(),
        );
        assert!(run.status.success(), "{}\n{}", text(&run.stdout), text(&run.stderr));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(output.join("predictions.json")).unwrap()).unwrap();
        (json["annotations"].as_array().unwrap().clone(), text(&run.stderr))
    };
    let (cpu, _) = infer("cpu");
    let (gpu, stderr) = infer("wgpu");
    let reported = stderr.lines().find(|l| l.starts_with("device: wgpu device (")).unwrap_or_default();
    assert!(
        ["Vulkan", "Metal", "DX12", "GL"].iter().any(|api| reported.contains(&format!(" via {api}"))),
        "no adapter report in:\n{stderr}"
    );
    assert!(cpu.len() >= 5, "only {} detections on the CPU", cpu.len());
    assert_eq!(cpu.len(), gpu.len(), "detection counts differ");
    for (a, b) in cpu.iter().zip(&gpu) {
        assert_eq!((&a["image_id"], &a["category_id"]), (&b["image_id"], &b["category_id"]));
        for k in 0..4 {
            assert!((a["bbox"][k].as_f64().unwrap() - b["bbox"][k].as_f64().unwrap()).abs() <= 1e-2, "{a} vs {b}");
        }
        assert!((a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs() <= 1e-3, "{a} vs {b}");
    }
}

/// On a machine without any GPU driver, `--device wgpu` is a one-line error with what to do,
/// exit status 1 (not a panic's 101), and no output directory.
#[cfg(feature = "wgpu")]
#[test]
fn infer_on_wgpu_without_a_driver_exits_cleanly_with_advice() {
    let scratch = Scratch::new("cli-infer-no-driver");
    let images = student_images(&scratch.path().join("data"));
    let model = kiln_tests::fixture("students/synth160_yolov8n_seg.safetensors");
    let output = scratch.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["infer", "--model", model.to_str().unwrap(), "--images", images.to_str().unwrap()])
        .args(["--output", output.to_str().unwrap(), "--device", "wgpu"])
        .envs(kiln_tests::no_gpu_driver_environment())
        .current_dir(scratch.path())
        .output()
        .unwrap();
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("error: no GPU adapter found") && stderr.contains("--device cpu"), "{stderr}");
    assert!(!output.exists(), "nothing is written when the device cannot be opened");
}

/// The `.json` labels in a label cache (one per image and teacher), each checked to be whole.
fn cached_labels(cache: &Path) -> usize {
    let Ok(teachers) = std::fs::read_dir(cache) else { return 0 };
    let mut count = 0;
    for teacher in teachers.flatten() {
        for entry in std::fs::read_dir(teacher.path()).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
                    "{} is half-written",
                    path.display()
                );
                count += 1;
            }
        }
    }
    count
}

#[test]
fn a_distilled_run_killed_while_its_teacher_labels_resumes_and_ends_as_an_uninterrupted_one() {
    let scratch = Scratch::new("cli-kill-labelling");
    let dir = scratch.path();
    let synth = |name: &str, images: usize, seed: u64| {
        let options =
            kiln_data::SynthOptions { images, classes: 3, size: 160, seed, max_objects: 2, ..Default::default() };
        kiln_data::synthesize(&options, &dir.join(name), &indicatif::ProgressBar::hidden()).unwrap()
    };
    let labelled = synth("labelled", 10, 31);
    let unlabeled = synth("unlabeled", 150, 32).images_dir;
    let (train, val) = (dir.join("train.json"), dir.join("val.json"));
    labelled.dataset.subset(&[0, 1, 2, 3, 4, 5]).save(&train).unwrap();
    labelled.dataset.subset(&[6, 7, 8, 9]).save(&val).unwrap();
    // Each run's teacher is its own copy of the fixture student, so each has its own label cache.
    let teacher = |name: &str| {
        let path = dir.join(name).join("teacher.safetensors");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(kiln_tests::fixture("students/synth160_yolov8n_seg.safetensors"), &path).unwrap();
        path
    };
    let args = |teacher: &Path, run: &Path| -> Vec<String> {
        let mut args: Vec<String> = ["train-student", "--epochs", "1", "--imgsz", "64", "--batch-size", "4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (flag, path) in [
            ("--data", &train),
            ("--val", &val),
            ("--images", &labelled.images_dir),
            ("--teachers", &teacher.to_path_buf()),
            ("--unlabeled", &unlabeled),
            ("--output", &run.to_path_buf()),
        ] {
            args.extend([flag.to_string(), path.to_str().unwrap().to_string()]);
        }
        args
    };

    let (whole_teacher, whole) = (teacher("whole"), dir.join("whole/run"));
    let output = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args(&whole_teacher, &whole)).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    // 150 unlabelled images labelled, 6 labelled ones given feature maps, and the same 6 labelled
    // by the teacher unprompted (`logit: auto` checks how it names their objects).
    let total = 162;

    // kill -9 while the teacher labels: a few labels are in the cache, not all.
    let (killed_teacher, killed) = (teacher("killed"), dir.join("killed/run"));
    let cache = dir.join("killed/label_cache");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args(&killed_teacher, &killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while cached_labels(&cache) < 3 && started.elapsed().as_secs() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // While it runs, a second kiln on the same run (here a resume) is refused, naming the first.
    let mut second = args(&killed_teacher, &killed);
    second.push("--resume".into());
    let second = kiln(&second.iter().map(String::as_str).collect::<Vec<_>>(), dir);
    let holder = format!("in use by another kiln process (pid {} ", child.id());
    assert!(!second.status.success() && text(&second.stderr).contains(&holder), "{}", text(&second.stderr));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = cached_labels(&cache);
    assert!((3..total).contains(&done), "killed while labelling: {done} of {total} labels cached");
    assert!(!killed.join("weights/best.safetensors").exists());

    // The same command again is refused (the run is there); --resume with the teachers again
    // finishes it, computing only the labels the killed run had not.
    let again = kiln(&args(&killed_teacher, &killed).iter().map(String::as_str).collect::<Vec<_>>(), dir);
    assert!(!again.status.success() && text(&again.stderr).contains("--resume"), "{}", text(&again.stderr));
    let mut bare = args(&killed_teacher, &killed);
    for flag in ["--teachers", "--unlabeled"] {
        let at = bare.iter().position(|a| a == flag).unwrap();
        bare.drain(at..at + 2);
    }
    bare.push("--resume".into());
    let without_teachers = kiln(&bare.iter().map(String::as_str).collect::<Vec<_>>(), dir);
    assert!(!without_teachers.status.success(), "resuming needs the teachers again");
    assert!(text(&without_teachers.stderr).contains("--teachers"), "{}", text(&without_teachers.stderr));
    let mut resume = args(&killed_teacher, &killed);
    resume.push("--resume".into());
    let resumed = kiln(&resume.iter().map(String::as_str).collect::<Vec<_>>(), dir);
    assert!(resumed.status.success(), "{}\n{}", text(&resumed.stdout), text(&resumed.stderr));
    let record: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(killed.join("distillation_config.yaml")).unwrap()).unwrap();
    let count = |key: &str| record[key].as_u64().unwrap() as usize;
    assert!(count("labels_reused") >= done, "{record:?}");
    assert_eq!(count("labels_computed") + count("labels_reused"), total, "{record:?}");
    let labels = "teacher_labels.json";
    assert_eq!(std::fs::read(killed.join(labels)).unwrap(), std::fs::read(whole.join(labels)).unwrap());
    for file in ["weights/best.safetensors", "weights/last.safetensors"] {
        let (resumed, uninterrupted) = (killed.join(file), whole.join(file));
        let same = kiln_tests::safetensors_tensors(&resumed) == kiln_tests::safetensors_tensors(&uninterrupted);
        assert!(same, "{file}: the resumed run's tensors differ from the uninterrupted run's");
    }
}

/// A downloaded dataset must not make kiln read files outside its images directory: `..`,
/// absolute paths and symlinks out are refused with the image and the path named, nothing is
/// written, and `--allow-outside-paths` lets a user who means it through.
#[test]
fn dataset_paths_leading_outside_the_images_directory_are_refused() {
    let scratch = Scratch::new("cli-hostile-paths");
    let dir = scratch.path();
    let options = kiln_data::SynthOptions { images: 4, classes: 2, size: 64, seed: 5, ..Default::default() };
    let synth = kiln_data::synthesize(&options, &dir.join("data"), &indicatif::ProgressBar::hidden()).unwrap();
    let images = synth.images_dir.to_str().unwrap().to_string();
    std::fs::create_dir_all(dir.join("outside")).unwrap();
    let first = &synth.dataset.images[0];
    std::fs::copy(synth.images_dir.join(&first.file_name), dir.join("outside/secret.png")).unwrap();
    let with_first_named = |name: &str, file: &str| {
        let mut dataset = synth.dataset.clone();
        dataset.images[0].file_name = name.to_string();
        dataset.save(&dir.join(file)).unwrap();
    };
    with_first_named("../../outside/secret.png", "climbing.json");
    with_first_named("/etc/hostname", "absolute.json");
    std::os::unix::fs::symlink(dir.join("outside/secret.png"), synth.images_dir.join("link.png")).unwrap();
    with_first_named("link.png", "symlink.json");

    let validate = |file: &str, output: &str, allow: bool| {
        let mut args = vec!["validate", "--data", file, "--images", &images, "--output-dir", output];
        if allow {
            args.push("--allow-outside-paths");
        }
        kiln(&args, dir)
    };
    let id = first.id;
    for (file, how) in [("climbing.json", "climbs out with `..`"), ("absolute.json", "is absolute")] {
        let output = validate(file, "out", false);
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{file}");
        assert!(stderr.contains(file) && stderr.contains(&format!("image {id} has file_name")), "{stderr}");
        assert!(stderr.contains(how) && stderr.contains("--allow-outside-paths"), "{stderr}");
    }
    let output = validate("symlink.json", "out", false);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("path_outside_images") && stdout.contains("symlink"), "{stdout}");
    assert!(!dir.join("out").exists(), "nothing is written");

    // The user who means it: the outside file is a real image, so the data validates.
    for file in ["climbing.json", "symlink.json"] {
        let output = validate(file, &format!("allowed-{file}"), true);
        assert!(output.status.success(), "{file}: {}{}", text(&output.stdout), text(&output.stderr));
    }
}

/// Checkpoints a hostile or broken download could hand kiln (`tests/reference/hostile_fixtures.py`
/// writes them): absurd safetensors header sizes and offsets, a truncated zip, a pickle that would
/// run a shell command if unpickled naively. Each is a clear error naming the file, from the student
/// loader and GroundingDINO's alike; nothing runs and nothing is written.
#[test]
fn hostile_checkpoints_are_clear_errors_and_nothing_in_them_runs() {
    let scratch = Scratch::new("cli-hostile-checkpoints");
    let dir = scratch.path();
    let marker = Path::new("/tmp/kiln-hostile-pickle-ran");
    let _ = std::fs::remove_file(marker);
    let options = kiln_data::SynthOptions { images: 1, classes: 1, size: 64, seed: 3, ..Default::default() };
    let synth = kiln_data::synthesize(&options, &dir.join("data"), &indicatif::ProgressBar::hidden()).unwrap();
    let images = synth.images_dir.to_str().unwrap().to_string();
    for (file, says) in [
        ("absurd_header.safetensors", "header too large"),
        ("offsets_beyond.safetensors", "not fully covered"),
        ("truncated.pt", "invalid Zip archive"),
        ("malicious_pickle.pt", "found os.system"),
    ] {
        let path = kiln_tests::fixture(&format!("hostile/{file}"));
        let weights = path.to_str().unwrap();
        let info = kiln(&["info", "--model", "yolov8n", "--weights", weights], dir);
        let detect = kiln(
            &[
                "detect",
                "--images",
                &images,
                "--gdino",
                "tiny",
                "--weights",
                weights,
                "--prompt",
                "a .",
                "--output",
                "out",
            ],
            dir,
        );
        for output in [info, detect] {
            let stderr = text(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{file}: {stderr}");
            assert!(stderr.contains(file) && stderr.contains(says), "{file}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
        assert!(!dir.join("out").exists(), "{file}: nothing is written");
    }
    assert!(!marker.exists(), "the pickle's command must never run");
}

/// Every file a run shows under its own name is whole (JSON and YAML parse, safetensors headers
/// and data add up, PNG/JPEG end with their trailer, CSV with a newline): what atomic writes
/// promise a run killed at any moment.
fn assert_every_visible_file_whole(dir: &Path, context: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.map(Result::unwrap) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if entry.file_type().unwrap().is_dir() {
            assert_every_visible_file_whole(&path, context);
            continue;
        }
        if name.starts_with('.') {
            continue; // staging files and the run lock: never read as outputs
        }
        let bytes = std::fs::read(&path).unwrap();
        let whole = match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
            "json" => serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
            "yaml" => serde_yaml::from_slice::<serde_yaml::Value>(&bytes).is_ok(),
            "csv" => bytes.ends_with(b"\n"),
            "png" => bytes.ends_with(&[0xAE, 0x42, 0x60, 0x82]),
            "jpg" => bytes.ends_with(&[0xFF, 0xD9]),
            "safetensors" => {
                bytes.len() >= 8 && {
                    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                    let header =
                        bytes.get(8..8 + length).and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok());
                    header.is_some_and(|h| {
                        let end = h.as_object().unwrap().values().filter_map(|t| t["data_offsets"][1].as_u64()).max();
                        end.unwrap_or(0) as usize == bytes.len() - 8 - length
                    })
                }
            }
            _ => !bytes.is_empty(),
        };
        assert!(whole, "{context}: {} is half-written ({} bytes)", path.display(), bytes.len());
    }
}

/// The four ways `kiln train-teacher` trains (SAM and GroundingDINO, LoRA and full fine-tuning)
/// on a tiny split: name, flags, the weights file it saves under `teachers/`.
const TEACHER_RUNS: [(&str, &[&str], &str); 4] = [
    ("sam_lora", &["--teacher", "sam", "--sam", "tiny"], "sam_lora/adapter_model.safetensors"),
    ("sam_full", &["--teacher", "sam", "--sam", "tiny", "--full-finetune"], "sam_full/model.safetensors"),
    (
        "gdino_lora",
        &["--teacher", "grounding_dino", "--gdino", "tiny"],
        "grounding_dino_lora/adapter_model.safetensors",
    ),
    (
        "gdino_full",
        &["--teacher", "grounding_dino", "--gdino", "tiny", "--full-finetune"],
        "grounding_dino_full/model.safetensors",
    ),
];

/// A tiny split for the teacher runs, and the arguments of a 3-epoch run of `teacher` into `output`.
struct TeacherRuns {
    train: std::path::PathBuf,
    val: std::path::PathBuf,
    images: std::path::PathBuf,
}

impl TeacherRuns {
    fn new(dir: &Path) -> Self {
        let options =
            kiln_data::SynthOptions { images: 8, classes: 2, size: 64, seed: 3, max_objects: 2, ..Default::default() };
        let (train, val) = kiln_tests::synth_split(dir, &options);
        TeacherRuns { train, val, images: dir.join("synth/images") }
    }

    fn command(&self, teacher: &[&str], output: &Path, resume: bool) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(["train-teacher", "--epochs", "3", "--imgsz", "64", "--batch-size", "2", "--seed", "1"]);
        for (flag, path) in [("--data", &self.train), ("--val", &self.val), ("--images", &self.images)] {
            command.arg(flag).arg(path);
        }
        command.arg("--output").arg(output).args(teacher);
        if resume {
            command.arg("--resume");
        }
        command
    }

    /// Asserts that two runs trained alike: the same saved weights, tensor for tensor, and the same
    /// per-epoch losses and metrics (`results.csv` without its timings: the best weights of a
    /// teacher whose metric never improves are its first, so they alone would not tell).
    fn assert_same_run(whole: &Path, other: &Path, weights: &str, context: &str) {
        let (a, b) = (whole.join("teachers").join(weights), other.join("teachers").join(weights));
        assert!(
            kiln_tests::safetensors_tensors(&a) == kiln_tests::safetensors_tensors(&b),
            "{context}: the resumed run's weights differ from the uninterrupted run's"
        );
        let results = |run: &Path| -> Vec<String> {
            let train = std::fs::read_dir(run.join("teachers"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.file_name().unwrap().to_string_lossy().ends_with("_train"))
                .unwrap();
            let csv = std::fs::read_to_string(train.join("results.csv")).unwrap();
            csv.lines().map(|line| line.rsplit_once(',').unwrap().0.to_string()).collect()
        };
        assert_eq!(results(whole), results(other), "{context}: the resumed run's history differs");
    }
}

/// `kill -9` at random moments of `kiln train-teacher` (SAM and GroundingDINO, LoRA and full
/// fine-tuning), twice per run, each time followed by `--resume`: no output is ever half-written,
/// and the last resume ends as the uninterrupted run did. The moments come from the clock; the
/// seed is printed with any failure to replay it (KILN_KILL_SEED).
#[test]
fn train_teacher_killed_at_random_moments_resumes_to_the_uninterrupted_weights() {
    let scratch = Scratch::new("cli-kill-teacher");
    let dir = scratch.path();
    let runs = TeacherRuns::new(dir);
    let inputs = snapshot(&dir.join("synth"));
    let seed: u64 = std::env::var("KILN_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let mut state = seed | 1;
    let mut uniform = move || {
        // xorshift64*: enough to spread the kill moments.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    for (name, teacher, weights) in TEACHER_RUNS {
        let whole = dir.join(name).join("whole");
        let started = std::time::Instant::now();
        let output = runs.command(teacher, &whole, false).output().unwrap();
        assert!(output.status.success(), "{name}: {}", text(&output.stderr));
        let duration = started.elapsed();

        let killed = dir.join(name).join("killed");
        for round in 0..2 {
            let mut child = runs
                .command(teacher, &killed, round > 0)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // A moment after the run saved its settings (before that there is nothing to resume).
            let config = killed.join("teachers/teacher_config.yaml");
            while !config.exists() && child.try_wait().unwrap().is_none() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            std::thread::sleep(duration.mul_f64(0.9 * uniform()));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            assert_every_visible_file_whole(&killed, &format!("{name}, kill {} (KILN_KILL_SEED={seed})", round + 1));
        }
        let resumed = runs.command(teacher, &killed, true).output().unwrap();
        assert!(resumed.status.success(), "{name} (KILN_KILL_SEED={seed}): {}", text(&resumed.stderr));
        TeacherRuns::assert_same_run(&whole, &killed, weights, &format!("{name} (KILN_KILL_SEED={seed})"));
    }
    assert!(snapshot(&dir.join("synth")) == inputs, "the data the runs read is unchanged, byte for byte");
}

/// A process killed in the middle of a save (`KILN_FAULT=abort:FILE`: it dies between writing the
/// file's staging copy and renaming it into place) leaves the file absent or as it was, never
/// half-written, and `--resume` ends as the uninterrupted run did; for each file a teacher run
/// saves: burn-train's records, kiln's resume state, the weights, the history.
#[test]
fn train_teacher_killed_while_it_saves_leaves_no_half_file_and_resumes() {
    let scratch = Scratch::new("cli-kill-save");
    let dir = scratch.path();
    let runs = TeacherRuns::new(dir);
    for (name, teacher, weights) in [TEACHER_RUNS[0], TEACHER_RUNS[3]] {
        let whole = dir.join(name).join("whole");
        assert!(runs.command(teacher, &whole, false).output().unwrap().status.success());
        let saved_file = weights.rsplit('/').next().unwrap();
        for file in ["model-2.bpk", "optim-2.bpk", "scheduler-2.bpk", "state-2.json", "results.csv:2", saved_file] {
            let killed = dir.join(name).join(file.replace(':', "_"));
            let output =
                runs.command(teacher, &killed, false).env("KILN_FAULT", format!("abort:{file}")).output().unwrap();
            let context = format!("{name}, killed while saving {file}");
            assert!(!output.status.success(), "{context}: the fault did not fire");
            let staging = |dir: &Path| -> usize {
                let mut count = 0;
                for entry in walk(dir) {
                    count += entry.file_name().unwrap().to_string_lossy().starts_with('.') as usize;
                }
                count
            };
            assert!(staging(&killed) > 1, "{context}: no staging file: the process did not die mid-save");
            assert_every_visible_file_whole(&killed, &context);
            let resumed = runs.command(teacher, &killed, true).output().unwrap();
            assert!(resumed.status.success(), "{context}: {}", text(&resumed.stderr));
            TeacherRuns::assert_same_run(&whole, &killed, weights, &context);
            assert_eq!(
                staging(&killed),
                1,
                "{context}: the resume cleared the dead run's staging files (the lock stays)"
            );
        }
    }
}

/// A full disk (`KILN_FAULT=nospace:FILE`) fails the run with the file and the cause named, keeps
/// what earlier epochs saved, leaves no partial file, and `--resume` on a disk with room again
/// ends as the uninterrupted run did.
#[test]
fn train_teacher_on_a_full_disk_fails_clearly_and_resumes() {
    let scratch = Scratch::new("cli-disk-full");
    let dir = scratch.path();
    let runs = TeacherRuns::new(dir);
    let (name, teacher, weights) = TEACHER_RUNS[0];
    let whole = dir.join("whole");
    assert!(runs.command(teacher, &whole, false).output().unwrap().status.success());
    for file in ["state-2.json", "model-2.bpk", "results.csv:3"] {
        let full = dir.join(file.replace(':', "_"));
        let output = runs.command(teacher, &full, false).env("KILN_FAULT", format!("nospace:{file}")).output().unwrap();
        let (stderr, context) = (text(&output.stderr), format!("{name}, disk full at {file}"));
        assert!(!output.status.success(), "{context}");
        let named = file.split(':').next().unwrap();
        assert!(stderr.contains(named) && stderr.contains("No space left on device"), "{context}: {stderr}");
        assert!(!stderr.contains("panicked"), "{context}: {stderr}");
        assert!(full.join("teachers/sam_train/checkpoint/state-1.json").is_file(), "{context}: epoch 1 kept");
        assert_every_visible_file_whole(&full, &context);
        assert!(
            walk(&full).iter().all(|p| !p.to_string_lossy().ends_with(".tmp")),
            "{context}: a failed write removes its staging file"
        );
        let resumed = runs.command(teacher, &full, true).output().unwrap();
        assert!(resumed.status.success(), "{context}: {}", text(&resumed.stderr));
        TeacherRuns::assert_same_run(&whole, &full, weights, &context);
    }
}

/// Every file under `dir` with its bytes: to check that a command left its inputs as they were.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = walk(dir).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    files.sort();
    files
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        if entry.file_type().unwrap().is_dir() {
            files.extend(walk(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}

/// A distilled `kiln train-student` killed in the middle of saving each kind of file it writes
/// while training (weights, burn-train's records, kiln's resume state, the history) leaves no
/// half-written file, and `--resume` ends with the uninterrupted run's weights, tensor for tensor.
#[test]
fn a_distilled_student_killed_while_it_saves_resumes_to_the_uninterrupted_weights() {
    let scratch = Scratch::new("cli-student-kill-save");
    let dir = scratch.path();
    let synth = |name: &str, images: usize, seed: u64| {
        let options =
            kiln_data::SynthOptions { images, classes: 3, size: 96, seed, max_objects: 2, ..Default::default() };
        kiln_data::synthesize(&options, &dir.join(name), &indicatif::ProgressBar::hidden()).unwrap()
    };
    let labelled = synth("labelled", 8, 41);
    let unlabeled = synth("unlabeled", 8, 42).images_dir;
    let (train, val) = (dir.join("train.json"), dir.join("val.json"));
    labelled.dataset.subset(&[0, 1, 2, 3, 4]).save(&train).unwrap();
    labelled.dataset.subset(&[5, 6, 7]).save(&val).unwrap();
    let teacher = dir.join("teacher.safetensors");
    std::fs::copy(kiln_tests::fixture("students/synth160_yolov8n_seg.safetensors"), &teacher).unwrap();
    let inputs = [snapshot(&dir.join("labelled")), snapshot(&dir.join("unlabeled"))];
    let read_all = || [&teacher, &train, &val].map(|p| std::fs::read(p).unwrap());
    let given = read_all();
    let command = |run: &Path, resume: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args([
            "train-student",
            "--epochs",
            "3",
            "--imgsz",
            "64",
            "--batch-size",
            "4",
            "--set",
            "distill.box_threshold=0.1",
        ]);
        for (flag, path) in [
            ("--data", &train),
            ("--val", &val),
            ("--images", &labelled.images_dir),
            ("--teachers", &teacher),
            ("--unlabeled", &unlabeled),
            ("--output", &run.to_path_buf()),
        ] {
            command.arg(flag).arg(path);
        }
        if resume {
            command.arg("--resume");
        }
        command
    };
    let whole = dir.join("whole");
    let output = command(&whole, false).output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    for file in ["last.safetensors:2", "model-2.bpk", "optim-2.bpk", "state-2.json", "results.csv:2"] {
        let killed = dir.join(file.replace(':', "_"));
        let context = format!("killed while saving {file}");
        let output = command(&killed, false).env("KILN_FAULT", format!("abort:{file}")).output().unwrap();
        assert!(!output.status.success(), "{context}: the fault did not fire");
        assert_every_visible_file_whole(&killed, &context);
        let resumed = command(&killed, true).output().unwrap();
        assert!(resumed.status.success(), "{context}: {}", text(&resumed.stderr));
        for weights in ["weights/best.safetensors", "weights/last.safetensors"] {
            let same = kiln_tests::safetensors_tensors(&killed.join(weights))
                == kiln_tests::safetensors_tensors(&whole.join(weights));
            assert!(same, "{context}: {weights} of the resumed run differs from the uninterrupted run's");
        }
    }
    let after = [snapshot(&dir.join("labelled")), snapshot(&dir.join("unlabeled"))];
    assert!(after == inputs && read_all() == given, "the inputs are unchanged, byte for byte");
}

/// The memory estimate a run prints when it starts is within a quarter of the peak resident
/// memory it measures when it ends (both in `memory.json`), for the student and the SAM teacher
/// at two batch sizes; `--dry-run` prints it and writes nothing.
#[test]
fn memory_estimate_is_within_a_quarter_of_the_measured_peak_and_dry_run_writes_nothing() {
    let scratch = Scratch::new("cli-memory");
    let dir = scratch.path();
    let data = coco8_dir().join("annotations.json");
    let data = data.to_str().unwrap();
    let ratio = |record: &Path| -> f64 {
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
        let estimate = record["estimate"]["total_bytes"].as_f64().unwrap();
        let measured = record["measured_peak_bytes"].as_f64().unwrap();
        assert!(record["estimate"]["step"]["per_image_bytes"].as_f64().unwrap() > 0.0, "{record}");
        estimate / measured
    };

    let student = |batch: &str, extra: &[&str]| {
        let mut args = vec!["train-student", "--data", data, "--val", data, "--epochs", "1", "--imgsz", "320"];
        args.extend(["--batch-size", batch, "--set", "augment.mosaic=0"]);
        args.extend(extra);
        kiln(&args, dir)
    };
    let dry = student("8", &["--dry-run"]);
    let stdout = text(&dry.stdout);
    assert!(dry.status.success(), "{stdout}\n{}", text(&dry.stderr));
    assert!(stdout.contains("memory estimate:") && stdout.contains("one step, batch 8"), "{stdout}");
    assert!(stdout.contains("nothing trained, nothing written"), "{stdout}");
    assert!(std::fs::read_dir(dir).unwrap().next().is_none(), "a dry run wrote into {}", dir.display());

    for batch in ["2", "8"] {
        let run = dir.join(format!("student-{batch}"));
        let output = student(batch, &["--output", run.to_str().unwrap()]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        assert!(text(&output.stderr).contains("memory estimate:"), "{}", text(&output.stderr));
        let r = ratio(&run.join("memory.json"));
        assert!((0.75..=1.25).contains(&r), "student at batch {batch}: estimate / measured peak = {r:.3}");
    }

    let runs = TeacherRuns::new(&dir.join("teacher-data"));
    let sam = |batch: &str, output: &Path, extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(["train-teacher", "--teacher", "sam", "--sam", "tiny", "--epochs", "1", "--batch-size", batch]);
        for (flag, path) in [("--data", &runs.train), ("--val", &runs.val), ("--images", &runs.images)] {
            command.arg(flag).arg(path);
        }
        command.arg("--output").arg(output).args(extra).current_dir(dir).output().unwrap()
    };
    let dry = sam("4", &dir.join("sam-dry"), &["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(text(&dry.stdout).contains("memory estimate:") && !dir.join("sam-dry").exists(), "{}", text(&dry.stdout));
    for batch in ["1", "4"] {
        let output_dir = dir.join(format!("sam-{batch}"));
        let output = sam(batch, &output_dir, &[]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        let r = ratio(&output_dir.join("teachers/sam_train/memory.json"));
        assert!((0.75..=1.25).contains(&r), "SAM at batch {batch}: estimate / measured peak = {r:.3}");
    }
}

/// `kiln optimize` on a trained student's run: the three ONNX files and the report, each
/// artifact's mAP measured on itself; `kiln eval` on the FP16 and INT8 files gives exactly the
/// report's figures; a second run, an experiment without a student and a corrupt ONNX file are
/// clear errors that change nothing.
#[test]
fn optimize_writes_every_artifact_and_eval_reproduces_its_report() {
    let scratch = Scratch::new("cli-optimize");
    let synth = |name: &str, seed: &str, images: &str| {
        let dir = scratch.path().join(name);
        let output = kiln(
            &["synth", "--output", dir.to_str().unwrap(), "--num-images", images, "--classes", "3", "--size", "160"]
                .into_iter()
                .chain(["--max-objects", "2", "--synth-seed", seed])
                .collect::<Vec<_>>(),
            scratch.path(),
        );
        assert!(output.status.success(), "{}", text(&output.stderr));
        dir.join("annotations.json")
    };
    let (train, val) = (synth("train", "12", "8"), synth("val", "11", "10"));
    // A student run as `kiln train-student` leaves it: weights and the request in metadata.json.
    let run = scratch.path().join("run");
    std::fs::create_dir_all(run.join("weights")).unwrap();
    std::fs::copy(
        kiln_tests::fixture("students/synth160_yolov8n_seg.safetensors"),
        run.join("weights/best.safetensors"),
    )
    .unwrap();
    let metadata = serde_json::json!({"request": {"train": train, "val": val, "images": null}});
    std::fs::write(run.join("metadata.json"), metadata.to_string()).unwrap();

    let optimize = |extra: &[&str]| {
        let args = [
            "optimize",
            "--model",
            "run",
            "--runs",
            "2",
            "--calibration-images",
            "8",
            "--no-onnxruntime",
            "--prune-epochs",
            "1",
        ];
        kiln(&args.iter().chain(extra).copied().collect::<Vec<_>>(), scratch.path())
    };
    let output = optimize(&[]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", text(&output.stderr));
    let optimized = run.join("optimized");
    let mut files: Vec<String> =
        std::fs::read_dir(&optimized).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(
        files,
        [
            "model.fp16.onnx",
            "model.int8.onnx",
            "model.onnx",
            "model.pruned.onnx",
            "pruned",
            "pruned_start.safetensors",
            "report.json",
            "report.md",
            "report.png"
        ]
    );
    for expected in [
        "ONNX FP32",
        "ONNX FP16",
        "ONNX INT8 Q/DQ",
        "pruned 30 % (safetensors)",
        "pruned ONNX FP32",
        "trtexec --onnx=",
        "report.md",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(optimized.join("report.json")).unwrap()).unwrap();
    let artifacts = report["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 6);
    // The pruned student: fewer parameters and operations; its file reloads (widths in its metadata).
    assert_eq!(artifacts[1]["file"], "pruned/weights/best.safetensors");
    assert!(artifacts[1]["gflops"].as_f64() < artifacts[0]["gflops"].as_f64().map(|g| g * 0.8));
    assert_eq!(artifacts[5]["parameters"], artifacts[1]["parameters"]);
    assert!(report["pruning"]["box_map50_before_finetune"].as_f64().is_some());
    let pruned = optimized.join("pruned/weights/best.safetensors");
    let output =
        kiln(&["eval", "--model", pruned.to_str().unwrap(), "--data", val.to_str().unwrap(), "--json"], scratch.path());
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_str(&stdout[stdout.find("\n{").unwrap() + 1..]).unwrap();
    assert_eq!(json["box"]["map50"].as_f64(), artifacts[1]["box_map50"].as_f64(), "the pruned student reloads");
    let student_box = artifacts[0]["box_map50"].as_f64().unwrap();
    assert!(student_box > 0.5, "the student finds its shapes: {student_box}");
    for artifact in artifacts {
        assert!(artifact["gflops"].as_f64().unwrap() > 0.2 && artifact["bytes"].as_u64().unwrap() > 1_000_000);
        assert!(artifact["latency_ms"].as_object().unwrap().values().all(|v| v.as_f64().unwrap() > 0.0));
    }
    for (index, file) in [(3, "model.fp16.onnx"), (4, "model.int8.onnx")] {
        let path = optimized.join(file);
        let output = kiln(
            &["eval", "--model", path.to_str().unwrap(), "--data", val.to_str().unwrap(), "--json"],
            scratch.path(),
        );
        let stdout = text(&output.stdout);
        assert!(output.status.success(), "{stdout}\n{}", text(&output.stderr));
        let json: serde_json::Value = serde_json::from_str(&stdout[stdout.find("\n{").unwrap() + 1..]).unwrap();
        for (reported, evaluated) in [
            (&artifacts[index]["box_map50"], &json["box"]["map50"]),
            (&artifacts[index]["mask_map50"], &json["mask"]["map50"]),
            (&artifacts[index]["box_map50_95"], &json["box"]["map50_95"]),
        ] {
            assert_eq!(reported.as_f64(), evaluated.as_f64(), "{file}: eval reproduces the report");
        }
        assert!(student_box - artifacts[index]["box_map50"].as_f64().unwrap() < 0.05, "{file} keeps the accuracy");
    }

    // kill -9 in the middle: nothing appears under the output's name; the same command again
    // clears the dead run's staging and ends with the uninterrupted run's figures.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["optimize", "--model", "run", "--runs", "2", "--calibration-images", "8", "--no-onnxruntime"])
        .args(["--prune-epochs", "1", "--output", "run/again"])
        .current_dir(scratch.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let staging = run.join(format!(".again.{}.tmp", child.id()));
    let started = std::time::Instant::now();
    while !staging.join("model.int8.onnx").exists() && started.elapsed().as_secs() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // While it runs, a second optimize of the same student is refused, naming the first.
    let second = optimize(&["--output", "run/third"]);
    let holder = format!("in use by another kiln process (pid {} ", child.id());
    assert!(!second.status.success() && text(&second.stderr).contains(&holder), "{}", text(&second.stderr));
    assert!(!run.join("third").exists());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(staging.is_dir() && !run.join("again").exists(), "killed mid-run: nothing under the output's name");
    let output = optimize(&["--output", "run/again"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(!staging.exists(), "the dead run's staging is cleared");
    let again: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("again/report.json")).unwrap()).unwrap();
    for (a, b) in artifacts.iter().zip(again["artifacts"].as_array().unwrap()) {
        for key in ["box_map50", "mask_map50", "parameters", "bytes"] {
            assert_eq!(a[key], b[key], "{} {key}: the rerun ends as the uninterrupted run", a["name"]);
        }
    }

    // Again: refused, nothing touched.
    let before = contents(&optimized);
    let again = optimize(&[]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("exists; kiln never replaces"), "{}", text(&again.stderr));
    assert_eq!(contents(&optimized), before);

    // Pruning options out of range: refused before any work, nothing touched.
    for (flag, value, message) in
        [("--prune-multiple", "0", "--prune-multiple must be at least 1"), ("--prune", "1.5", "must be in 0..1")]
    {
        let output = optimize(&[flag, value]);
        assert!(!output.status.success());
        assert!(text(&output.stderr).contains(message), "{}", text(&output.stderr));
        assert_eq!(contents(&optimized), before);
    }

    // An experiment without a student says what to run first.
    std::fs::create_dir_all(scratch.path().join("experiments/shapes/teachers")).unwrap();
    let output = kiln(&["optimize", "--experiment", "shapes"], scratch.path());
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no student yet") && stderr.contains("kiln train-student --teachers"), "{stderr}");
    assert!(!scratch.path().join("experiments/shapes/optimized").exists());

    // A corrupt ONNX file is named, with what to do.
    let corrupt = scratch.path().join("corrupt.onnx");
    let bytes = std::fs::read(optimized.join("model.onnx")).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 3]).unwrap();
    let output = kiln(&["eval", "--model", corrupt.to_str().unwrap(), "--data", val.to_str().unwrap()], scratch.path());
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("corrupt.onnx") && stderr.contains("not an ONNX model"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
