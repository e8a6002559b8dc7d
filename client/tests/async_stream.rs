//! The async forms give the same bytes as the sync ones: sealed async,
//! opened sync, and the reverse, at every size around the frame
//! boundaries; truncation, tampering and a foreign file refused.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::io::Cursor;

use coffre_client::format::{MIN_FRAME_LEN, TAG_LEN};
use coffre_client::{DataKey, FormatError, Header, open_async, read_header, seal_async};

fn blob() -> Vec<u8> {
    let mut b = b"CF\x01\x01".to_vec();
    b.extend([9u8; 112]);
    b
}

fn ctx() -> BTreeMap<String, String> {
    [("object".to_string(), "a/b".to_string())].into()
}

fn key() -> DataKey {
    DataKey::from_slice(&[0x33; 32]).unwrap()
}

async fn open_all_async(message: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut input = message;
    let header = read_header(&mut input).await?;
    let mut out = Vec::new();
    open_async(&mut input, &mut out, &header, &key()).await?;
    Ok(out)
}

#[tokio::test]
async fn async_and_sync_read_each_other_at_every_boundary() {
    let f = MIN_FRAME_LEN as usize;
    for len in [0, 1, f - 1, f, f + 1, 3 * f, 3 * f + 7] {
        let plain: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        // Async seal, sync open.
        let mut sealed = Vec::new();
        let n = seal_async(
            &mut &plain[..],
            &mut sealed,
            &key(),
            ctx(),
            blob(),
            MIN_FRAME_LEN,
        )
        .await
        .unwrap();
        assert_eq!(n, len as u64);
        let mut input = Cursor::new(&sealed);
        let header = Header::read_from(&mut input).unwrap();
        assert_eq!(header.context, ctx());
        let mut out = Vec::new();
        coffre_client::open(&mut input, &mut out, &header, &key()).unwrap();
        assert_eq!(out, plain, "{len}");
        // Sync seal, async open.
        let mut sync_sealed = Vec::new();
        coffre_client::seal(
            &mut &plain[..],
            &mut sync_sealed,
            &key(),
            ctx(),
            blob(),
            MIN_FRAME_LEN,
        )
        .unwrap();
        assert_eq!(open_all_async(&sync_sealed).await.unwrap(), plain, "{len}");
        // The same layout: header, then one frame per started frame_len.
        assert_eq!(sealed.len(), sync_sealed.len());
        assert_eq!(
            sealed.len(),
            header.to_bytes().len() + len + len.div_ceil(f).max(1) * TAG_LEN
        );
    }
}

#[tokio::test]
async fn async_open_refuses_what_sync_open_refuses() {
    let plain = vec![5u8; 3 * MIN_FRAME_LEN as usize + 10];
    let mut sealed = Vec::new();
    seal_async(
        &mut &plain[..],
        &mut sealed,
        &key(),
        ctx(),
        blob(),
        MIN_FRAME_LEN,
    )
    .await
    .unwrap();
    for cut in [
        1,
        16,
        17,
        MIN_FRAME_LEN as usize + TAG_LEN,
        sealed.len() - 200,
    ] {
        assert!(
            open_all_async(&sealed[..sealed.len() - cut]).await.is_err(),
            "cut {cut}"
        );
    }
    for at in [0, 3, 40, 60, sealed.len() / 2, sealed.len() - 1] {
        let mut bad = sealed.clone();
        bad[at] ^= 4;
        assert!(open_all_async(&bad).await.is_err(), "byte {at}");
    }
    assert!(matches!(
        open_all_async(b"PK\x03\x04 a zip, not a sealed message").await,
        Err(FormatError::NotSealed)
    ));
    assert!(matches!(
        open_all_async(&sealed[..30]).await,
        Err(FormatError::TruncatedHeader)
    ));
    let other = DataKey::from_slice(&[0x34; 32]).unwrap();
    let mut input = &sealed[..];
    let header = read_header(&mut input).await.unwrap();
    assert!(matches!(
        open_async(&mut input, &mut Vec::new(), &header, &other).await,
        Err(FormatError::NotAuthentic)
    ));
}
