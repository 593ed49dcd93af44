//! Augmentation chosen from what the user knows about the objects and their scene: `--objects
//! small,reflective,...`, `--environment low-light,motion,...` and `--augment-intensity
//! low|medium|high` become an [`AugmentConfig`] through one table ([`TABLE`], printed in the README
//! and by `kiln train-student --help`). Without characteristics, and at medium intensity, the recipe
//! is the default (Ultralytics') one, unchanged.
//!
//! Each characteristic raises some parameters to at least a value (the transform it calls for) or
//! caps some at most a value (a transform that would destroy what matters, e.g. blur on thin
//! objects). Raises combine by maximum, caps by minimum, and a cap wins over a raise; the intensity
//! then scales every magnitude (the default recipe's and the raised ones) by 0.5, 1 or 1.5.

use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;

/// What the objects are like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectTrait {
    /// A few pixels across: shrink less, hide nothing, blur little, zoom in on them.
    Small,
    /// Filling much of the frame: scale and shift more, seen in perspective.
    Large,
    /// Wires, cracks, edges: blur, motion, noise and compression would erase them.
    Thin,
    /// Metal, glass: exposure and contrast swing with the viewpoint.
    Reflective,
    /// No up or down (parts in a tray, cells, seen from any side): flip vertically, any rotation.
    Symmetric,
    /// Often partly hidden by others or by clutter: cutout patches, objects pasted over others.
    Occluded,
}

/// What the scene and the camera are like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Environment {
    /// Daylight, weather: exposure, contrast and gamma vary.
    Outdoor,
    /// Artificial light: colour temperature and flicker vary a little.
    Indoor,
    /// Dark scenes: strong exposure and gamma changes, sensor noise.
    LowLight,
    /// A moving camera or moving objects: motion blur, some defocus.
    Motion,
    /// The framing never changes: less scaling and shifting, no rotation, shear or perspective.
    FixedCamera,
    /// Seen from above (drones, conveyor belts): flip vertically, any rotation.
    TopDown,
    /// Low-quality or streamed video: JPEG artefacts and noise.
    Compressed,
}

/// How strongly the recipe changes the images: every magnitude times 0.5, 1 or 1.5.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Intensity {
    Low,
    #[default]
    Medium,
    High,
}

impl Intensity {
    pub fn factor(self) -> f64 {
        match self {
            Intensity::Low => 0.5,
            Intensity::Medium => 1.0,
            Intensity::High => 1.5,
        }
    }
}

/// What the user said; saved in the run's config beside the recipe it became.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Characteristics {
    #[serde(default)]
    pub objects: Vec<ObjectTrait>,
    #[serde(default)]
    pub environment: Vec<Environment>,
    #[serde(default)]
    pub intensity: Intensity,
}

/// An augmentation parameter the table sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parameter {
    Scale,
    Translate,
    HsvH,
    HsvS,
    HsvV,
    Flipud,
    Brightness,
    Contrast,
    Gamma,
    Noise,
    Blur,
    MotionBlur,
    Jpeg,
    Cutout,
    Degrees,
    Shear,
    Perspective,
    CopyPaste,
    Zoom,
}

