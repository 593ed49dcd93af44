//! Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves
//! whatever was there before untouched.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| DataError::io(dir, "cannot create the directory", e))?;
    let tmp = temporary_sibling(path);
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fault_point(path)?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(DataError::io(path, "cannot write the file", e));
    }
    Ok(())
}

/// Fault injection for the tests of hard stops and full disks, called by every atomic writer
/// between writing its staging file and renaming it into place. `KILN_FAULT=abort:NAME[:N]`
/// aborts the process (no destructor, no cleanup: what `kill -9` leaves) at the N-th (default
/// first) write of a file whose name contains NAME; `KILN_FAULT=nospace:NAME[:N]` fails that
/// write as a full disk would. Unset (always, outside tests), it does nothing.
pub fn fault_point(path: &Path) -> std::io::Result<()> {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static FAULT: OnceLock<Option<(String, String, usize)>> = OnceLock::new();
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let fault = FAULT.get_or_init(|| {
        let spec = std::env::var("KILN_FAULT").ok()?;
        let mut parts = spec.splitn(3, ':');
        let (kind, name) = (parts.next()?.to_string(), parts.next()?.to_string());
        Some((kind, name, parts.next().and_then(|n| n.parse().ok()).unwrap_or(1)))
    });
    let Some((kind, name, nth)) = fault else { return Ok(()) };
    let file_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    if !file_name.contains(name.as_str()) || SEEN.fetch_add(1, Ordering::SeqCst) + 1 != *nth {
        return Ok(());
    }
    match kind.as_str() {
        "abort" => std::process::abort(),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device (injected by KILN_FAULT)",
        )),
    }
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| DataError::invalid(path, format!("cannot serialise JSON: {e}")))?;
    write_atomic(path, &bytes)
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Fails when any of `paths` exists, so a command never replaces what a user already has.
pub fn refuse_to_overwrite<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    let existing: Vec<String> = paths.into_iter().filter(|p| p.exists()).map(|p| p.display().to_string()).collect();
    if existing.is_empty() { Ok(()) } else { Err(DataError::WouldOverwrite(existing)) }
}

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"];

/// The images (jpg, png, bmp, tiff, webp) directly inside `dir`, sorted by name: the order every
/// command numbers them in (image id = position + 1, as COCO ids start at 1).
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, "cannot list the images", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::invalid(dir, "no images (jpg, png, bmp, tiff, webp) found"));
    }
    Ok(files)
}

/// A picture's file stem for an image file: the file's own, or the image id.
pub fn picture_stem(file: &Path, id: u64) -> String {
    file.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| id.to_string())
}

/// The outputs of a command that writes one JSON document and, optionally, a `pictures/`
/// directory into an output directory: nothing existing is replaced (checked at the start), the
/// pictures are written into a hidden staging directory that becomes `pictures/` only when
/// [`finish`](Self::finish) writes the document, and a run that fails or is dropped before that
/// leaves nothing behind (the output directory too, if it created it and it is empty).
pub struct StagedOutput {
    output: PathBuf,
    document: PathBuf,
    pictures: Option<(PathBuf, PathBuf)>,
    created_output: bool,
    finished: bool,
}

impl StagedOutput {
    /// Claims `output/document_name` (and `output/pictures` when `pictures`): an error if either exists.
    pub fn begin(output: &Path, document_name: &str, pictures: bool) -> Result<Self> {
        let document = output.join(document_name);
        let final_pictures = output.join("pictures");
        refuse_to_overwrite([document.as_path()])?;
        if pictures {
            refuse_to_overwrite([final_pictures.as_path()])?;
        }
        let created_output = !output.exists();
        fs::create_dir_all(output).map_err(|e| DataError::io(output, "cannot create the directory", e))?;
        let mut staged =
            Self { output: output.to_path_buf(), document, pictures: None, created_output, finished: false };
        if pictures {
            let staging = output.join(format!(".pictures.{}.tmp", std::process::id()));
            fs::create_dir_all(&staging).map_err(|e| DataError::io(&staging, "cannot create the directory", e))?;
            staged.pictures = Some((staging, final_pictures));
        }
        Ok(staged)
    }

    /// Where the picture of `stem` goes while the run lasts (none when no pictures were asked for).
    pub fn picture(&self, stem: &str) -> Option<PathBuf> {
        self.pictures.as_ref().map(|(staging, _)| staging.join(format!("{stem}.jpg")))
    }

