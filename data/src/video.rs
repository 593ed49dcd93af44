//! Video datasets imported into the same COCO types, each frame an image that carries its
//! `video_id` (so `kiln validate` keeps a video in one split) and `frame_index`, each object's mask
//! a compressed RLE with its box and area, and the object's id in the video as `track_id`:
//!
//! - the DAVIS / SAM 2 video-predictor layout: `JPEGImages/<video>/<frame>.jpg` and
//!   `Annotations/<video>/<frame>.png`, palette (or grey) PNG masks whose pixel value is the
//!   object's id (0 background; as SAM 2's loader reads them, so DAVIS 2016's 255 is an object);
//!   a level between the folders and the videos (DAVIS's `480p/`) is followed. Annotated frames
//!   become images.
//! - SAM 2's SA-V: per video `<video>_manual.json` (else `_auto.json`) whose `masklet[k]` holds one
//!   COCO compressed RLE per object for annotated frame `k`, which is video frame `4 k` (6 fps of
//!   24); the frames as SAM 2's extraction script writes them (`<video>/00000.jpg, 00004.jpg, ...`)
//!   under `JPEGImages_24fps/`, `JPEGImages/` or the dataset's root. Empty (or null) masks are
//!   objects absent from that frame.
//!
//! Class names: by default every object is the class `object` (both layouts are class-agnostic);
//! a mapping file `classes.yaml` (or `.yml`/`.json`) in the dataset's root names them per video
//! and object id (`bear: {1: bear}`, `dogs-jump: {1: person, 2: dog}`; a `"*"` entry applies to
//! every video), or `--class-names a,b` names object id k by the k-th name in every video. An id
//! that neither names is an error naming the mask file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::coco::{CocoAnnotation, CocoCategory, CocoDataset, CocoImage, Segmentation};
use crate::error::{DataError, Result};
use crate::mask::{BinaryMask, Rle};

/// A video dataset as COCO, with the directory its `file_name`s are relative to.
pub struct VideoImport {
    pub dataset: CocoDataset,
    pub images_dir: PathBuf,
    pub format: &'static str,
}

/// The class name of a video's object id: a mapping file, `--class-names`, or `object`.
struct ClassNaming {
    by_video: HashMap<String, HashMap<u32, String>>,
    by_id: Option<Vec<String>>,
    source: Option<PathBuf>,
}

impl ClassNaming {
    fn load(root: &Path, class_names: Option<&[String]>) -> Result<Self> {
        let by_id = class_names.map(<[String]>::to_vec);
        let file = ["classes.yaml", "classes.yml", "classes.json"].iter().map(|f| root.join(f)).find(|p| p.is_file());
        let Some(file) = file else {
            return Ok(ClassNaming { by_video: HashMap::new(), by_id, source: None });
        };
        let text =
            std::fs::read_to_string(&file).map_err(|e| DataError::io(&file, "cannot read the class mapping", e))?;
        let parsed: BTreeMap<String, BTreeMap<u32, String>> = serde_yaml::from_str(&text).map_err(|e| {
            DataError::invalid(
                &file,
                format!("not a class mapping (`VIDEO: {{OBJECT_ID: CLASS}}`, e.g. `bear: {{1: bear}}`): {e}"),
            )
        })?;
        let by_video = parsed.into_iter().map(|(video, ids)| (video, ids.into_iter().collect())).collect();
        Ok(ClassNaming { by_video, by_id, source: Some(file) })
    }

    fn name(&self, video: &str, id: u32, mask_file: &Path) -> Result<String> {
        if let Some(names) = &self.by_id {
            return names.get(id as usize - 1).cloned().ok_or_else(|| {
                DataError::invalid(
                    mask_file,
                    format!(
                        "object id {id} has no class: --class-names gives {} names ({}), for ids 1 to {}",
                        names.len(),
                        names.join(", "),
                        names.len()
                    ),
                )
            });
        }
        let Some(source) = &self.source else {
            return Ok("object".to_string());
        };
        self.by_video
            .get(video)
            .and_then(|ids| ids.get(&id))
            .or_else(|| self.by_video.get("*").and_then(|ids| ids.get(&id)))
            .cloned()
            .ok_or_else(|| {
                DataError::invalid(
                    mask_file,
                    format!(
                        "object id {id} of video {video:?} is not in the class mapping {}: add `{video}: {{{id}: CLASS}}`",
                        source.display()
                    ),
                )
            })
    }
}