impl Parameter {
    /// Its key in `augment:` (`--set augment.KEY=VALUE`).
    pub fn key(self) -> &'static str {
        match self {
            Parameter::Scale => "scale",
            Parameter::Translate => "translate",
            Parameter::HsvH => "hsv_h",
            Parameter::HsvS => "hsv_s",
            Parameter::HsvV => "hsv_v",
            Parameter::Flipud => "flipud",
            Parameter::Brightness => "brightness",
            Parameter::Contrast => "contrast",
            Parameter::Gamma => "gamma",
            Parameter::Noise => "noise",
            Parameter::Blur => "blur",
            Parameter::MotionBlur => "motion_blur",
            Parameter::Jpeg => "jpeg",
            Parameter::Cutout => "cutout",
            Parameter::Degrees => "degrees",
            Parameter::Shear => "shear",
            Parameter::Perspective => "perspective",
            Parameter::CopyPaste => "copy_paste",
            Parameter::Zoom => "zoom",
        }
    }

    fn of(self, config: &mut AugmentConfig) -> &mut f64 {
        match self {
            Parameter::Scale => &mut config.scale,
            Parameter::Translate => &mut config.translate,
            Parameter::HsvH => &mut config.hsv_h,
            Parameter::HsvS => &mut config.hsv_s,
            Parameter::HsvV => &mut config.hsv_v,
            Parameter::Flipud => &mut config.flipud,
            Parameter::Brightness => &mut config.brightness,
            Parameter::Contrast => &mut config.contrast,
            Parameter::Gamma => &mut config.gamma,
            Parameter::Noise => &mut config.noise,
            Parameter::Blur => &mut config.blur,
            Parameter::MotionBlur => &mut config.motion_blur,
            Parameter::Jpeg => &mut config.jpeg,
            Parameter::Cutout => &mut config.cutout,
            Parameter::Degrees => &mut config.degrees,
            Parameter::Shear => &mut config.shear,
            Parameter::Perspective => &mut config.perspective,
            Parameter::CopyPaste => &mut config.copy_paste,
            Parameter::Zoom => &mut config.zoom,
        }
    }

    /// The most a value may be after the intensity: probabilities stay probabilities, gains stay
    /// positive, a shift stays inside the image.
    fn ceiling(self) -> f64 {
        match self {
            Parameter::Translate => 0.45,
            Parameter::Scale | Parameter::Brightness | Parameter::Contrast | Parameter::HsvS | Parameter::HsvV => 0.9,
            Parameter::HsvH => 0.5,
            Parameter::Gamma => 2.0,
            Parameter::Noise => 0.2,
            Parameter::Flipud
            | Parameter::Blur
            | Parameter::MotionBlur
            | Parameter::Jpeg
            | Parameter::Cutout
            | Parameter::CopyPaste
            | Parameter::Zoom => 1.0,
            // Any orientation; a shear that keeps shapes recognisable; Ultralytics' range.
            Parameter::Degrees => 180.0,
            Parameter::Shear => 10.0,
            Parameter::Perspective => 0.001,
        }
    }
}

/// One rule of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// At least this value.
    Raise(Parameter, f64),
    /// At most this value.
    Cap(Parameter, f64),
}

use Parameter::*;
use Rule::{Cap, Raise};

/// Which characteristic a row of the table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Characteristic {
    Object(ObjectTrait),
    Environment(Environment),
}

/// The table: each characteristic and its rules.
pub const TABLE: &[(Characteristic, &[Rule])] = &[
    (
        Characteristic::Object(ObjectTrait::Small),
        &[Cap(Scale, 0.3), Cap(Cutout, 0.0), Cap(Blur, 0.1), Raise(Zoom, 0.3)],
    ),
    (
        Characteristic::Object(ObjectTrait::Large),
        &[Raise(Scale, 0.7), Raise(Translate, 0.2), Raise(Perspective, 0.0005)],
    ),
    (
        Characteristic::Object(ObjectTrait::Thin),
        &[Cap(Blur, 0.0), Cap(MotionBlur, 0.1), Cap(Jpeg, 0.1), Cap(Noise, 0.02)],
    ),
    (
        Characteristic::Object(ObjectTrait::Reflective),
        &[Raise(Brightness, 0.3), Raise(Contrast, 0.3), Raise(HsvV, 0.6)],
    ),
    (Characteristic::Object(ObjectTrait::Symmetric), &[Raise(Flipud, 0.5), Raise(Degrees, 180.0)]),
    (Characteristic::Object(ObjectTrait::Occluded), &[Raise(Cutout, 0.5), Raise(CopyPaste, 0.3)]),
    (
        Characteristic::Environment(Environment::Outdoor),
        &[Raise(Brightness, 0.3), Raise(Contrast, 0.2), Raise(Gamma, 0.3), Raise(HsvV, 0.5)],
    ),
    (Characteristic::Environment(Environment::Indoor), &[Raise(Brightness, 0.2), Raise(HsvH, 0.03)]),
    (
        Characteristic::Environment(Environment::LowLight),
        &[Raise(Brightness, 0.6), Raise(Gamma, 0.5), Raise(Contrast, 0.3), Raise(Noise, 0.05)],
    ),
    (Characteristic::Environment(Environment::Motion), &[Raise(MotionBlur, 0.5), Raise(Blur, 0.2)]),
    (
        Characteristic::Environment(Environment::FixedCamera),
        &[Cap(Scale, 0.2), Cap(Translate, 0.05), Cap(Degrees, 0.0), Cap(Shear, 0.0), Cap(Perspective, 0.0)],
    ),
    (Characteristic::Environment(Environment::TopDown), &[Raise(Flipud, 0.5), Raise(Degrees, 180.0)]),
    (Characteristic::Environment(Environment::Compressed), &[Raise(Jpeg, 0.5), Raise(Noise, 0.02)]),
];

