//! kiln's training engine: the YOLOv8 losses, COCO evaluation, augmentation and the burn-train
//! Learner that trains a student from a COCO dataset.

pub mod augment;
pub mod commands;
pub mod data;
pub mod engine;
pub mod eval;
pub mod loss;
pub mod plots;
pub mod run;
pub mod student;
pub mod teacher;