/// Whether `dir` has the DAVIS / SAM 2 video-predictor layout (frames, with or without masks).
pub fn is_davis_layout(dir: &Path) -> bool {
    dir.is_dir() && dir.join("JPEGImages").is_dir()
}

/// Follows a level such as DAVIS's `480p/` that holds the video folders.
fn videos_root(dir: &Path) -> Result<PathBuf> {
    let subdirs = sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()).collect::<Vec<_>>();
    if let [only] = subdirs.as_slice() {
        let inner = sorted_entries(only)?;
        if !inner.is_empty() && inner.iter().all(|p| p.is_dir()) {
            return Ok(only.clone());
        }
    }
    Ok(dir.to_path_buf())
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, "cannot read the directory", e))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| extensions.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Object ids of an indexed or grey PNG mask (its pixel values), row-major, with its size.
pub fn read_id_mask(path: &Path) -> Result<(u32, u32, Vec<u16>)> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, "cannot open the mask", e))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let invalid = |message: String| DataError::invalid(path, message);
    let mut reader = decoder.read_info().map_err(|e| invalid(format!("not a readable PNG mask: {e}")))?;
    let (width, height) = (reader.info().width, reader.info().height);
    if width == 0 || height == 0 || width > crate::coco::MAX_IMAGE_SIDE || height > crate::coco::MAX_IMAGE_SIDE {
        return Err(invalid(format!("a {width}x{height} mask is not a frame's")));
    }
    let mut buffer = vec![0; reader.output_buffer_size().ok_or_else(|| invalid("the mask is too large".into()))?];
    let frame = reader.next_frame(&mut buffer).map_err(|e| invalid(format!("not a readable PNG mask: {e}")))?;
    let (color, depth) = (frame.color_type, frame.bit_depth as usize);
    if !matches!(color, png::ColorType::Indexed | png::ColorType::Grayscale) {
        return Err(invalid(format!(
            "a {color:?} PNG: object masks are palette or grey PNGs whose pixel value is the object id \
             (DAVIS / SAM 2 layout)"
        )));
    }
    let row_bytes = frame.line_size;
    let mut ids = Vec::with_capacity((width * height) as usize);
    for y in 0..height as usize {
        let row = &buffer[y * row_bytes..(y + 1) * row_bytes];
        for x in 0..width as usize {
            let id = match depth {
                16 => u16::from_be_bytes([row[2 * x], row[2 * x + 1]]),
                8 => row[x] as u16,
                bits => {
                    let per_byte = 8 / bits;
                    let shift = 8 - bits * (x % per_byte + 1);
                    ((row[x / per_byte] >> shift) & ((1u8 << bits) - 1)) as u16
                }
            };
            ids.push(id);
        }
    }
    Ok((width, height, ids))
}

/// Builds the COCO dataset of the frames and their objects (masks by object id).
struct Builder {
    dataset: CocoDataset,
    categories: BTreeMap<String, u64>,
}

impl Builder {
    fn new() -> Self {
        Builder { dataset: CocoDataset::default(), categories: BTreeMap::new() }
    }

    fn image(&mut self, file_name: String, width: u32, height: u32, video: &str, frame: u64) -> u64 {
        let id = self.dataset.images.len() as u64 + 1;
        let mut extra = serde_json::Map::new();
        extra.insert("video_id".into(), Value::String(video.to_string()));
        extra.insert("frame_index".into(), Value::from(frame));
        self.dataset.images.push(CocoImage { id, file_name, width, height, extra });
        id
    }