/// The parameters the intensity scales: every magnitude but the mosaic and the horizontal flip
/// (Ultralytics' always-on defaults).
const SCALED: [Parameter; 19] = [
    Scale,
    Translate,
    HsvH,
    HsvS,
    HsvV,
    Flipud,
    Brightness,
    Contrast,
    Gamma,
    Noise,
    Blur,
    MotionBlur,
    Jpeg,
    Cutout,
    Degrees,
    Shear,
    Perspective,
    CopyPaste,
    Zoom,
];

/// The rules of one characteristic.
pub fn rules(characteristic: Characteristic) -> &'static [Rule] {
    TABLE.iter().find(|(c, _)| *c == characteristic).map_or(&[], |(_, rules)| rules)
}

impl Characteristics {
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.environment.is_empty() && self.intensity == Intensity::Medium
    }

    /// `base` (the default recipe, or the config's) changed as the table says.
    pub fn recipe(&self, base: AugmentConfig) -> AugmentConfig {
        let mut config = base;
        let chosen: Vec<Characteristic> = self
            .objects
            .iter()
            .map(|&o| Characteristic::Object(o))
            .chain(self.environment.iter().map(|&e| Characteristic::Environment(e)))
            .collect();
        let all: Vec<Rule> = chosen.iter().flat_map(|&c| rules(c).iter().copied()).collect();
        for rule in &all {
            if let Raise(parameter, value) = *rule {
                let current = parameter.of(&mut config);
                *current = current.max(value);
            }
        }
        let factor = self.intensity.factor();
        for parameter in SCALED {
            let value = parameter.of(&mut config);
            *value = (*value * factor).min(parameter.ceiling().max(*value));
        }
        for rule in &all {
            if let Cap(parameter, value) = *rule {
                let current = parameter.of(&mut config);
                *current = current.min(value);
            }
        }
        config
    }
}

impl Characteristics {
    /// In the flags' words: `--objects small,thin --environment low-light --augment-intensity high`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.objects.is_empty() {
            parts.push(format!("--objects {}", self.objects.iter().map(kebab).collect::<Vec<_>>().join(",")));
        }
        if !self.environment.is_empty() {
            parts.push(format!("--environment {}", self.environment.iter().map(kebab).collect::<Vec<_>>().join(",")));
        }
        if self.intensity != Intensity::Medium {
            parts.push(format!("--augment-intensity {}", kebab(&self.intensity)));
        }
        parts.join(" ")
    }

    /// The teachers' share of the recipe: the light and camera changes (and, for GroundingDINO,
    /// the vertical flip), on top of no augmentation; the student's geometric recipe (mosaic,
    /// scale, translation) and cutout are not theirs.
    pub fn teacher_recipe(&self, vertical_flip: bool) -> AugmentConfig {
        let all = self.recipe(AugmentConfig::none());
        AugmentConfig {
            flipud: if vertical_flip { all.flipud } else { 0.0 },
            brightness: all.brightness,
            contrast: all.contrast,
            gamma: all.gamma,
            noise: all.noise,
            blur: all.blur,
            motion_blur: all.motion_blur,
            jpeg: all.jpeg,
            ..AugmentConfig::none()
        }
    }
}

/// What the characteristics changed in the recipe, as `key old -> new` (for the run's log).
pub fn changes(base: &AugmentConfig, chosen: &AugmentConfig) -> Vec<String> {
    let (a, b) = (serde_yaml::to_value(base), serde_yaml::to_value(chosen));
    let (Ok(serde_yaml::Value::Mapping(a)), Ok(serde_yaml::Value::Mapping(b))) = (a, b) else {
        return Vec::new();
    };
    b.iter()
        .filter(|(key, value)| a.get(*key) != Some(*value))
        .map(|(key, value)| {
            let number = |v: Option<&serde_yaml::Value>| v.and_then(|v| v.as_f64()).unwrap_or(0.0);
            format!("{} {} -> {}", key.as_str().unwrap_or("?"), number(a.get(key)), number(Some(value)))
        })
        .collect()
}

