//! Hostile images and image sizes: a decompression bomb (a small PNG that claims 60000x60000
//! pixels), a header claiming 100000x100000, a COCO file claiming a 4-billion-pixel-wide image and
//! polygons far outside their image are clear errors naming the file or annotation, with no panic,
//! nothing written and the peak memory of the `kiln` process bounded. Its own test binary, so the
//! peak resident memory of this process's children is that of these runs only.

use std::path::Path;
use std::process::{Command, Output};

use kiln_tests::Scratch;

fn kiln(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(cwd).output().expect("run kiln")
}

/// The largest peak resident memory of any child this process has waited for, in MiB.
fn children_peak_rss_mib() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    usage.ru_maxrss as f64 / 1024.0 // KiB on Linux
}

#[test]
fn bombs_huge_sizes_and_wild_polygons_are_clear_errors_in_bounded_memory() {
    let scratch = Scratch::new("cli-hostile-images");
    let dir = scratch.path();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let corpus = kiln_tests::repo_root().join("tests/fuzz/corpus/image");
    std::fs::copy(corpus.join("bomb_60000.png"), images.join("bomb.png")).unwrap();
    std::fs::copy(corpus.join("huge_dims_header_only.png"), images.join("huge.png")).unwrap();
    let image = |id: u64, file: &str, width: u64| serde_json::json!({"id": id, "file_name": file, "width": width, "height": 60000});
    let coco = |images: Vec<serde_json::Value>, annotations: Vec<serde_json::Value>| {
        serde_json::json!({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]})
            .to_string()
    };
    std::fs::write(
        dir.join("bombs.json"),
        coco(
            vec![image(1, "bomb.png", 60000), image(2, "huge.png", 60000)],
            vec![
                serde_json::json!({"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}),
                serde_json::json!({"id": 2, "image_id": 2, "category_id": 1, "segmentation": [[0, 0, 1e300, 0, 5, 2]]}),
            ],
        ),
    )
    .unwrap();
    std::fs::write(dir.join("wide.json"), coco(vec![image(1, "bomb.png", 4_000_000_000)], vec![])).unwrap();

    let bombs = kiln(&["validate", "--data", "bombs.json", "--images", "images", "--output-dir", "out"], dir);
    let stdout = String::from_utf8_lossy(&bombs.stdout);
    assert_eq!(bombs.status.code(), Some(1), "{stdout}");
    for expected in [
        "corrupt_image",
        "image 1 (bomb.png): Memory limit exceeded",
        "image 2 (huge.png): Image size exceeds limit",
        "at most 65535 pixels a side",
        "polygon_far_outside",
        "annotation 2: invalid mask: polygon coordinate x = 1e300 lies far outside the 60000x60000 image",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    let wide = kiln(&["validate", "--data", "wide.json", "--images", "images", "--output-dir", "out"], dir);
    let stderr = String::from_utf8_lossy(&wide.stderr);
    assert_eq!(wide.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("wide.json: image 1 (bomb.png) claims 4000000000x60000 pixels"), "{stderr}");
    for output in [&bombs, &wide] {
        assert!(!String::from_utf8_lossy(&output.stderr).contains("panicked"));
    }
    assert!(!dir.join("out").exists(), "nothing is written");
    // Decoding the bomb would take 10 GB; kiln stops at the header.
    let peak = children_peak_rss_mib();
    assert!(peak < 256.0, "peak resident memory of kiln {peak:.0} MiB");
}