    fn object(&mut self, image_id: u64, class: String, track_id: u64, rle: &Rle) {
        let next = self.categories.len() as u64 + 1;
        let category_id = *self.categories.entry(class).or_insert(next);
        let mut extra = serde_json::Map::new();
        extra.insert("track_id".into(), Value::from(track_id));
        self.dataset.annotations.push(CocoAnnotation {
            id: self.dataset.annotations.len() as u64 + 1,
            image_id,
            category_id,
            segmentation: Some(Segmentation::Rle(rle.to_json(true))),
            bbox: Some(rle.bbox()),
            area: Some(rle.area() as f64),
            iscrowd: 0,
            keypoints: None,
            num_keypoints: None,
            extra,
        });
    }

    fn finish(mut self) -> CocoDataset {
        let mut categories: Vec<(String, u64)> = self.categories.into_iter().collect();
        categories.sort_by_key(|(_, id)| *id);
        self.dataset.categories = categories
            .into_iter()
            .map(|(name, id)| CocoCategory { id, name, supercategory: None, extra: Default::default() })
            .collect();
        self.dataset
    }
}

/// Imports the DAVIS / SAM 2 video-predictor layout under `root` (see the module's docs).
pub fn import_davis(root: &Path, class_names: Option<&[String]>) -> Result<VideoImport> {
    let frames_root = videos_root(&root.join("JPEGImages"))?;
    let masks_dir = root.join("Annotations");
    if !masks_dir.is_dir() {
        return Err(DataError::invalid(
            root,
            "JPEGImages/ holds the frames but there is no Annotations/ with their masks (Annotations/<video>/<frame>.png)",
        ));
    }
    let masks_root = videos_root(&masks_dir)?;
    let naming = ClassNaming::load(root, class_names)?;
    let mut builder = Builder::new();
    let videos: Vec<PathBuf> = sorted_entries(&masks_root)?.into_iter().filter(|p| p.is_dir()).collect();
    for video_dir in &videos {
        let video = video_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let frames_dir = frames_root.join(&video);
        if !frames_dir.is_dir() {
            return Err(DataError::invalid(
                video_dir,
                format!("masks of video {video:?} but no frames in {}", frames_dir.display()),
            ));
        }
        let frames: HashMap<String, PathBuf> = sorted_entries(&frames_dir)?
            .into_iter()
            .filter(|p| has_extension(p, &["jpg", "jpeg", "png"]))
            .map(|p| (file_stem(&p), p))
            .collect();
        for (position, mask_file) in
            sorted_entries(video_dir)?.into_iter().filter(|p| has_extension(p, &["png"])).enumerate()
        {
            let stem = file_stem(&mask_file);
            let frame = frames.get(&stem).ok_or_else(|| {
                DataError::invalid(&mask_file, format!("no frame {stem}.jpg (or .png) in {}", frames_dir.display()))
            })?;
            let (width, height, ids) = read_id_mask(&mask_file)?;
            let frame_index = stem.parse::<u64>().unwrap_or(position as u64);
            let file_name = format!("{video}/{}", frame.file_name().unwrap_or_default().to_string_lossy());
            let image_id = builder.image(file_name, width, height, &video, frame_index);
            let mut present: Vec<u16> = ids.iter().copied().filter(|&id| id != 0).collect();
            present.sort_unstable();
            present.dedup();
            for id in present {
                let mask = BinaryMask { width, height, data: ids.iter().map(|&v| (v == id) as u8).collect() };
                let class = naming.name(&video, id as u32, &mask_file)?;
                builder.object(image_id, class, id as u64, &Rle::encode(&mask));
            }
        }
    }
    if builder.dataset.images.is_empty() {
        return Err(DataError::invalid(&masks_root, "no masks: expected Annotations/<video>/<frame>.png"));
    }
    Ok(VideoImport { dataset: builder.finish(), images_dir: frames_root, format: "davis" })
}

/// SA-V's annotation stride: masklet `k` is video frame `4 k` (6 fps annotations of 24 fps video).
pub const SAV_ANNOTATION_STRIDE: u64 = 4;

