//! How keys and values travel as bytes: JSON through serde, UTF-8 text, raw bytes. A value
//! that does not decode is a reason to park its record, never a crash.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Turns a `T` into a record's key or value bytes and back. `None` bytes are an absent key or
/// a null value (a tombstone).
pub trait Codec<T>: Send + Sync + 'static {
    /// Reads `T`; the error is the reason the record is parked.
    fn decode(&self, bytes: Option<&[u8]>) -> Result<T, String>;
    /// Writes `T`.
    fn encode(&self, value: &T) -> Option<Vec<u8>>;
}

/// JSON through serde.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: Serialize + DeserializeOwned> Codec<T> for Json {
    fn decode(&self, bytes: Option<&[u8]>) -> Result<T, String> {
        let bytes = bytes.ok_or_else(|| "no bytes where JSON was expected".to_owned())?;
        serde_json::from_slice(bytes).map_err(|e| format!("not the expected JSON: {e}"))
    }

    fn encode(&self, value: &T) -> Option<Vec<u8>> {
        // Serialising plain data to JSON fails only for maps with non-string keys.
        Some(serde_json::to_vec(value).unwrap_or_else(|e| format!("\"unserialisable: {e}\"").into_bytes()))
    }
}

/// UTF-8 text.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Codec<String> for Utf8 {
    fn decode(&self, bytes: Option<&[u8]>) -> Result<String, String> {
        let bytes = bytes.ok_or_else(|| "no bytes where text was expected".to_owned())?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("not UTF-8: {e}"))
    }

    fn encode(&self, value: &String) -> Option<Vec<u8>> {
        Some(value.as_bytes().to_vec())
    }
}

/// The bytes as they are (an absent key or value is empty).
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Vec<u8>> for Raw {
    fn decode(&self, bytes: Option<&[u8]>) -> Result<Vec<u8>, String> {
        Ok(bytes.unwrap_or_default().to_vec())
    }

    fn encode(&self, value: &Vec<u8>) -> Option<Vec<u8>> {
        Some(value.clone())
    }
}

/// The unit key: whatever the bytes (keyless topics).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKey;

impl Codec<()> for NoKey {
    fn decode(&self, _bytes: Option<&[u8]>) -> Result<(), String> {
        Ok(())
    }

    fn encode(&self, _value: &()) -> Option<Vec<u8>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bytes_are_a_reason_not_a_panic() {
        let r: Result<u32, String> = Json.decode(Some(b"{"));
        assert!(r.expect_err("bad JSON").starts_with("not the expected JSON"));
        let r: Result<u32, String> = Json.decode(None);
        assert!(r.is_err());
        assert!(Utf8.decode(Some(&[0xff])).is_err());
        assert_eq!(Raw.decode(None), Ok(Vec::new()));
        assert_eq!(Json.encode(&vec![1, 2]), Some(b"[1,2]".to_vec()));
    }
}
