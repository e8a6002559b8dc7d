//! Secret values: private bytes, no `Clone`, no `PartialEq`, a redacted
//! `Debug`, zeroized on drop.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length in bytes of a customer master key (CMK) version's material.
pub const CMK_LEN: usize = 32;

/// The material of one CMK version: 256 random bits.
///
/// Boxed so that moving the value never leaves copies of the bytes behind.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct CmkMaterial(Box<[u8; CMK_LEN]>);

impl CmkMaterial {
    /// Takes exactly [`CMK_LEN`] bytes; any other length is refused.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut material = Box::new([0u8; CMK_LEN]);
        if bytes.len() != CMK_LEN {
            return None;
        }
        material.copy_from_slice(bytes);
        Some(Self(material))
    }

    /// The raw bytes, for the cryptographic code that needs them.
    pub fn expose(&self) -> &[u8; CMK_LEN] {
        &self.0
    }
}

impl fmt::Debug for CmkMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CmkMaterial(<redacted>)")
    }
}

/// Secret bytes of variable length: data keys, caller plaintexts, unwrapped
/// material on its way into a [`CmkMaterial`].
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn zeroed(len: usize) -> Self {
        Self(Zeroizing::new(vec![0u8; len]))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Hands the bytes over (for a response message); the caller is then
    /// responsible for them.
    pub fn into_zeroizing(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl From<Zeroizing<Vec<u8>>> for SecretBytes {
    fn from(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_bytes() {
        let cmk = CmkMaterial::from_slice(&[0xAB; CMK_LEN]).unwrap();
        let shown = format!("{cmk:?}");
        assert!(!shown.contains("171") && !shown.to_lowercase().contains("ab,"));
        assert_eq!(shown, "CmkMaterial(<redacted>)");

        let data = SecretBytes::new(vec![0xCD; 5]);
        let shown = format!("{data:?}");
        assert_eq!(shown, "SecretBytes(<5 bytes redacted>)");
    }

    #[test]
    fn cmk_requires_exact_length() {
        assert!(CmkMaterial::from_slice(&[1; 31]).is_none());
        assert!(CmkMaterial::from_slice(&[1; 33]).is_none());
        assert_eq!(
            CmkMaterial::from_slice(&[7; 32]).unwrap().expose(),
            &[7; 32]
        );
    }
}
