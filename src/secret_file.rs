//! Private files in the data directory — the JWT keys, the audit key: written whole
//! (temporary file, fsync, rename or link, fsync of the directory) with mode 0600, and
//! refused on reading when group or others may access them.
//!
//! Everything else paygate creates in the data directory follows the same rule, whatever
//! the umask: directories 0700 ([`create_private_dir`]), files 0600 (created with that
//! mode; SQLite gives its `-wal` and `-shm` files the mode of their database, which
//! [`create_private_file`] makes first). [`refuse_shared`] is the check at start.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Creates `dir` (and missing parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `path` empty with mode 0600 if it does not exist (so that whatever opens it
/// next — SQLite — finds it private).
pub fn create_private_file(path: &Path) -> std::io::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Refuses `path` (described as `what`) when group or others may access it, with the
/// `chmod` that fixes it; a missing path is fine.
pub fn refuse_shared(path: &Path, what: &str) -> Result<(), String> {
    let mode = match fs::metadata(path) {
        Ok(meta) => meta.permissions().mode(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot stat {} ({what}): {e}", path.display())),
    };
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let private = if path.is_dir() { "700" } else { "600" };
    Err(format!(
        "{} ({what}) has mode {:04o}: group and others must have no access; run `chmod \
         {private} {}`",
        path.display(),
        mode & 0o7777,
        path.display()
    ))
}

/// Reads a private file, refusing it (with the `chmod` that fixes it) when its mode lets
/// anyone but the owner in.
pub fn read_private(path: &Path) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mode = file
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:04o}: group and others must have no access; run `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Writes `bytes` to `path` durably and atomically, with mode 0600. Without `replace`, fails
/// with `AlreadyExists` if `path` exists (so of several processes creating the file at
/// once, exactly one wins).
pub fn write_private(path: &Path, bytes: &[u8], replace: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("secret"),
        std::process::id()
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    let placed = if replace {
        fs::rename(&temp, path)
    } else {
        // A hard link never replaces an existing file.
        fs::hard_link(&temp, path).and_then(|()| fs::remove_file(&temp))
    };
    if placed.is_err() {
        let _ = fs::remove_file(&temp);
    }
    placed?;
    sync_dir(dir)
}

/// Makes a directory's entries (created, renamed files) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
