//! Sealing and opening as byte streams, in constant memory: one frame of
//! plaintext buffered at a time ([`Sealer`] is a `Write`, [`Opener`] a
//! `Read`).
//!
//! [`Opener`] hands out each frame's plaintext once its tag is verified,
//! before later frames are read: a message cut short or tampered with
//! further on fails only when the reader gets there. Treat what was read
//! as unverified until `read` has returned `Ok(0)` (the end of the last
//! frame, verified), as with any streaming AEAD; `coffre open --out FILE`
//! writes to a temporary file and renames it only then.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use zeroize::Zeroizing;

use crate::format::{DataKey, FormatError, FrameKeys, Header, MAX_FRAMES, TAG_LEN};

fn io_error(e: FormatError) -> io::Error {
    match e {
        FormatError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

/// Writes a sealed message to `W`: the header at once, then a frame each
/// time `frame_len` bytes of plaintext have come and more follow; the last
/// frame (perhaps empty) at [`Sealer::finish`], which must be called: a
/// sealer dropped without it leaves a message that does not open.
pub struct Sealer<W: Write> {
    output: W,
    keys: FrameKeys,
    frame_len: usize,
    /// The plaintext of the frame being filled (then sealed in place).
    buf: Zeroizing<Vec<u8>>,
    index: u64,
    plaintext_len: u64,
}

impl<W: Write> std::fmt::Debug for Sealer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("frame_len", &self.frame_len)
            .field("frames", &self.index)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Sealer<W> {
    /// Starts a message under `data_key`, whose wrapped form `blob` coffre
    /// made for `context`; writes the header.
    pub fn new(
        mut output: W,
        data_key: &DataKey,
        context: BTreeMap<String, String>,
        blob: Vec<u8>,
        frame_len: u32,
    ) -> Result<Self, FormatError> {
        let (header, keys) = Header::seal(data_key, context, blob, frame_len)?;
        output.write_all(&header.to_bytes())?;
        Self::started(output, keys, frame_len)
    }

    /// A sealer whose header is already written (the golden messages).
    #[doc(hidden)]
    pub fn started(output: W, keys: FrameKeys, frame_len: u32) -> Result<Self, FormatError> {
        let frame_len =
            usize::try_from(frame_len).map_err(|_| FormatError::InvalidInput("frame length"))?;
        Ok(Sealer {
            output,
            keys,
            frame_len,
            buf: Zeroizing::new(Vec::with_capacity(frame_len + TAG_LEN)),
            index: 0,
            plaintext_len: 0,
        })
    }

    fn emit(&mut self, last: bool) -> Result<(), FormatError> {
        if self.index >= MAX_FRAMES {
            return Err(FormatError::InvalidInput(
                "the message is too long: at most 2^32 frames",
            ));
        }
        self.keys.seal_frame(self.index, last, &mut self.buf)?;
        self.output.write_all(&self.buf)?;
        // Ciphertext now: the next frame's plaintext overwrites it, and the
        // buffer is zeroized when dropped.
        self.buf.clear();
        self.index += 1;
        Ok(())
    }

    /// Seals the last frame and flushes; the output, and the plaintext's
    /// length.
    pub fn finish(mut self) -> Result<(W, u64), FormatError> {
        self.emit(true)?;
        self.output.flush()?;
        let Sealer {
            output,
            plaintext_len,
            ..
        } = self;
        Ok((output, plaintext_len))
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // A full frame goes out only once more plaintext comes: the last
        // frame must be the one finish() seals.
        if self.buf.len() == self.frame_len {
            self.emit(false).map_err(io_error)?;
        }
        let room = self.frame_len - self.buf.len();
        let take = room.min(data.len());
        self.buf
            .extend_from_slice(data.get(..take).unwrap_or_default());
        self.plaintext_len += take as u64;
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.output.flush()
    }
}

/// Reads the plaintext of a sealed message from `R`, frame by frame, each
/// verified before any of it is returned; `Ok(0)` only after the last
/// frame verified. Any failure is an `InvalidData` error whose inner error
/// is a [`FormatError`].
pub struct Opener<R: Read> {
    input: R,
    keys: FrameKeys,
    frame_len: usize,
    /// The current frame (always `frame_len + 16` long): ciphertext ‖ tag
    /// as read, then its plaintext in front.
    buf: Zeroizing<Vec<u8>>,
    /// Plaintext of `buf` not yet handed out: `buf[pos..plain_len]`.
    pos: usize,
    plain_len: usize,
    /// One byte read past a frame to learn that another follows.
    peeked: Option<u8>,
    index: u64,
    done: bool,
}

impl<R: Read> std::fmt::Debug for Opener<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("frame_len", &self.frame_len)
            .field("frames", &self.index)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Opener<R> {
    /// Opens the message whose `header` was read from `input` already,
    /// under `data_key` (what coffre's Decrypt gave for `header.blob` and
    /// `header.context`): the commitment and the header's tag are checked
    /// here.
    pub fn new(input: R, header: &Header, data_key: &DataKey) -> Result<Self, FormatError> {
        let keys = header.keys(data_key)?;
        let frame_len = usize::try_from(header.frame_len)
            .map_err(|_| FormatError::BadHeader("frame length"))?;
        Ok(Opener {
            input,
            keys,
            frame_len,
            buf: Zeroizing::new(vec![0u8; frame_len + TAG_LEN]),
            pos: 0,
            plain_len: 0,
            peeked: None,
            index: 0,
            done: false,
        })
    }

    /// Reads into `buf[filled..]` until it is full or the input ends; the
    /// bytes it holds. (`buf` keeps its full length: no zeroing per frame.)
    fn fill(&mut self, mut filled: usize) -> io::Result<usize> {
        let want = self.buf.len();
        while filled < want {
            match self
                .input
                .read(self.buf.get_mut(filled..).unwrap_or_default())
            {
                Ok(0) => break,
                Ok(got) => filled += got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }

    /// Reads and opens the next frame: `buf[..plain_len]` is its plaintext
    /// (overwriting the previous one's; the buffer is zeroized on drop).
    fn next_frame(&mut self) -> io::Result<()> {
        let mut filled = 0;
        if let (Some(b), Some(first)) = (self.peeked.take(), self.buf.first_mut()) {
            *first = b;
            filled = 1;
        }
        let full = self.buf.len();
        let filled = self.fill(filled)?;
        // A full frame is the last one only if nothing follows it.
        let last = if filled < full {
            true
        } else {
            let mut one = [0u8; 1];
            let more = loop {
                match self.input.read(&mut one) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            if more == 1 {
                self.peeked = Some(one[0]);
            }
            more == 0
        };
        if filled < TAG_LEN || self.index >= MAX_FRAMES {
            return Err(io_error(FormatError::NotAuthentic));
        }
        let frame = self.buf.get_mut(..filled).unwrap_or_default();
        let plain_len = self
            .keys
            .open_frame(self.index, last, frame)
            .map_err(io_error)?;
        self.index += 1;
        self.pos = 0;
        self.plain_len = plain_len;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos == self.plain_len {
            if self.done {
                return Ok(0);
            }
            self.next_frame()?;
        }
        let available = self.buf.get(self.pos..self.plain_len).unwrap_or_default();
        let n = available.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), available.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos += n;
        Ok(n)
    }
}

/// Seals all of `input` to `output` (header, frames); the plaintext's length.
pub fn seal(
    input: &mut impl Read,
    output: impl Write,
    data_key: &DataKey,
    context: BTreeMap<String, String>,
    blob: Vec<u8>,
    frame_len: u32,
) -> Result<u64, FormatError> {
    let mut sealer = Sealer::new(output, data_key, context, blob, frame_len)?;
    copy(input, &mut sealer)?;
    Ok(sealer.finish()?.1)
}

/// Opens a message whose header was read, writing its plaintext to
/// `output`; the plaintext's length. On an error, what was written is not
/// to be trusted.
pub fn open(
    input: impl Read,
    output: &mut impl Write,
    header: &Header,
    data_key: &DataKey,
) -> Result<u64, FormatError> {
    let mut opener = Opener::new(input, header, data_key)?;
    copy(&mut opener, output)
}

/// `io::copy` through a zeroized buffer, with a format error unwrapped.
fn copy(input: &mut impl Read, output: &mut impl Write) -> Result<u64, FormatError> {
    let mut buf = Zeroizing::new(vec![0u8; 64 * 1024]);
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(unwrap_format(e)),
        };
        output
            .write_all(buf.get(..n).unwrap_or_default())
            .map_err(unwrap_format)?;
        total += n as u64;
    }
}

fn unwrap_format(e: io::Error) -> FormatError {
    if e.get_ref().is_some_and(|inner| inner.is::<FormatError>()) {
        if let Some(inner) = e.into_inner() {
            if let Ok(format) = inner.downcast::<FormatError>() {
                return *format;
            }
        }
        return FormatError::NotAuthentic;
    }
    FormatError::Io(e)
}