/// The table in Markdown, for `--help`, the README and the run's log.
pub fn table_markdown() -> String {
    let mut out = String::from("| characteristic | augmentation |\n|---|---|\n");
    for (characteristic, rules) in TABLE {
        let name = match characteristic {
            Characteristic::Object(o) => format!("--objects {}", kebab(o)),
            Characteristic::Environment(e) => format!("--environment {}", kebab(e)),
        };
        let rules: Vec<String> = rules
            .iter()
            .map(|rule| match rule {
                Raise(p, v) => format!("{} ≥ {v}", p.key()),
                Cap(p, v) => format!("{} ≤ {v}", p.key()),
            })
            .collect();
        out.push_str(&format!("| {name} | {} |\n", rules.join(", ")));
    }
    out
}

/// Every name of a characteristic enum, for error messages and `--help`.
fn names<T: Serialize>(all: &[T]) -> String {
    all.iter().map(kebab).collect::<Vec<_>>().join(", ")
}

pub const ALL_OBJECTS: [ObjectTrait; 6] = [
    ObjectTrait::Small,
    ObjectTrait::Large,
    ObjectTrait::Thin,
    ObjectTrait::Reflective,
    ObjectTrait::Symmetric,
    ObjectTrait::Occluded,
];
pub const ALL_ENVIRONMENTS: [Environment; 7] = [
    Environment::Outdoor,
    Environment::Indoor,
    Environment::LowLight,
    Environment::Motion,
    Environment::FixedCamera,
    Environment::TopDown,
    Environment::Compressed,
];

macro_rules! parse_by_name {
    ($type:ty, $all:expr, $what:literal) => {
        impl std::str::FromStr for $type {
            type Err = String;
            fn from_str(name: &str) -> Result<Self, String> {
                let wanted = name.trim().to_ascii_lowercase().replace('_', "-");
                $all.into_iter()
                    .find(|v| kebab(v) == wanted)
                    .ok_or_else(|| format!("{name:?} is not {} (known: {})", $what, names(&$all)))
            }
        }
    };
}
parse_by_name!(ObjectTrait, ALL_OBJECTS, "an object characteristic");
parse_by_name!(Environment, ALL_ENVIRONMENTS, "an environment");
parse_by_name!(Intensity, [Intensity::Low, Intensity::Medium, Intensity::High], "an intensity");

