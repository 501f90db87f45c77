//! The admin token: generated at first start, kept in `DATA_DIR/admin.token` with mode 0600.

use std::{io::Read, os::unix::fs::OpenOptionsExt, path::Path};

use crate::ControlError;

const FILE: &str = "admin.token";

/// 32 random bytes from the kernel, hex-encoded.
pub fn generate() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The token in `dir`, created (mode 0600) when missing. The second value is the token when
/// this call created it, so that the caller prints it once.
pub fn load_or_create(dir: &Path) -> Result<(String, Option<String>), ControlError> {
    let path = dir.join(FILE);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), None)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let token = generate().map_err(io)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok((token.clone(), Some(token)))
}

/// Compare without an early exit on the first differing byte.
pub fn matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
