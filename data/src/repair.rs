//! Repair: fill in what can be derived. Each annotation without a `bbox` gets the tight box of its
//! mask, and each without an `area` gets the mask's pixel count (both as pycocotools computes them);
//! a box-only annotation without an area gets the box's area, as pycocotools' `loadRes` does.
//! Instances are never merged, dropped or reordered.

use rayon::prelude::*;
use serde::Serialize;

use crate::coco::CocoDataset;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RepairSummary {
    pub bbox_from_mask: usize,
    pub area_from_mask: usize,
    pub area_from_box: usize,
    /// Annotations whose missing fields could not be derived (unknown image, broken mask); the
    /// validation report says why.
    pub not_derivable: usize,
}

impl RepairSummary {
    pub fn derived_anything(&self) -> bool {
        self.bbox_from_mask + self.area_from_mask + self.area_from_box > 0
    }
}

#[derive(Default)]
struct Derived {
    bbox: bool,
    area_from_mask: bool,
    area_from_box: bool,
    failed: bool,
}

pub fn repair(dataset: &mut CocoDataset) -> RepairSummary {
    let sizes: std::collections::HashMap<u64, (u32, u32)> =
        dataset.images.iter().map(|i| (i.id, (i.height, i.width))).collect();
    let outcomes: Vec<Derived> = dataset
        .annotations
        .par_iter_mut()
        .map(|annotation| {
            let mut derived = Derived::default();
            if annotation.bbox.is_some() && annotation.area.is_some() {
                return derived;
            }
            if let Some(mask) = annotation.mask() {
                let rle = sizes.get(&annotation.image_id).and_then(|&(h, w)| mask.to_rle(h, w).ok());
                let Some(rle) = rle else {
                    derived.failed = true;
                    return derived;
                };
                if annotation.bbox.is_none() {
                    annotation.bbox = Some(rle.bbox());
                    derived.bbox = true;
                }
                if annotation.area.is_none() {
                    annotation.area = Some(rle.area() as f64);
                    derived.area_from_mask = true;
                }
            } else if let (Some([_, _, w, h]), None) = (annotation.bbox, annotation.area) {
                annotation.area = Some(w.max(0.0) * h.max(0.0));
                derived.area_from_box = true;
            }
            derived
        })
        .collect();
    let mut summary = RepairSummary::default();
    for d in outcomes {
        summary.bbox_from_mask += d.bbox as usize;
        summary.area_from_mask += d.area_from_mask as usize;
        summary.area_from_box += d.area_from_box as usize;
        summary.not_derivable += d.failed as usize;
    }
    summary
}
