//! `--preset quick|dev|production|memory-efficient|high-quality` for `kiln train-student` and
//! `kiln train-teacher`: a few settings at once, between kiln's defaults and the flags (defaults,
//! then the preset, then the data, then every flag and `--set`). `production` is the defaults
//! (the official recipes). The run saves the preset's name and the values it set.

use serde::{Deserialize, Serialize};

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

    /// The student's `(epochs, imgsz, batch)` under this preset, from the defaults'.
    pub fn student(self, (epochs, imgsz, batch): (usize, u32, usize)) -> (usize, u32, usize) {
        match self {
            Preset::Quick => (10, 320, 16),
            Preset::Dev => (30, 480, 16),
            Preset::Production => (epochs, imgsz, batch),
            Preset::MemoryEfficient => (epochs, imgsz, 4),
            Preset::HighQuality => (epochs * 3, imgsz, batch),
        }
    }

    /// GroundingDINO's `(epochs, short side, batch, LoRA rank)` under this preset, from the defaults'.
    pub fn grounding_dino(
        self,
        (epochs, short, batch, rank): (usize, usize, usize, usize),
    ) -> (usize, usize, usize, usize) {
        match self {
            Preset::Quick => (3, 512, batch, 8),
            Preset::Dev => (6, 640, batch, rank),
            Preset::Production => (epochs, short, batch, rank),
            Preset::MemoryEfficient => (epochs, short, 1, 8),
            Preset::HighQuality => (epochs * 2, short, batch, rank * 2),
        }
    }

    /// SAM's `(epochs, batch, prompts per image, LoRA rank)` under this preset, from the defaults'.
    pub fn sam(self, (epochs, batch, prompts, rank): (usize, usize, usize, usize)) -> (usize, usize, usize, usize) {
        match self {
            Preset::Quick => (3, batch, prompts, 4),
            Preset::Dev => (5, batch, prompts, rank),
            Preset::Production => (epochs, batch, prompts, rank),
            Preset::MemoryEfficient => (epochs, 1, 8, 4),
            Preset::HighQuality => (epochs * 2, batch, prompts, rank * 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_is_the_defaults_and_each_preset_sets_its_values() {
        let (student, gdino, sam) = ((100, 640, 16), (12, 800, 2, 16), (10, 4, 16, 8));
        assert_eq!(Preset::Production.student(student), student);
        assert_eq!(Preset::Production.grounding_dino(gdino), gdino);
        assert_eq!(Preset::Production.sam(sam), sam);
        assert_eq!(Preset::Quick.student(student), (10, 320, 16));
        assert_eq!(Preset::MemoryEfficient.student(student), (100, 640, 4));
        assert_eq!(Preset::HighQuality.student(student), (300, 640, 16));
        assert_eq!(Preset::Quick.grounding_dino(gdino), (3, 512, 2, 8));
        assert_eq!(Preset::MemoryEfficient.grounding_dino(gdino), (12, 800, 1, 8));
        assert_eq!(Preset::HighQuality.grounding_dino(gdino), (24, 800, 2, 32));
        assert_eq!(Preset::Quick.sam(sam), (3, 4, 16, 4));
        assert_eq!(Preset::MemoryEfficient.sam(sam), (10, 1, 8, 4));
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
