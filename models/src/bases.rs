//! The pretrained bases kiln ships for its tiny presets (`models/bases/`): no vision checkpoint can
//! be downloaded where kiln is developed, so SAM `tiny` and GroundingDINO `tiny_minilm` were
//! pretrained by kiln itself on generated shapes (the *source* domain; recipe and metrics in
//! `models/bases/README.md`). A user fine-tuning a tiny teacher without weights starts from them, as
//! a user with the official checkpoints starts from those.

use std::path::PathBuf;

/// SAM `tiny` fully trained on 7 shape classes (`kiln synth --classes 7`, default style).
pub const SAM_TINY: &str = "sam_tiny_shapes.safetensors";
/// GroundingDINO `tiny_minilm` (all but its frozen all-MiniLM-L6-v2 text encoder) fully trained on
/// the same source domain.
pub const GROUNDING_DINO_TINY_MINILM: &str = "grounding_dino_tiny_minilm_shapes.safetensors";

/// The directory of the shipped bases (in the source tree, beside this crate's sources).
pub fn directory() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bases")
}

/// The shipped base of a teacher model (`sam` / `grounding_dino` and its preset name), if kiln has
/// one: its path, whether or not the file is still there.
pub fn shipped(teacher: &str, model: &str) -> Option<PathBuf> {
    let file = match (teacher, model) {
        ("sam", "tiny") => SAM_TINY,
        ("grounding_dino", "tiny_minilm") => GROUNDING_DINO_TINY_MINILM,
        _ => return None,
    };
    Some(directory().join(file))
}