fn kebab<T: Serialize>(value: &T) -> String {
    serde_yaml::to_string(value).map(|s| s.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(objects: &[ObjectTrait], environment: &[Environment], intensity: Intensity) -> AugmentConfig {
        Characteristics { objects: objects.to_vec(), environment: environment.to_vec(), intensity }
            .recipe(AugmentConfig::default())
    }

    #[test]
    fn without_characteristics_the_recipe_is_the_default() {
        assert!(Characteristics::default().is_empty());
        assert_eq!(Characteristics::default().recipe(AugmentConfig::default()), AugmentConfig::default());
    }

    /// Every characteristic alone sets exactly what its row of the table says, and nothing else.
    #[test]
    fn every_characteristic_maps_to_its_rules() {
        let base = AugmentConfig::default();
        for (characteristic, rules) in TABLE {
            let (objects, environment) = match *characteristic {
                Characteristic::Object(o) => (vec![o], vec![]),
                Characteristic::Environment(e) => (vec![], vec![e]),
            };
            let mut config = with(&objects, &environment, Intensity::Medium);
            for rule in *rules {
                let (parameter, expected) = match *rule {
                    Raise(p, v) => (p, v.max(*p.of(&mut base.clone()))),
                    Cap(p, v) => (p, v.min(*p.of(&mut base.clone()))),
                };
                assert_eq!(*parameter.of(&mut config), expected, "{characteristic:?} {rule:?}");
                // Put back, so that what is left to compare is what the rules do not name.
                *parameter.of(&mut config) = *parameter.of(&mut base.clone());
            }
            assert_eq!(config, base, "{characteristic:?} changes only what its rules name");
        }
    }

    #[test]
    fn raises_take_the_maximum_caps_win_and_intensity_scales() {
        // Outdoor raises brightness to 0.3, low light to 0.6: the larger.
        let both = with(&[], &[Environment::Outdoor, Environment::LowLight], Intensity::Medium);
        assert_eq!((both.brightness, both.gamma, both.noise), (0.6, 0.5, 0.05));
        // Motion asks for blur, thin objects forbid it.
        let thin = with(&[ObjectTrait::Thin], &[Environment::Motion], Intensity::Medium);
        assert_eq!((thin.blur, thin.motion_blur), (0.0, 0.1));
        // High intensity: everything x1.5, within the ceilings; caps still hold.
        let high = with(&[ObjectTrait::Thin], &[Environment::Motion, Environment::LowLight], Intensity::High);
        assert!((high.brightness - 0.9).abs() < 1e-12 && (high.gamma - 0.75).abs() < 1e-12);
        assert!((high.hsv_s - 0.9).abs() < 1e-12, "0.7 x 1.5 within its ceiling: {high:?}");
        assert!((high.scale - 0.75).abs() < 1e-12 && (high.hsv_v - 0.6).abs() < 1e-12);
        assert_eq!((high.blur, high.motion_blur), (0.0, 0.1));
        let low = with(&[], &[], Intensity::Low);
        assert!((low.scale - 0.25).abs() < 1e-12 && (low.translate - 0.05).abs() < 1e-12);
        assert_eq!((low.mosaic, low.fliplr), (1.0, 0.5));
    }

    #[test]
    fn teachers_take_the_light_and_camera_changes_only() {
        let c = Characteristics {
            objects: vec![ObjectTrait::Large, ObjectTrait::Symmetric, ObjectTrait::Occluded],
            environment: vec![Environment::LowLight],
            intensity: Intensity::Medium,
        };
        let gdino = c.teacher_recipe(true);
        assert_eq!((gdino.brightness, gdino.gamma, gdino.noise, gdino.flipud), (0.6, 0.5, 0.05, 0.5));
        assert_eq!((gdino.scale, gdino.translate, gdino.cutout, gdino.mosaic, gdino.fliplr), (0.0, 0.0, 0.0, 0.0, 0.0));
        assert_eq!(c.teacher_recipe(false).flipud, 0.0);
        assert_eq!((gdino.degrees, gdino.shear, gdino.perspective), (0.0, 0.0, 0.0), "boxes would not stay exact");
        assert_eq!((gdino.copy_paste, gdino.zoom), (0.0, 0.0));
        assert!(Characteristics::default().teacher_recipe(true).is_none());
    }

    #[test]
    fn the_names_are_the_flags() {
        let c: Characteristics = serde_yaml::from_str(
            "objects: [small, reflective]\nenvironment: [low-light, fixed-camera]\nintensity: high",
        )
        .unwrap();
        assert_eq!(c.objects, vec![ObjectTrait::Small, ObjectTrait::Reflective]);
        assert_eq!(c.environment, vec![Environment::LowLight, Environment::FixedCamera]);
        let table = table_markdown();
        assert!(table.contains("| --environment low-light | brightness ≥ 0.6"), "{table}");
        assert_eq!(table.lines().count(), TABLE.len() + 2);
        let readme = include_str!("../../README.md");
        assert!(readme.contains(&table), "README's table is the code's:\n{table}");
        assert_eq!(TABLE.len(), ALL_OBJECTS.len() + ALL_ENVIRONMENTS.len(), "every characteristic has a row");
        assert_eq!("Low_Light".parse::<Environment>(), Ok(Environment::LowLight));
        let said = Characteristics {
            objects: vec![ObjectTrait::Thin],
            environment: vec![Environment::LowLight, Environment::Motion],
            intensity: Intensity::High,
        };
        assert_eq!(said.describe(), "--objects thin --environment low-light,motion --augment-intensity high");
        let motion = with(&[], &[Environment::Motion], Intensity::Medium);
        assert_eq!(changes(&AugmentConfig::default(), &motion), vec!["blur 0 -> 0.2", "motion_blur 0 -> 0.5"]);
        let error = "dusty".parse::<Environment>().unwrap_err();
        assert!(error.contains("dusty") && error.contains("low-light, motion"), "{error}");
    }
}
