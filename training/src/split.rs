//! The training and validation splits of a run, as every run (student or teacher) reads them.

use std::path::{Path, PathBuf};

use kiln_data::coco::CocoDataset;

use crate::error::TrainError;

/// Datasets and where the images are.
pub struct StudentData {
    pub train: CocoDataset,
    pub val: CocoDataset,
    pub train_images: PathBuf,
    pub val_images: PathBuf,
}

impl StudentData {
    /// The first `n` images of each set (a dry run's).
    pub fn first_images(mut self, n: usize) -> Self {
        let first = |set: &CocoDataset| set.subset(&(0..n.min(set.images.len())).collect::<Vec<_>>());
        self.train = first(&self.train);
        self.val = first(&self.val);
        self
    }
}

/// The training and validation sets as a student run uses them: read (COCO JSON or a YOLO
/// dataset), repaired in memory (boxes and areas derived from masks), checked to share one class
/// list; plus the summary that picks the student.
pub fn load_student_data(
    train: &Path,
    val: &Path,
    images: Option<&Path>,
) -> Result<(StudentData, kiln_data::DatasetSummary), TrainError> {
    let read = |path: &Path| -> Result<(CocoDataset, PathBuf, kiln_data::DatasetSummary), TrainError> {
        let loaded = kiln_data::load_dataset(path, images)?;
        let mut dataset = loaded.dataset;
        // Inspected as given (the student follows what the user labelled), then repaired.
        let summary = kiln_data::inspect(&dataset);
        kiln_data::repair(&mut dataset);
        if !loaded.images_dir.is_dir() {
            return Err(TrainError::Config(format!(
                "{}: image directory {} not found; pass --images DIR (the directory `file_name`s are relative to)",
                path.display(),
                loaded.images_dir.display()
            )));
        }
        Ok((dataset, loaded.images_dir, summary))
    };
    let (train_set, train_images, summary) = read(train)?;
    let (val_set, val_images, _) = read(val)?;
    if train_set.class_ids() != val_set.class_ids() || train_set.class_names() != val_set.class_names() {
        return Err(TrainError::Config(format!(
            "{} and {} have different categories: split one dataset with `kiln validate --split` so both share its classes",
            train.display(),
            val.display()
        )));
    }
    if train_set.categories.is_empty() {
        return Err(TrainError::Config(format!("{}: the dataset has no categories", train.display())));
    }
    Ok((StudentData { train: train_set, val: val_set, train_images, val_images }, summary))
}