/// The SA-V annotation files of `dir`: per video its `_manual.json`, else its `_auto.json`.
pub fn sav_annotation_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut by_video: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in sorted_entries(dir)? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(video) = name.strip_suffix("_manual.json") {
            by_video.insert(video.to_string(), path);
        } else if let Some(video) = name.strip_suffix("_auto.json") {
            by_video.entry(video.to_string()).or_insert(path);
        }
    }
    Ok(by_video.into_iter().collect())
}

/// Imports SA-V under `root` (see the module's docs).
pub fn import_sav(root: &Path, class_names: Option<&[String]>) -> Result<VideoImport> {
    let files = sav_annotation_files(root)?;
    if files.is_empty() {
        return Err(DataError::invalid(root, "no SA-V annotations (<video>_manual.json or <video>_auto.json)"));
    }
    let frames_root = ["JPEGImages_24fps", "JPEGImages"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| root.to_path_buf());
    let naming = ClassNaming::load(root, class_names)?;
    let mut builder = Builder::new();
    for (video, file) in files {
        let bytes = std::fs::read(&file).map_err(|e| DataError::io(&file, "cannot read the SA-V annotations", e))?;
        let annotations: SavAnnotations = serde_json::from_slice(&bytes)
            .map_err(|e| DataError::Json { path: file.clone(), message: format!("not SA-V annotations: {e}") })?;
        let (height, width) = (annotations.video_height as u32, annotations.video_width as u32);
        let frames_dir = frames_root.join(&video);
        if !frames_dir.is_dir() {
            return Err(DataError::invalid(
                &file,
                format!(
                    "no frames of {video} in {}: extract them as SAM 2 does (every 4th frame as {video}/00000.jpg, \
                     00004.jpg, ...)",
                    frames_dir.display()
                ),
            ));
        }
        for (k, objects) in annotations.masklet.iter().enumerate() {
            let frame_index = k as u64 * SAV_ANNOTATION_STRIDE;
            let frame = ["jpg", "jpeg", "png"]
                .iter()
                .map(|e| frames_dir.join(format!("{frame_index:05}.{e}")))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    DataError::invalid(
                        &file,
                        format!("masklet {k} is frame {frame_index:05}.jpg, which {} lacks", frames_dir.display()),
                    )
                })?;
            let file_name = format!("{video}/{}", frame.file_name().unwrap_or_default().to_string_lossy());
            let image_id = builder.image(file_name, width, height, &video, frame_index);
            for (position, rle) in objects.iter().enumerate() {
                let Some(rle) = rle else { continue };
                let [h, w] = rle.size;
                if (h, w) != (height, width) {
                    return Err(DataError::invalid(
                        &file,
                        format!("masklet {k}, object {position}: a {w}x{h} mask in a {width}x{height} video"),
                    ));
                }
                let decoded = Rle::from_compressed(&rle.counts, h, w).map_err(|e| {
                    DataError::invalid(&file, format!("masklet {k}, object {position}: not a COCO RLE: {e}"))
                })?;
                if decoded.area() == 0 {
                    continue;
                }
                let track = annotations.masklet_id.get(position).copied().unwrap_or(position as u64);
                let class = naming.name(&video, track as u32 + 1, &file)?;
                builder.object(image_id, class, track, &decoded);
            }
        }
    }
    Ok(VideoImport { dataset: builder.finish(), images_dir: frames_root, format: "sa-v" })
}

/// The keys of an SA-V annotation file kiln reads (numbers are written as floats).
#[derive(serde::Deserialize)]
struct SavAnnotations {
    video_height: f64,
    video_width: f64,
    masklet: Vec<Vec<Option<SavRle>>>,
    #[serde(default, deserialize_with = "ids_as_integers")]
    masklet_id: Vec<u64>,
}

#[derive(serde::Deserialize)]
struct SavRle {
    size: [u32; 2],
    counts: String,
}

fn ids_as_integers<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Vec<u64>, D::Error> {
    let values: Vec<f64> = serde::Deserialize::deserialize(deserializer)?;
    Ok(values.into_iter().map(|v| v.max(0.0) as u64).collect())
}
