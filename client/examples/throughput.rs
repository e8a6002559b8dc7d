//! Sealing and opening throughput against a raw AES-256-GCM loop over the
//! same bytes, in one run (BENCHMARKS.md, "Client-side encryption"):
//!
//! ```sh
//! cargo run --release -p coffre-client --example throughput -- 1024   # MiB
//! ```
//!
//! `raw-seal` and `raw-open` run the raw loop alone from standard input to
//! standard output, as `coffre seal`/`coffre open` do with `--in FILE --out
//! -`, for the end-to-end comparison of `benches/seal-file.sh`:
//!
//! ```sh
//! throughput raw-seal <big >big.raw && throughput raw-open <big.raw >/dev/null
//! ```
//!
//! The raw loops are ring's AES-256-GCM over 64 KiB chunks (the default
//! frame) with a counter nonce, from the same input to the same sink: the
//! cipher alone, no format. The sealed and opened streams go through the format's Sealer
//! and Opener from a generated input to a sink, in constant memory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Instant;

use coffre_client::format::DEFAULT_FRAME_LEN;
use coffre_client::{DataKey, Header, Opener, Sealer};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// `len` bytes of a repeating pattern, read in whatever pieces asked for.
struct Pattern {
    left: u64,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Counts what it is given.
struct Count(u64);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `io::copy` with the 256 KiB buffer `coffre seal` uses.
fn copy(input: &mut impl Read, output: &mut impl Write) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = input.read(&mut buf).unwrap();
        if n == 0 {
            return total;
        }
        output.write_all(&buf[..n]).unwrap();
        total += n as u64;
    }
}

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs
}

/// Reads until `buf` is full or the input ends; how much it read.
fn fill(input: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// The raw cipher from standard input to standard output: 64 KiB chunks,
/// each sealed (or opened) in place, with 256 KiB reads and writes as
/// `coffre seal` and `coffre open` do (through `BufReader`/`BufWriter`).
fn raw_stream(open: bool) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x42u8; 32]).unwrap());
    let frame = DEFAULT_FRAME_LEN as usize;
    let mut input = std::io::BufReader::with_capacity(256 * 1024, std::io::stdin().lock());
    let mut output = std::io::BufWriter::with_capacity(256 * 1024, std::io::stdout().lock());
    let mut chunk = vec![0u8; frame + 16];
    for i in 0u64.. {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&i.to_be_bytes());
        let nonce = Nonce::assume_unique_for_key(nonce);
        if open {
            let n = fill(&mut input, &mut chunk);
            if n == 0 {
                break;
            }
            let plain = key
                .open_in_place(nonce, Aad::empty(), &mut chunk[..n])
                .unwrap();
            output.write_all(plain).unwrap();
        } else {
            let n = fill(&mut input, &mut chunk[..frame]);
            if n == 0 {
                break;
            }
            let tag = key
                .seal_in_place_separate_tag(nonce, Aad::empty(), &mut chunk[..n])
                .unwrap();
            output.write_all(&chunk[..n]).unwrap();
            output.write_all(tag.as_ref()).unwrap();
        }
    }
    output.flush().unwrap();
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("raw-seal") => return raw_stream(false),
        Some("raw-open") => return raw_stream(true),
        _ => {}
    }
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MiB"))
        .unwrap_or(1024);
    let len = mib << 20;
    let blob = {
        let mut b = b"CF\x01\x01".to_vec();
        b.extend([0u8; 112]);
        b
    };
    let key = [0x42u8; 32];

    // Raw: the cipher alone, 64 KiB at a time, from the same input to the
    // same sink (sealing), and from memory to the sink (opening).
    let raw = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
    let frame = DEFAULT_FRAME_LEN as usize;
    let nonce = |i: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let mut chunk = vec![0u8; frame + 16];
    let mut input = Pattern { left: len };
    let mut sink = Count(0);
    let started = Instant::now();
    let mut i = 0u64;
    loop {
        let n = input.read(&mut chunk[..frame]).unwrap();
        if n == 0 {
            break;
        }
        let tag = raw
            .seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut chunk[..n])
            .unwrap();
        sink.write_all(&chunk[..n]).unwrap();
        sink.write_all(tag.as_ref()).unwrap();
        i += 1;
    }
    let raw_seal_secs = started.elapsed().as_secs_f64();
    // 64 MiB of raw frames in memory, opened len/64 MiB times.
    let sample = 64u64 << 20;
    let frames = (sample.min(len) as usize).div_ceil(frame);
    let mut raw_frames = Vec::with_capacity(frames);
    for i in 0..frames as u64 {
        let mut f = vec![0x5a; frame];
        let tag = raw
            .seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut f)
            .unwrap();
        f.extend_from_slice(tag.as_ref());
        raw_frames.push(f);
    }
    let rounds = (len / sample).max(1);
    let started = Instant::now();
    let mut raw_opened = 0u64;
    for _ in 0..rounds {
        for (i, f) in raw_frames.iter().enumerate() {
            chunk.copy_from_slice(f);
            let plain = raw
                .open_in_place(nonce(i as u64), Aad::empty(), &mut chunk)
                .unwrap();
            sink.write_all(plain).unwrap();
            raw_opened += plain.len() as u64;
        }
    }
    let raw_open_secs = started.elapsed().as_secs_f64();

    // Sealed: header, frames, to a sink.
    let dk = DataKey::from_slice(&key).unwrap();
    let mut sealed = Vec::new();
    let started = Instant::now();
    let mut out = Count(0);
    let mut sealer = Sealer::new(
        &mut out,
        &dk,
        BTreeMap::new(),
        blob.clone(),
        DEFAULT_FRAME_LEN,
    )
    .unwrap();
    copy(&mut Pattern { left: len }, &mut sealer);
    sealer.finish().unwrap();
    let seal_secs = started.elapsed().as_secs_f64();

    // Opened: a 64 MiB message (kept in memory), opened len/64 MiB times.
    let mut sealer =
        Sealer::new(&mut sealed, &dk, BTreeMap::new(), blob, DEFAULT_FRAME_LEN).unwrap();
    copy(
        &mut Pattern {
            left: sample.min(len),
        },
        &mut sealer,
    );
    sealer.finish().unwrap();
    let started = Instant::now();
    let mut opened = 0u64;
    for _ in 0..rounds {
        let mut input = &sealed[..];
        let header = Header::read_from(&mut input).unwrap();
        let mut opener = Opener::new(input, &header, &dk).unwrap();
        opened += copy(&mut opener, &mut Count(0));
    }
    let open_secs = started.elapsed().as_secs_f64();

    let raw_seal = mib_per_s(len, raw_seal_secs);
    let raw_open = mib_per_s(raw_opened, raw_open_secs);
    let seal_rate = mib_per_s(len, seal_secs);
    let open_rate = mib_per_s(opened, open_secs);
    println!("raw GCM seal  {raw_seal:6.0} MiB/s   raw GCM open  {raw_open:6.0} MiB/s");
    println!(
        "seal          {seal_rate:6.0} MiB/s   {:.2} of raw   ({mib} MiB in, {} bytes out)",
        seal_rate / raw_seal,
        out.0
    );
    println!(
        "open          {open_rate:6.0} MiB/s   {:.2} of raw   ({} MiB)",
        open_rate / raw_open,
        opened >> 20
    );
}
