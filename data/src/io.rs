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
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(DataError::io(path, "cannot write the file", e));
    }
    Ok(())
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
    Ok(image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, "cannot open the image", e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, "cannot read the image", e))?
        .decode()
        .map_err(|e| DataError::Image { path: path.to_path_buf(), message: e.to_string() })?
        .into_rgb8())
}
