//! Sealing and opening over tokio's `AsyncRead` / `AsyncWrite`, in
//! constant memory (one frame buffer), for services that stream objects
//! through an async runtime. Same bytes as [`crate::stream`]: a message
//! sealed here opens there, and the reverse.
//!
//! [`open_async`] writes each frame's plaintext to `output` once its tag
//! verified; an error further on leaves the frames before it written, so
//! what `output` holds is verified only when it returns `Ok`.

use std::collections::BTreeMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::format::{
    COMMITMENT_LEN, DataKey, FormatError, Header, MAX_BLOB_LEN, MAX_CONTEXT_LEN, MAX_FRAMES,
    TAG_LEN,
};

/// Reads until `buf` is full or the input ends; the bytes read.
async fn fill<R: AsyncRead + Unpin>(input: &mut R, buf: &mut [u8]) -> Result<usize, FormatError> {
    let mut filled = 0;
    while filled < buf.len() {
        let got = input
            .read(buf.get_mut(filled..).unwrap_or_default())
            .await?;
        if got == 0 {
            break;
        }
        filled += got;
    }
    Ok(filled)
}

/// Reads exactly `buf.len()` bytes of a header.
async fn header_part<R: AsyncRead + Unpin>(
    input: &mut R,
    buf: &mut [u8],
) -> Result<(), FormatError> {
    if fill(input, buf).await? < buf.len() {
        return Err(FormatError::TruncatedHeader);
    }
    Ok(())
}

/// Reads one header from `input` (exactly its bytes), parsed as strictly
/// as [`Header::read_from`], which it uses.
pub async fn read_header<R: AsyncRead + Unpin>(input: &mut R) -> Result<Header, FormatError> {
    // magic, version, suite, message id, frame length, context length.
    let mut bytes = vec![0u8; 44];
    // What the message is, first (as the sync parser does).
    let got = fill(input, bytes.get_mut(..4).unwrap_or_default()).await?;
    if !crate::format::MAGIC.starts_with(bytes.get(..got.min(2)).unwrap_or_default()) {
        return Err(FormatError::NotSealed);
    }
    if got < 4 {
        return Err(FormatError::TruncatedHeader);
    }
    header_part(input, bytes.get_mut(4..).unwrap_or_default()).await?;
    // A bad magic, version, suite or frame length is refused before
    // reading further (the parser stops at them, or at the missing rest).
    match Header::read_from(&mut &bytes[..]) {
        Ok(_) | Err(FormatError::TruncatedHeader) => {}
        Err(e) => return Err(e),
    }
    let context_len = bytes
        .get(40..44)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or(FormatError::TruncatedHeader)?;
    let context_len = usize::try_from(context_len).unwrap_or(usize::MAX);
    if context_len > MAX_CONTEXT_LEN {
        return Err(FormatError::BadHeader("context too long"));
    }
    let start = bytes.len();
    bytes.resize(start + context_len + 2, 0);
    header_part(input, bytes.get_mut(start..).unwrap_or_default()).await?;
    let blob_len = bytes
        .get(bytes.len() - 2..)
        .and_then(|b| <[u8; 2]>::try_from(b).ok())
        .map(u16::from_be_bytes)
        .map(usize::from)
        .ok_or(FormatError::TruncatedHeader)?;
    if blob_len == 0 || blob_len > MAX_BLOB_LEN {
        return Err(FormatError::BadHeader(
            "wrapped data key length out of range",
        ));
    }
    let start = bytes.len();
    bytes.resize(start + blob_len + COMMITMENT_LEN + TAG_LEN, 0);
    header_part(input, bytes.get_mut(start..).unwrap_or_default()).await?;
    Header::read_from(&mut &bytes[..])
}

/// Seals all of `input` to `output`; the plaintext's length. The output
/// is flushed, not shut down.
pub async fn seal_async<R, W>(
    input: &mut R,
    output: &mut W,
    data_key: &DataKey,
    context: BTreeMap<String, String>,
    blob: Vec<u8>,
    frame_len: u32,
) -> Result<u64, FormatError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (header, keys) = Header::seal(data_key, context, blob, frame_len)?;
    output.write_all(&header.to_bytes()).await?;
    let frame =
        usize::try_from(frame_len).map_err(|_| FormatError::InvalidInput("frame length"))?;
    // The frame being sealed, and the next one's first byte read ahead to
    // know whether this one is the last.
    let mut buf = Zeroizing::new(vec![0u8; frame + TAG_LEN]);
    let mut sealed = Zeroizing::new(Vec::with_capacity(frame + TAG_LEN));
    let mut peeked: Option<u8> = None;
    let mut index = 0u64;
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        if let (Some(b), Some(first)) = (peeked.take(), buf.first_mut()) {
            *first = b;
            filled = 1;
        }
        filled += fill(input, buf.get_mut(filled..frame).unwrap_or_default()).await?;
        let last = if filled < frame {
            true
        } else {
            let mut one = [0u8; 1];
            let more = fill(input, &mut one).await?;
            if more == 1 {
                peeked = Some(one[0]);
            }
            more == 0
        };
        if index >= MAX_FRAMES {
            return Err(FormatError::InvalidInput(
                "the message is too long: at most 2^32 frames",
            ));
        }
        sealed.clear();
        sealed.extend_from_slice(buf.get(..filled).unwrap_or_default());
        keys.seal_frame(index, last, &mut sealed)?;
        output.write_all(&sealed).await?;
        total += filled as u64;
        index += 1;
        if last {
            output.flush().await?;
            return Ok(total);
        }
    }
}

/// Opens the message whose `header` was read from `input` already,
/// writing the plaintext to `output`; its length. The output is flushed,
/// not shut down.
pub async fn open_async<R, W>(
    input: &mut R,
    output: &mut W,
    header: &Header,
    data_key: &DataKey,
) -> Result<u64, FormatError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let keys = header.keys(data_key)?;
    let full = usize::try_from(header.frame_len)
        .map_err(|_| FormatError::BadHeader("frame length"))?
        + TAG_LEN;
    let mut buf = Zeroizing::new(vec![0u8; full]);
    let mut peeked: Option<u8> = None;
    let mut index = 0u64;
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        if let (Some(b), Some(first)) = (peeked.take(), buf.first_mut()) {
            *first = b;
            filled = 1;
        }
        filled += fill(input, buf.get_mut(filled..).unwrap_or_default()).await?;
        let last = if filled < full {
            true
        } else {
            let mut one = [0u8; 1];
            let more = fill(input, &mut one).await?;
            if more == 1 {
                peeked = Some(one[0]);
            }
            more == 0
        };
        if filled < TAG_LEN || index >= MAX_FRAMES {
            return Err(FormatError::NotAuthentic);
        }
        let frame = buf.get_mut(..filled).unwrap_or_default();
        let plain_len = keys.open_frame(index, last, frame)?;
        output
            .write_all(buf.get(..plain_len).unwrap_or_default())
            .await?;
        total += plain_len as u64;
        index += 1;
        if last {
            output.flush().await?;
            return Ok(total);
        }
    }
}
