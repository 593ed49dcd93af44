//! `--preset quick|dev|production|memory-efficient|high-quality` for `kiln train-student` and
//! `kiln train-teacher`: a few settings at once, between kiln's defaults and the flags (defaults,
//! then the preset, then the data, then every flag and `--set`). `production` is the defaults
//! (the official recipes). The run saves the preset's name and the values it set.

use serde::{Deserialize, Serialize};

use crate::run::StudentConfig;
use crate::teacher::TeacherConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// A first look in minutes: few epochs, small inputs, small adapters.
    Quick,
    /// Iterating on data and settings: a third of the epochs, mid-size inputs.
    Dev,
    /// The official recipes (kiln's defaults).
    Production,
    /// The official recipes at batch 4 (student, the same effective batch through gradient
    /// accumulation to Ultralytics' nominal 64) or 1 (teachers), smaller adapters and fewer SAM
    /// prompts per image.
    MemoryEfficient,
    /// Three times the student's epochs, twice the teachers', larger adapters.
    HighQuality,
}

pub const ALL_PRESETS: [Preset; 5] =
    [Preset::Quick, Preset::Dev, Preset::Production, Preset::MemoryEfficient, Preset::HighQuality];

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        let wanted = name.trim().to_ascii_lowercase().replace('_', "-");
        ALL_PRESETS.into_iter().find(|p| p.name() == wanted).ok_or_else(|| {
            let known: Vec<&str> = ALL_PRESETS.iter().map(|p| p.name()).collect();
            format!("{name:?} is not a preset (known: {})", known.join(", "))
        })
    }
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Quick => "quick",
            Preset::Dev => "dev",
            Preset::Production => "production",
            Preset::MemoryEfficient => "memory-efficient",
            Preset::HighQuality => "high-quality",
        }
    }

    /// The student's epochs, input size, batch and nominal batch under this preset (from the
    /// defaults in `config`).
    pub fn apply_to_student(self, config: &mut StudentConfig) {
        let (epochs, imgsz, batch) = match self {
            Preset::Quick => (10, 320, 16),
            Preset::Dev => (30, 480, 16),
            Preset::Production => (config.epochs, config.imgsz, config.batch_size),
            Preset::MemoryEfficient => (config.epochs, config.imgsz, 4),
            Preset::HighQuality => (config.epochs * 3, config.imgsz, config.batch_size),
        };
        config.epochs = epochs;
        config.imgsz = imgsz;
        config.batch_size = batch;
        config.close_mosaic = config.close_mosaic.min(epochs / 3);
        config.preset = Some(self);
    }

    /// The teachers' epochs, input size, batch and LoRA rank under this preset (from the defaults
    /// in `config`; alpha stays twice the rank, as in the defaults).
    pub fn apply_to_teachers(self, config: &mut TeacherConfig) {
        if let Some(g) = config.grounding_dino.as_mut() {
            let (epochs, short, batch, rank) = match self {
                Preset::Quick => (3, 512, g.batch_size, 8),
                Preset::Dev => (6, 640, g.batch_size, g.lora.rank),
                Preset::Production => (g.epochs, g.image_size, g.batch_size, g.lora.rank),
                Preset::MemoryEfficient => (g.epochs, g.image_size, 1, 8),
                Preset::HighQuality => (g.epochs * 2, g.image_size, g.batch_size, g.lora.rank * 2),
            };
            g.max_size = g.max_size * short / g.image_size.max(1);
            (g.epochs, g.image_size, g.batch_size) = (epochs, short, batch);
            (g.lora.rank, g.lora.alpha) = (rank, 2.0 * rank as f64);
        }
        if let Some(s) = config.sam.as_mut() {
            let (epochs, batch, prompts, rank) = match self {
                Preset::Quick => (3, s.batch_size, s.max_prompts_per_image, 4),
                Preset::Dev => (5, s.batch_size, s.max_prompts_per_image, s.lora.rank),
                Preset::Production => (s.epochs, s.batch_size, s.max_prompts_per_image, s.lora.rank),
                Preset::MemoryEfficient => (s.epochs, 1, 8, 4),
                Preset::HighQuality => (s.epochs * 2, s.batch_size, s.max_prompts_per_image, s.lora.rank * 2),
            };
            (s.epochs, s.batch_size, s.max_prompts_per_image) = (epochs, batch, prompts);
            (s.lora.rank, s.lora.alpha) = (rank, 2.0 * rank as f64);
        }
        config.preset = Some(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_is_the_defaults() {
        let mut student = StudentConfig::default();
        Preset::Production.apply_to_student(&mut student);
        assert_eq!(student.preset, Some(Preset::Production));
        assert_eq!(StudentConfig { preset: None, ..student }, StudentConfig::default());
        let mut teachers = TeacherConfig::default();
        Preset::Production.apply_to_teachers(&mut teachers);
        assert_eq!(TeacherConfig { preset: None, ..teachers }, TeacherConfig::default());
    }

    #[test]
    fn each_preset_sets_its_values() {
        let mut quick = StudentConfig::default();
        Preset::Quick.apply_to_student(&mut quick);
        assert_eq!((quick.epochs, quick.imgsz, quick.batch_size, quick.close_mosaic), (10, 320, 16, 3));
        let mut small = StudentConfig::default();
        Preset::MemoryEfficient.apply_to_student(&mut small);
        assert_eq!((small.epochs, small.imgsz, small.batch_size, small.nbs), (100, 640, 4, 64));
        let mut long = StudentConfig::default();
        Preset::HighQuality.apply_to_student(&mut long);
        assert_eq!(long.epochs, 300);

        let mut teachers = TeacherConfig::default();
        Preset::Quick.apply_to_teachers(&mut teachers);
        let g = teachers.grounding_dino.as_ref().unwrap();
        assert_eq!((g.epochs, g.image_size, g.max_size, g.lora.rank, g.lora.alpha), (3, 512, 853, 8, 16.0));
        let s = teachers.sam.as_ref().unwrap();
        assert_eq!((s.epochs, s.lora.rank, s.lora.alpha), (3, 4, 8.0));
        let mut lean = TeacherConfig::default();
        Preset::MemoryEfficient.apply_to_teachers(&mut lean);
        let (g, s) = (lean.grounding_dino.unwrap(), lean.sam.unwrap());
        assert_eq!((g.batch_size, g.image_size, s.batch_size, s.max_prompts_per_image), (1, 800, 1, 8));
    }

    #[test]
    fn names_parse() {
        for preset in ALL_PRESETS {
            assert_eq!(preset.name().parse::<Preset>(), Ok(preset));
            let yaml = serde_yaml::to_string(&preset).unwrap();
            assert_eq!(yaml.trim(), preset.name());
        }
        assert_eq!("Memory_Efficient".parse::<Preset>(), Ok(Preset::MemoryEfficient));
        let error = "fast".parse::<Preset>().unwrap_err();
        assert!(error.contains("fast") && error.contains("high-quality"), "{error}");
    }
}
