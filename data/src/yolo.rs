//! Import of the Ultralytics YOLO dataset layout: a data yaml (`path`, `train`/`val`/`test`,
//! `names`), `images/...` and, beside them, `labels/...` with one `.txt` per image holding
//! `class cx cy w h` (boxes) or `class x1 y1 x2 y2 ...` (polygons), all normalised to 0..1.
//!
//! Category ids are the YOLO class indexes; `file_name` is relative to the `images/` directory;
//! boxes of polygon labels are left for `repair` to derive, as for any COCO file with masks only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Map;

use crate::coco::{CocoAnnotation, CocoCategory, CocoDataset, CocoImage, Segmentation};
use crate::error::{DataError, Result};

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"];

#[derive(Deserialize)]
struct DataYaml {
    path: Option<String>,
    train: Option<Sources>,
    val: Option<Sources>,
    test: Option<Sources>,
    names: Names,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Sources {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Names {
    List(Vec<String>),
    Map(BTreeMap<u64, String>),
}

/// A data yaml's `text` (`path` names it in errors).
fn parse_data_yaml(text: &str, path: &Path) -> Result<DataYaml> {
    serde_yaml::from_str(text).map_err(|e| DataError::invalid(path, format!("not a YOLO data yaml: {e}")))
}

/// The class names of a data yaml's `text`, by index: what kiln reads of it besides the paths.
pub fn data_yaml_names(text: &str, path: &Path) -> Result<Vec<(u64, String)>> {
    Ok(parse_data_yaml(text, path)?.names.by_index())
}

impl Names {
    fn by_index(self) -> Vec<(u64, String)> {
        match self {
            Names::List(list) => list.into_iter().enumerate().map(|(i, n)| (i as u64, n)).collect(),
            Names::Map(map) => map.into_iter().collect(),
        }
    }
}

/// A YOLO dataset as COCO, with the directory its `file_name`s are relative to.
pub struct YoloImport {
    pub dataset: CocoDataset,
    pub images_dir: PathBuf,
}

/// Finds the data yaml: the file itself, or the single `*.yaml`/`*.yml` in a directory.
pub fn find_data_yaml(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(|e| DataError::io(path, "cannot read the directory", e))?;
    let mut yamls: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    yamls.sort();
    match yamls.len() {
        1 => Ok(yamls.remove(0)),
        0 => Err(DataError::invalid(path, "no data yaml (with `names`) found in this YOLO dataset directory")),
        _ => Err(DataError::invalid(path, "several yaml files here: pass the data yaml itself")),
    }
}

/// Reads a YOLO dataset (`path` = its data yaml or the directory holding it) into COCO types.
pub fn import_yolo(path: &Path) -> Result<YoloImport> {
    let yaml_path = find_data_yaml(path)?;
    let text =
        std::fs::read_to_string(&yaml_path).map_err(|e| DataError::io(&yaml_path, "cannot read the data yaml", e))?;
    let yaml = parse_data_yaml(&text, &yaml_path)?;
    let yaml_dir = yaml_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    // `path`, `train`, `val` and `test` come from the downloaded file too: they stay inside the
    // yaml's directory. A `path` that does not exist from here (one written on another machine,
    // Ultralytics' `../datasets/NAME`) means the yaml's own directory, as before.
    let root = match yaml.path.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
        Some(p) => {
            let candidate = yaml_dir.join(p);
            let same = candidate.canonicalize().ok() == yaml_dir.canonicalize().ok();
            if !candidate.is_dir() || same {
                yaml_dir.clone()
            } else {
                crate::paths::inside(&yaml_dir, p, &format!("`path` of {}", yaml_path.display()))?
            }
        }
        None => yaml_dir.clone(),
    };

    let names = yaml.names.by_index();
    let categories: Vec<CocoCategory> = names
        .iter()
        .map(|(id, name)| CocoCategory { id: *id, name: name.clone(), supercategory: None, extra: Map::new() })
        .collect();

    let mut image_files = Vec::new();
    for sources in [yaml.train, yaml.val, yaml.test].into_iter().flatten() {
        let list = match sources {
            Sources::One(s) => vec![s],
            Sources::Many(v) => v,
        };
        for source in list {
            image_files.extend(list_images(&split_source(&root, source.trim(), &yaml_path)?)?);
        }
    }
    image_files.sort();
    image_files.dedup();
    if image_files.is_empty() {
        return Err(DataError::invalid(
            &yaml_path,
            format!("no images found for train/val/test under {}", root.display()),
        ));
    }

    let images_dir = root.join("images");
    let mut dataset = CocoDataset { categories, ..Default::default() };
    for (index, image_path) in image_files.iter().enumerate() {
        let (width, height) = image::image_dimensions(image_path)
            .map_err(|e| DataError::Image { path: image_path.clone(), message: e.to_string() })?;
        let file_name = image_path
            .strip_prefix(&images_dir)
            .or_else(|_| image_path.strip_prefix(&root))
            .unwrap_or(image_path)
            .to_string_lossy()
            .replace('\\', "/");
        let image_id = index as u64 + 1;
        dataset.images.push(CocoImage { id: image_id, file_name, width, height, extra: Map::new() });
        let label_path = label_path_for(image_path);
        if label_path.is_file() {
            read_labels(&label_path, image_id, width, height, &names, &mut dataset.annotations)?;
        }
    }
    let images_dir = if images_dir.is_dir() { images_dir } else { root };
    Ok(YoloImport { dataset, images_dir })
}

/// The directory or list a `train`/`val`/`test` entry names, inside `root`. Roboflow's exports
/// write `../train/images` beside a yaml in the dataset's root; as Ultralytics does, such an entry
/// that does not exist is read without its leading `../` when that does.
fn split_source(root: &Path, entry: &str, yaml_path: &Path) -> Result<PathBuf> {
    if let Some(rest) = entry.strip_prefix("../")
        && !root.join(entry).exists()
        && root.join(rest).exists()
    {
        return crate::paths::inside(root, rest, &format!("a split of {}", yaml_path.display()));
    }
    crate::paths::inside(root, entry, &format!("a split of {}", yaml_path.display()))
}

/// Images of one yaml entry: a directory (searched recursively) or a `.txt` list of image paths.
fn list_images(source: &Path) -> Result<Vec<PathBuf>> {
    if source.is_file() {
        let text =
            std::fs::read_to_string(source).map_err(|e| DataError::io(source, "cannot read the image list", e))?;
        let base = source.parent().unwrap_or(Path::new("."));
        return text
            .lines()
            .enumerate()
            .map(|(n, line)| (n, line.trim()))
            .filter(|(_, line)| !line.is_empty())
            .map(|(n, line)| crate::paths::inside(base, line, &format!("line {} of {}", n + 1, source.display())))
            .collect();
    }
    let mut found = Vec::new();
    let mut stack = vec![source.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| DataError::io(&dir, "cannot read the image directory", e))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_lowercase().as_str()))
            {
                found.push(path);
            }
        }
    }
    Ok(found)
}

