//! Paths a dataset names stay inside the directory they are relative to. A COCO `file_name`, a
//! YOLO list line or split entry comes from a file users download; followed blindly, `../outside/
//! secret.png`, `/etc/hostname` or a symlink out of the images directory would make kiln read (and
//! draw into its pictures, or train on) any file on the disk. Such a path is an error naming it,
//! unless the user says they mean it (`--allow-outside-paths`, which sets this process's switch).

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{DataError, Result};

static ALLOW_OUTSIDE: AtomicBool = AtomicBool::new(false);

/// Lets dataset paths lead outside their directory, for this process (`--allow-outside-paths`).
pub fn set_allow_outside_paths(allow: bool) {
    ALLOW_OUTSIDE.store(allow, Ordering::Relaxed);
}

pub fn outside_paths_allowed() -> bool {
    ALLOW_OUTSIDE.load(Ordering::Relaxed)
}

/// How `relative` leaves the directory it is relative to, read as written (no file is touched):
/// absolute, or climbing out with `..` (also in Windows spelling). `None` when it stays inside.
pub fn escape(relative: &str) -> Option<&'static str> {
    let windows_absolute = relative.starts_with('\\')
        || relative.as_bytes().get(1) == Some(&b':') && relative.as_bytes()[0].is_ascii_alphabetic();
    if windows_absolute
        || Path::new(relative).components().any(|c| matches!(c, Component::RootDir | Component::Prefix(_)))
    {
        return Some("is absolute");
    }
    let climbs = Path::new(relative).components().any(|c| c == Component::ParentDir)
        || relative.split(['/', '\\']).any(|part| part == "..");
    climbs.then_some("climbs out with `..`")
}

/// `root/relative`, refused when it leads outside `root`: as written (absolute, `..`), or through a
/// symlink (when the file exists, its real path must lie under `root`'s). `what` names the entry
/// in the error (e.g. `image 7 of annotations.json`).
pub fn inside(root: &Path, relative: &str, what: &str) -> Result<PathBuf> {
    inside_unless_allowed(root, relative, what, outside_paths_allowed())
}

fn inside_unless_allowed(root: &Path, relative: &str, what: &str, allowed: bool) -> Result<PathBuf> {
    let path = root.join(relative);
    if allowed {
        return Ok(path);
    }
    let refuse = |how: &str| {
        DataError::invalid(
            &path,
            format!(
                "{what} names {relative:?}, which {how} of {}: kiln reads dataset files inside their directory \
                 only; fix the path, or pass --allow-outside-paths if you mean it",
                root.display()
            ),
        )
    };
    if let Some(how) = escape(relative) {
        return Err(refuse(how));
    }
    if let (Ok(real), Ok(real_root)) = (path.canonicalize(), root.canonicalize())
        && !real.starts_with(&real_root)
    {
        return Err(refuse(&format!("leads out through a symlink (to {})", real.display())));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_their_directory_as_written_are_found() {
        for inside in ["a.png", "sub/dir/a.png", "./a.png", "a..b.png", "..a.png"] {
            assert_eq!(escape(inside), None, "{inside}");
        }
        for absolute in ["/etc/hostname", "\\\\server\\share\\a.png", "C:\\data\\a.png", "c:/a.png"] {
            assert_eq!(escape(absolute), Some("is absolute"), "{absolute}");
        }
        for climbing in ["../outside/secret.png", "sub/../../a.png", "sub\\..\\..\\a.png", ".."] {
            assert_eq!(escape(climbing), Some("climbs out with `..`"), "{climbing}");
        }
    }

    #[test]
    fn a_symlink_out_of_the_directory_is_refused_unless_allowed() {
        let dir = std::env::temp_dir().join(format!("kiln-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (images, outside) = (dir.join("images"), dir.join("outside"));
        std::fs::create_dir_all(images.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.png"), b"secret").unwrap();
        std::fs::write(images.join("sub/a.png"), b"a").unwrap();
        std::os::unix::fs::symlink(outside.join("secret.png"), images.join("link.png")).unwrap();
        std::os::unix::fs::symlink(images.join("sub/a.png"), images.join("inner.png")).unwrap();

        assert_eq!(inside(&images, "sub/a.png", "image 1").unwrap(), images.join("sub/a.png"));
        assert_eq!(inside(&images, "inner.png", "image 2").unwrap(), images.join("inner.png"));
        let error = inside(&images, "link.png", "image 3 of train.json").unwrap_err().to_string();
        assert!(error.contains("image 3 of train.json") && error.contains("symlink"), "{error}");
        let error = inside(&images, "../outside/secret.png", "image 4").unwrap_err().to_string();
        assert!(error.contains("\"../outside/secret.png\"") && error.contains("--allow-outside-paths"), "{error}");
        assert!(inside(&images, "/etc/hostname", "image 5").unwrap_err().to_string().contains("is absolute"));
        // A missing file inside is not this check's business (the reader names it).
        assert!(inside(&images, "missing.png", "image 6").is_ok());

        let allowed = inside_unless_allowed(&images, "../outside/secret.png", "image 4", true);
        assert_eq!(allowed.unwrap(), images.join("../outside/secret.png"));
        assert!(inside_unless_allowed(&images, "link.png", "image 3", true).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