    /// Writes the document, then moves the pictures into place: the paths of both.
    pub fn finish<T: serde::Serialize>(mut self, document: &T) -> Result<(PathBuf, Option<PathBuf>)> {
        let bytes = serde_json::to_vec(document)
            .map_err(|e| DataError::invalid(&self.document, format!("cannot serialise JSON: {e}")))?;
        write_atomic(&self.document, &bytes)?;
        if let Some((staging, pictures)) = &self.pictures {
            fs::rename(staging, pictures)
                .map_err(|e| DataError::io(pictures, "cannot move the pictures into place", e))?;
        }
        self.finished = true;
        Ok((self.document.clone(), self.pictures.as_ref().map(|(_, pictures)| pictures.clone())))
    }
}

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some((staging, _)) = &self.pictures {
            let _ = fs::remove_dir_all(staging);
        }
        if self.created_output {
            // Only if still empty: nothing but this run could have put anything there.
            let _ = fs::remove_dir(&self.output);
        }
    }
}

/// A COCO results document as kiln's commands write it (`predictions.json`, `detections.json`,
/// `masks.json`): the images with their ids, the categories, and one annotation per result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResultsDocument<A: serde::Serialize> {
    pub images: Vec<ResultImage>,
    pub categories: Vec<ResultCategory>,
    pub annotations: Vec<A>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ResultImage {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ResultCategory {
    pub id: u64,
    pub name: String,
}

impl ResultImage {
    /// The entry of the image at `position` of a [`list_images`] listing, read as `image`.
    pub fn listed(position: usize, file: &Path, image: &image::RgbImage) -> Self {
        let file_name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Self { id: position as u64 + 1, file_name, width: image.width(), height: image.height() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("kiln-io-{}", std::process::id()));
        let path = dir.join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let leftovers = fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1);
        fs::remove_dir_all(dir).unwrap();
    }
}

/// Reads and decodes an image file (format from its content) as RGB; the error names the file and
/// whether it could not be read or not be decoded.
pub fn read_rgb_image(path: &Path) -> Result<image::RgbImage> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, "cannot open the image", e))?;
    decode_rgb_image(&bytes, path)
}

/// Decodes an image file's `bytes` (format from the content) as RGB, within [`image_limits`].
pub fn decode_rgb_image(bytes: &[u8], path: &Path) -> Result<image::RgbImage> {
    decode_image(bytes, path).map(image::DynamicImage::into_rgb8)
}

/// Decodes an image file's `bytes` (format from the content) within [`image_limits`]: a small file
/// that claims a huge picture (a decompression bomb) is an error, not gigabytes of memory.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<image::DynamicImage> {
    let image_error = |message: String| DataError::Image { path: path.to_path_buf(), message };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::io(path, "cannot read the image", e))?;
    reader.limits(image_limits());
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(limit) => image_error(format!(
            "{limit}: kiln decodes images of at most {side} pixels a side and {mib} MiB",
            side = crate::coco::MAX_IMAGE_SIDE,
            mib = MAX_IMAGE_BYTES >> 20
        )),
        other => image_error(other.to_string()),
    })
}

/// The most memory one decoded image may take.
pub const MAX_IMAGE_BYTES: u64 = 512 << 20;

/// The decoder's limits for every image kiln reads: [`crate::coco::MAX_IMAGE_SIDE`] a side and
/// [`MAX_IMAGE_BYTES`] of memory.
pub fn image_limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(crate::coco::MAX_IMAGE_SIDE);
    limits.max_image_height = Some(crate::coco::MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    limits
}

#[cfg(test)]
mod staged_tests {
    use super::*;

    #[test]
    fn staged_output_appears_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("kiln-staged-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let output = dir.join("out");
        // Dropped before finishing: nothing left, not even the directory it created.
        let staged = StagedOutput::begin(&output, "result.json", true).unwrap();
        fs::write(staged.picture("a").unwrap(), b"x").unwrap();
        drop(staged);
        assert!(!output.exists());
        // Finished: the document and the pictures, and a second run refuses to replace them.
        let staged = StagedOutput::begin(&output, "result.json", true).unwrap();
        fs::write(staged.picture("a").unwrap(), b"x").unwrap();
        let (document, pictures) = staged.finish(&serde_json::json!({"ok": true})).unwrap();
        assert_eq!(fs::read_to_string(document).unwrap(), r#"{"ok":true}"#);
        assert!(pictures.unwrap().join("a.jpg").is_file());
        assert_eq!(fs::read_dir(&output).unwrap().count(), 2, "no staging directory left");
        assert!(matches!(StagedOutput::begin(&output, "result.json", false), Err(DataError::WouldOverwrite(_))));
        assert!(matches!(StagedOutput::begin(&output, "other.json", true), Err(DataError::WouldOverwrite(_))));
        fs::remove_dir_all(&dir).unwrap();
    }
}
