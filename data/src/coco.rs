//! COCO annotation files (the `instances_*.json` format of the COCO dataset and of annotation tools).
//!
//! Every struct keeps the fields kiln does not know in `extra`, so writing a file back never drops
//! what a user or their tool put there.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{DataError, Result};

pub type Extra = Map<String, Value>;

/// The largest width or height of an image kiln reads (a COCO file claiming more is refused, as a
/// decoder refuses such an image): `MAX_IMAGE_SIDE²` pixels still fit the `u32` run lengths of RLE.
pub const MAX_IMAGE_SIDE: u32 = 65_535;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CocoDataset {
    /// `info`, `licenses` and anything else at the top level, written back first as tools do.
    #[serde(flatten)]
    pub extra: Extra,
    pub images: Vec<CocoImage>,
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    pub categories: Vec<CocoCategory>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CocoAnnotation {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,
    /// `[x, y, width, height]` in pixels, top-left origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox: Option<[f64; 4]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<f64>,
    #[serde(default)]
    pub iscrowd: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keypoints: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_keypoints: Option<u32>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CocoCategory {
    pub id: u64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supercategory: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// An instance mask as COCO stores it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Segmentation {
    /// One or more polygons `[x1, y1, x2, y2, …]` whose union is the instance.
    Polygons(Vec<Vec<f64>>),
    /// Run-length encoding over the column-major mask (pycocotools' layout).
    Rle(RleJson),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RleJson {
    /// `[height, width]`.
    pub size: [u32; 2],
    pub counts: RleCounts,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RleCounts {
    /// Plain run lengths, as in `iscrowd` annotations of the COCO files.
    Uncompressed(Vec<u32>),
    /// pycocotools' compressed string (`rleToString`).
    Compressed(String),
}

impl Segmentation {
    /// Whether the segmentation holds any mask at all (tools write `[]` for box-only annotations).
    pub fn is_present(&self) -> bool {
        match self {
            Segmentation::Polygons(polygons) => polygons.iter().any(|p| !p.is_empty()),
            Segmentation::Rle(_) => true,
        }
    }
}

impl CocoAnnotation {
    /// The mask, if the annotation has a non-empty one.
    pub fn mask(&self) -> Option<&Segmentation> {
        self.segmentation.as_ref().filter(|s| s.is_present())
    }

    pub fn has_keypoints(&self) -> bool {
        self.num_keypoints.is_some_and(|n| n > 0)
            || self.keypoints.as_ref().is_some_and(|k| k.chunks(3).any(|kp| kp.get(2).is_some_and(|&v| v > 0.0)))
    }
}

impl CocoDataset {
    /// Reads and parses a COCO JSON file; the error names the file, line and column.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "cannot read the annotation file", e))?;
        Self::from_slice(&bytes, path)
    }

    /// Parses COCO JSON from memory; `path` only names the source in errors.
    pub fn from_slice(bytes: &[u8], path: &Path) -> Result<Self> {
        let dataset: Self = serde_json::from_slice(bytes).map_err(|e| DataError::Json {
            path: path.to_path_buf(),
            message: format!("{e}; a COCO file is one JSON object with `images`, `annotations` and `categories` lists"),
        })?;
        if !crate::paths::outside_paths_allowed() {
            dataset.check_file_names(path)?;
        }
        if let Some(image) = dataset.images.iter().find(|i| i.width > MAX_IMAGE_SIDE || i.height > MAX_IMAGE_SIDE) {
            return Err(DataError::invalid(
                path,
                format!(
                    "image {} ({}) claims {}x{} pixels; kiln reads images of at most {MAX_IMAGE_SIDE} pixels a side (tile larger ones first)",
                    image.id, image.file_name, image.width, image.height
                ),
            ));
        }
        Ok(dataset)
    }

    /// Every `file_name` must stay inside the images directory as written (no absolute path, no
    /// `..`): the error names the first ones (image id and path). Symlinks are checked where the
    /// images are opened ([`crate::paths::inside`]).
    pub fn check_file_names(&self, path: &Path) -> Result<()> {
        let outside: Vec<String> = self
            .images
            .iter()
            .filter_map(|image| {
                let how = crate::paths::escape(&image.file_name)?;
                Some(format!("image {} has file_name {:?}, which {how}", image.id, image.file_name))
            })
            .collect();
        if outside.is_empty() {
            return Ok(());
        }
        Err(DataError::invalid(
            path,
            format!(
                "{} image path{} would lead outside the images directory: {}{}; kiln reads images inside their \
                 directory only: fix the file_names, or pass --allow-outside-paths if you mean it",
                outside.len(),
                if outside.len() == 1 { "" } else { "s" },
                outside.iter().take(3).cloned().collect::<Vec<_>>().join("; "),
                if outside.len() > 3 { "; ..." } else { "" }
            ),
        ))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_json_atomic(path, self)
    }

    /// The dataset's category ids in ascending order: position = the contiguous class index a model uses.
    pub fn class_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.categories.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Category id → contiguous class index (ids sorted ascending).
    pub fn class_index(&self) -> HashMap<u64, usize> {
        self.class_ids().into_iter().enumerate().map(|(i, id)| (id, i)).collect()
    }

    /// Class names in class-index order.
    pub fn class_names(&self) -> Vec<String> {
        let names: HashMap<u64, &str> = self.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
        self.class_ids().iter().map(|id| names[id].to_string()).collect()
    }

    /// Image id → position in `images` (first occurrence wins for duplicate ids).
    pub fn image_positions(&self) -> HashMap<u64, usize> {
        let mut map = HashMap::with_capacity(self.images.len());
        for (i, image) in self.images.iter().enumerate() {
            map.entry(image.id).or_insert(i);
        }
        map
    }

    /// For each image (by position), the positions of its annotations.
    pub fn annotations_by_image(&self) -> Vec<Vec<usize>> {
        let positions = self.image_positions();
        let mut by_image = vec![Vec::new(); self.images.len()];
        for (a, annotation) in self.annotations.iter().enumerate() {
            if let Some(&i) = positions.get(&annotation.image_id) {
                by_image[i].push(a);
            }
        }
        by_image
    }

    /// A dataset with the same top-level fields and categories but only the given images (by position)
    /// and their annotations; ids are preserved.
    pub fn subset(&self, image_positions: &[usize]) -> CocoDataset {
        let mut keep: Vec<usize> = image_positions.to_vec();
        keep.sort_unstable();
        let ids: std::collections::HashSet<u64> = keep.iter().map(|&i| self.images[i].id).collect();
        CocoDataset {
            extra: self.extra.clone(),
            images: keep.iter().map(|&i| self.images[i].clone()).collect(),
            annotations: self.annotations.iter().filter(|a| ids.contains(&a.image_id)).cloned().collect(),
            categories: self.categories.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r##"{
      "info": {"description": "tool export"}, "my_tool_version": 3,
      "images": [{"id": 7, "file_name": "a.jpg", "width": 4, "height": 3, "license": 2}],
      "annotations": [
        {"id": 1, "image_id": 7, "category_id": 12, "segmentation": [[0, 0, 3, 0, 3, 2]], "reviewed": true},
        {"id": 2, "image_id": 7, "category_id": 12, "segmentation": {"size": [3, 4], "counts": [1, 2, 9]}, "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 3, "segmentation": {"size": [3, 4], "counts": "12K1"}, "bbox": [0, 0, 1, 1], "area": 1}
      ],
      "categories": [{"id": 12, "name": "bolt", "supercategory": "part"}, {"id": 3, "name": "nut", "color": "#f00"}]
    }"##;

    #[test]
    fn parses_every_segmentation_form_and_keeps_unknown_fields_on_write() {
        let dataset = CocoDataset::from_slice(SAMPLE.as_bytes(), Path::new("sample.json")).unwrap();
        assert!(matches!(dataset.annotations[0].segmentation, Some(Segmentation::Polygons(_))));
        assert!(matches!(
            dataset.annotations[1].segmentation,
            Some(Segmentation::Rle(RleJson { counts: RleCounts::Uncompressed(_), .. }))
        ));
        assert!(matches!(
            dataset.annotations[2].segmentation,
            Some(Segmentation::Rle(RleJson { counts: RleCounts::Compressed(_), .. }))
        ));
        assert_eq!(dataset.annotations[1].iscrowd, 1);

        let written = serde_json::to_value(&dataset).unwrap();
        assert_eq!(written["my_tool_version"], 3);
        assert_eq!(written["info"]["description"], "tool export");
        assert_eq!(written["images"][0]["license"], 2);
        assert_eq!(written["annotations"][0]["reviewed"], true);
        assert_eq!(written["categories"][1]["color"], "#f00");
        let reparsed: CocoDataset = serde_json::from_value(written).unwrap();
        assert_eq!(reparsed, dataset);
    }

    #[test]
    fn class_index_is_sorted_dataset_ids() {
        let dataset = CocoDataset::from_slice(SAMPLE.as_bytes(), Path::new("sample.json")).unwrap();
        assert_eq!(dataset.class_ids(), vec![3, 12]);
        assert_eq!(dataset.class_names(), vec!["nut", "bolt"]);
        assert_eq!(dataset.class_index()[&12], 1);
    }

    #[test]
    fn malformed_json_names_the_file_and_position() {
        let err = CocoDataset::from_slice(b"{\"images\": [", Path::new("broken.json")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("broken.json"), "{message}");
        assert!(message.contains("line 1"), "{message}");
    }
}
