//! The safetensors header: parsed and checked against the file's size before any tensor
//! is read, so a truncated or corrupt file gets a message naming the file and tensor.

use std::path::Path;

use crate::error::{ModelError, Result};

/// Upper bound on a safetensors JSON header; real ones are well under a few MB.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Validates a safetensors file's header against its size before mapping it: a truncated
/// file or a header that points past the end gets a message naming the file and tensor.
pub fn check_header(path: &Path) -> Result<()> {
    read_header(path).map(|_| ())
}

/// One tensor of a safetensors file, as its header describes it.
#[derive(Debug, Clone)]
pub struct HeaderEntry {
    pub name: String,
    /// The safetensors dtype name (`F32`, `BF16`, `F8_E4M3`, `I32`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte offset of the data from the start of the file.
    pub start: u64,
    pub len: u64,
}

/// The checked header of the safetensors file at `path`.
pub fn read_header(path: &Path) -> Result<Vec<HeaderEntry>> {
    let bad = |message: String| ModelError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    parse_header_from(std::io::BufReader::new(file), file_len, path)
}

/// The checks of [`check_header`] on any reader positioned at the start of a safetensors
/// checkpoint of `file_len` bytes (a file, or bytes in memory: `&[u8]` is a reader). Reads
/// only the length prefix and the header, never more than [`MAX_HEADER_BYTES`]; `path` only
/// names the checkpoint in messages.
pub fn check_header_from(reader: impl std::io::Read, file_len: u64, path: &Path) -> Result<()> {
    parse_header_from(reader, file_len, path).map(|_| ())
}

/// [`check_header_from`], returning the tensors the header lists.
pub fn parse_header_from(mut reader: impl std::io::Read, file_len: u64, path: &Path) -> Result<Vec<HeaderEntry>> {
    let bad = |message: String| ModelError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    if file_len < 8 {
        return Err(bad(format!(
            "truncated: {file_len} bytes, too short for a safetensors header"
        )));
    }
    let mut len_bytes = [0u8; 8];
    reader.read_exact(&mut len_bytes).map_err(|e| bad(e.to_string()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(bad(format!(
            "header claims {header_len} bytes but the file has {} after the length prefix (truncated or not safetensors)",
            file_len - 8
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let map = json
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_len = file_len - 8 - header_len;
    let mut entries = Vec::with_capacity(map.len());
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
        if offsets.0 > offsets.1 || offsets.1 > data_len {
            return Err(bad(format!(
                "tensor `{name}` claims bytes {}..{} but the data section has {data_len} bytes (truncated file?)",
                offsets.0, offsets.1
            )));
        }
        let dtype = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad(format!("tensor `{name}` has no dtype name")))?;
        let elem_bytes: u64 = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => 1,
            other => return Err(bad(format!("tensor `{name}` has unknown dtype {other:?}"))),
        };
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape")))?;
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(elem_bytes))
            .ok_or_else(|| bad(format!("tensor `{name}` has a shape {shape:?} whose size overflows")))?;
        if numel != offsets.1 - offsets.0 {
            return Err(bad(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} needs {numel} bytes but data_offsets span {}",
                offsets.1 - offsets.0
            )));
        }
        entries.push(HeaderEntry {
            name: name.clone(),
            dtype: dtype.to_string(),
            shape: shape.iter().map(|&d| d as usize).collect(),
            start: 8 + header_len + offsets.0,
            len: offsets.1 - offsets.0,
        });
    }
    Ok(entries)
}