/// Ultralytics' `img2label_paths`: the last `images` directory becomes `labels`, the extension `.txt`.
fn label_path_for(image: &Path) -> PathBuf {
    let components: Vec<_> = image.components().collect();
    let position = components.iter().rposition(|c| c.as_os_str() == "images");
    let mut path: PathBuf = components
        .iter()
        .enumerate()
        .map(|(i, c)| if Some(i) == position { std::ffi::OsStr::new("labels") } else { c.as_os_str() })
        .collect();
    path.set_extension("txt");
    path
}

fn read_labels(
    path: &Path,
    image_id: u64,
    width: u32,
    height: u32,
    names: &[(u64, String)],
    annotations: &mut Vec<CocoAnnotation>,
) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, "cannot read the label file", e))?;
    parse_labels(&text, path, image_id, width, height, names, annotations)
}

/// The annotations of one label file's `text` (`path` names it in errors).
pub fn parse_labels(
    text: &str,
    path: &Path,
    image_id: u64,
    width: u32,
    height: u32,
    names: &[(u64, String)],
    annotations: &mut Vec<CocoAnnotation>,
) -> Result<()> {
    let (w, h) = (width as f64, height as f64);
    for (line_number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fail = |message: String| DataError::invalid(path, format!("line {}: {message}", line_number + 1));
        let values: Vec<f64> = line
            .split_whitespace()
            .map(|v| v.parse::<f64>().map_err(|_| fail(format!("'{v}' is not a number"))))
            .collect::<Result<_>>()?;
        let class = values[0];
        if class < 0.0 || class.fract() != 0.0 || !names.iter().any(|(id, _)| *id as f64 == class) {
            return Err(fail(format!("class {class} is not in the yaml's names")));
        }
        let coords = &values[1..];
        let (segmentation, bbox) = match coords.len() {
            4 => {
                let [cx, cy, bw, bh] = [coords[0], coords[1], coords[2], coords[3]];
                (None, Some([(cx - bw / 2.0) * w, (cy - bh / 2.0) * h, bw * w, bh * h]))
            }
            n if n >= 6 && n % 2 == 0 => {
                let polygon: Vec<f64> = coords.chunks_exact(2).flat_map(|p| [p[0] * w, p[1] * h]).collect();
                (Some(Segmentation::Polygons(vec![polygon])), None)
            }
            n => {
                return Err(fail(format!("{n} coordinates: expected 4 (box) or an even number >= 6 (polygon)")));
            }
        };
        annotations.push(CocoAnnotation {
            id: annotations.len() as u64 + 1,
            image_id,
            category_id: class as u64,
            segmentation,
            bbox,
            area: None,
            iscrowd: 0,
            keypoints: None,
            num_keypoints: None,
            extra: Map::new(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_path_replaces_the_last_images_directory() {
        assert_eq!(
            label_path_for(Path::new("/d/images/set/images/train/a.jpg")),
            PathBuf::from("/d/images/set/labels/train/a.txt")
        );
    }
}
