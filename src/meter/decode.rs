//! Decoding a compressed response body for the meter.
//!
//! The client gets the upstream's bytes as they are; the meter needs them
//! plain. [`Decoded`] sits in front of a reader and, for a `gzip` or `deflate`
//! body, inflates a copy of each frame as it passes, handing the output to the
//! reader in pieces of at most the decoder's buffer (32 KiB), so a body that
//! inflates enormously is never held whole. An identity body goes straight
//! through without a copy.

use std::io::{self, Write};

use flate2::write::{DeflateDecoder, GzDecoder, ZlibDecoder};

use super::{MeterReading, Reader};

/// A response's `content-encoding`, as far as the meter can read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No coding (an absent header, or `identity`).
    Identity,
    /// `gzip` or `x-gzip`.
    Gzip,
    /// `deflate`: zlib-wrapped as the HTTP spec says, or raw as some servers send.
    Deflate,
    /// Anything else (`br`, `zstd`, several codings stacked): the body is
    /// forwarded but cannot be metered.
    Unsupported,
}

impl Encoding {
    /// Reads a `content-encoding` header value (case-insensitive; `identity`
    /// entries in a list are ignored).
    pub fn from_header(value: &str) -> Encoding {
        let mut codings = value
            .split(',')
            .map(str::trim)
            .filter(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"));
        let Some(coding) = codings.next() else {
            return Encoding::Identity;
        };
        if codings.next().is_some() {
            return Encoding::Unsupported;
        }
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            Encoding::Gzip
        } else if coding.eq_ignore_ascii_case("deflate") {
            Encoding::Deflate
        } else {
            Encoding::Unsupported
        }
    }
}

/// A reader behind a decoder: feeds it the decoded bytes of each frame.
///
/// A body in an unsupported encoding, or one whose compressed data turns out
/// corrupt, counts one `malformed` and feeds nothing more (the half-read
/// event or body is not finished either); its reading then lacks the final
/// usage, which the caller records as inexact. A compressed body that merely
/// ends early is finished normally, as the reader itself can tell what it
/// missed.
#[derive(Debug)]
pub struct Decoded<R: Reader> {
    reader: R,
    decoder: Decoder,
}

/// The decoding state of one body.
#[derive(Debug)]
enum Decoder {
    Identity,
    Gzip(Box<GzDecoder<Vec<u8>>>),
    /// `deflate` before its first two bytes are known; they tell a zlib
    /// header from raw deflate data. Holds the first byte, once seen.
    DeflateStart(Option<u8>),
    Zlib(Box<ZlibDecoder<Vec<u8>>>),
    RawDeflate(Box<DeflateDecoder<Vec<u8>>>),
    /// Unsupported or corrupt: nothing more is fed.
    Stopped,
}

impl<R: Reader> Decoded<R> {
    /// Puts `reader` behind a decoder for `encoding`.
    pub fn new(encoding: Encoding, mut reader: R) -> Decoded<R> {
        let decoder = match encoding {
            Encoding::Identity => Decoder::Identity,
            Encoding::Gzip => Decoder::Gzip(Box::new(GzDecoder::new(Vec::new()))),
            Encoding::Deflate => Decoder::DeflateStart(None),
            Encoding::Unsupported => {
                reader.reading_mut().malformed += 1;
                Decoder::Stopped
            }
        };
        Decoded { reader, decoder }
    }

    /// Decodes the start of a `deflate` body once two bytes are known.
    fn start_deflate(&mut self, held: Option<u8>, bytes: &[u8]) -> io::Result<()> {
        let mut head = held.into_iter().chain(bytes.iter().copied());
        let (Some(first), Some(second)) = (head.next(), head.next()) else {
            // A single byte so far: wait for the next frame.
            self.decoder = Decoder::DeflateStart(held.or(bytes.first().copied()));
            return Ok(());
        };
        let held = held.as_slice();
        if is_zlib_header(first, second) {
            let mut decoder = Box::new(ZlibDecoder::new(Vec::new()));
            let result = pump(decoder.as_mut(), held, &mut self.reader)
                .and_then(|()| pump(decoder.as_mut(), bytes, &mut self.reader));
            self.decoder = Decoder::Zlib(decoder);
            result
        } else {
            let mut decoder = Box::new(DeflateDecoder::new(Vec::new()));
            let result = pump(decoder.as_mut(), held, &mut self.reader)
                .and_then(|()| pump(decoder.as_mut(), bytes, &mut self.reader));
            self.decoder = Decoder::RawDeflate(decoder);
            result
        }
    }
}

impl<R: Reader> Reader for Decoded<R> {
    fn feed(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let result = match &mut self.decoder {
            Decoder::Identity => {
                self.reader.feed(bytes);
                Ok(())
            }
            Decoder::Gzip(decoder) => pump(decoder.as_mut(), bytes, &mut self.reader),
            Decoder::Zlib(decoder) => pump(decoder.as_mut(), bytes, &mut self.reader),
            Decoder::RawDeflate(decoder) => pump(decoder.as_mut(), bytes, &mut self.reader),
            Decoder::DeflateStart(held) => {
                let held = *held;
                self.start_deflate(held, bytes)
            }
            Decoder::Stopped => Ok(()),
        };
        if result.is_err() {
            self.reader.reading_mut().malformed += 1;
            self.decoder = Decoder::Stopped;
        }
    }

    fn finish(&mut self) {
        // A trailer that is missing or wrong only means the body was cut or
        // garbled at its very end; everything decoded so far is sound, and
        // the reader notices on its own if the usage is missing.
        match &mut self.decoder {
            Decoder::Gzip(decoder) => finish_inflate(decoder.as_mut(), &mut self.reader),
            Decoder::Zlib(decoder) => finish_inflate(decoder.as_mut(), &mut self.reader),
            Decoder::RawDeflate(decoder) => finish_inflate(decoder.as_mut(), &mut self.reader),
            Decoder::Identity | Decoder::DeflateStart(_) => {}
            Decoder::Stopped => return,
        }
        self.reader.finish();
    }

    fn reading(&self) -> &MeterReading {
        self.reader.reading()
    }

    fn reading_mut(&mut self) -> &mut MeterReading {
        self.reader.reading_mut()
    }
}

/// The three flate2 write-side decoders, which inflate into a `Vec`.
trait Inflate: Write {
    /// The decoded bytes not yet handed to the reader.
    fn output(&mut self) -> &mut Vec<u8>;
    /// Ends the stream, checking its trailer.
    fn try_finish(&mut self) -> io::Result<()>;
}

impl Inflate for GzDecoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
    fn try_finish(&mut self) -> io::Result<()> {
        GzDecoder::try_finish(self)
    }
}

impl Inflate for ZlibDecoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
    fn try_finish(&mut self) -> io::Result<()> {
        ZlibDecoder::try_finish(self)
    }
}

impl Inflate for DeflateDecoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
    fn try_finish(&mut self) -> io::Result<()> {
        DeflateDecoder::try_finish(self)
    }
}

/// Inflates `input` into the reader. Each `write` inflates at most one
/// buffer's worth, which is handed on before the next, so the output is
/// never held whole.
fn pump(decoder: &mut impl Inflate, mut input: &[u8], reader: &mut impl Reader) -> io::Result<()> {
    while !input.is_empty() {
        let written = decoder.write(input)?;
        hand_on(decoder.output(), reader);
        if written == 0 {
            // The compressed stream has ended but the body goes on.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "data after the end of the compressed stream",
            ));
        }
        input = &input[written..];
    }
    // The last write's output is still inside the decoder.
    decoder.flush()?;
    hand_on(decoder.output(), reader);
    Ok(())
}

/// Ends a compressed body, handing on whatever output was left.
fn finish_inflate(decoder: &mut impl Inflate, reader: &mut impl Reader) {
    // Ignored on purpose: see `Decoded::finish`.
    let _ = decoder.try_finish();
    hand_on(decoder.output(), reader);
}

fn hand_on(output: &mut Vec<u8>, reader: &mut impl Reader) {
    if !output.is_empty() {
        reader.feed(output);
        output.clear();
    }
}

/// Whether two bytes open a zlib stream (RFC 1950): deflate method, and a
/// header checksum that is a multiple of 31.
fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0F == 8 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};

    /// Collects what it is fed, to see exactly what the decoder hands on.
    #[derive(Debug, Default)]
    struct Collect {
        bytes: Vec<u8>,
        finished: bool,
        reading: MeterReading,
    }

    impl Reader for Collect {
        fn feed(&mut self, bytes: &[u8]) {
            self.bytes.extend_from_slice(bytes);
        }
        fn finish(&mut self) {
            self.finished = true;
        }
        fn reading(&self) -> &MeterReading {
            &self.reading
        }
        fn reading_mut(&mut self) -> &mut MeterReading {
            &mut self.reading
        }
    }

    fn decode(encoding: Encoding, body: &[u8], chunk: usize) -> Collect {
        let mut decoded = Decoded::new(encoding, Collect::default());
        for piece in body.chunks(chunk) {
            decoded.feed(piece);
        }
        decoded.finish();
        decoded.reader
    }

    fn plain() -> Vec<u8> {
        (0..20_000u32)
            .flat_map(|i| format!("line {i} of a body that compresses well\n").into_bytes())
            .collect()
    }

    fn gzip(body: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(body).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn header_values() {
        assert_eq!(Encoding::from_header(""), Encoding::Identity);
        assert_eq!(Encoding::from_header("identity"), Encoding::Identity);
        assert_eq!(Encoding::from_header("GZIP"), Encoding::Gzip);
        assert_eq!(Encoding::from_header(" x-gzip "), Encoding::Gzip);
        assert_eq!(Encoding::from_header("deflate"), Encoding::Deflate);
        assert_eq!(Encoding::from_header("gzip, identity"), Encoding::Gzip);
        assert_eq!(Encoding::from_header("br"), Encoding::Unsupported);
        assert_eq!(Encoding::from_header("zstd"), Encoding::Unsupported);
        assert_eq!(
            Encoding::from_header("deflate, gzip"),
            Encoding::Unsupported
        );
    }

    #[test]
    fn identity_passes_bytes_through() {
        let collected = decode(Encoding::Identity, b"abc", 1);
        assert_eq!(collected.bytes, b"abc");
        assert!(collected.finished);
    }

    #[test]
    fn gzip_in_every_chunk_size() {
        let body = plain();
        let compressed = gzip(&body);
        for chunk in [1, 7, 100, 4096, compressed.len()] {
            let collected = decode(Encoding::Gzip, &compressed, chunk);
            assert!(collected.bytes == body, "chunk {chunk}");
            assert_eq!(collected.reading.malformed, 0);
            assert!(collected.finished);
        }
    }

    #[test]
    fn zlib_and_raw_deflate_both_read_as_deflate() {
        let body = plain();
        let zlib = {
            let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
            encoder.write_all(&body).unwrap();
            encoder.finish().unwrap()
        };
        let raw = {
            let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
            encoder.write_all(&body).unwrap();
            encoder.finish().unwrap()
        };
        assert!(is_zlib_header(zlib[0], zlib[1]));
        assert!(!is_zlib_header(raw[0], raw[1]));
        for compressed in [zlib, raw] {
            for chunk in [1, 2, 3, 1000] {
                let collected = decode(Encoding::Deflate, &compressed, chunk);
                assert!(collected.bytes == body, "chunk {chunk}");
                assert_eq!(collected.reading.malformed, 0);
            }
        }
    }

    #[test]
    fn output_is_handed_on_in_bounded_pieces() {
        #[derive(Debug, Default)]
        struct Largest(usize, MeterReading);
        impl Reader for Largest {
            fn feed(&mut self, bytes: &[u8]) {
                self.0 = self.0.max(bytes.len());
            }
            fn finish(&mut self) {}
            fn reading(&self) -> &MeterReading {
                &self.1
            }
            fn reading_mut(&mut self) -> &mut MeterReading {
                &mut self.1
            }
        }
        // 8 MiB of zeros compress to a few KiB, fed as one frame.
        let compressed = gzip(&vec![0u8; 8 << 20]);
        let mut decoded = Decoded::new(Encoding::Gzip, Largest::default());
        decoded.feed(&compressed);
        decoded.finish();
        assert!(decoded.reader.0 > 0 && decoded.reader.0 <= 64 << 10);
        assert_eq!(decoded.reading().malformed, 0);
    }

    #[test]
    fn corrupt_data_is_flagged_once_and_stops_feeding() {
        let mut corrupt = gzip(&plain());
        let middle = corrupt.len() / 2;
        corrupt[middle..middle + 64].fill(0xFF);
        let collected = decode(Encoding::Gzip, &corrupt, 512);
        assert_eq!(collected.reading.malformed, 1);
        assert!(!collected.finished);
        assert!(collected.bytes.len() < plain().len());
    }

    #[test]
    fn not_gzip_at_all_is_flagged() {
        let collected = decode(Encoding::Gzip, b"{\"type\":\"message\"}", 4);
        assert_eq!(collected.reading.malformed, 1);
        assert!(collected.bytes.is_empty());
    }

    #[test]
    fn truncated_body_finishes_with_what_was_decoded() {
        let body = plain();
        let compressed = gzip(&body);
        let collected = decode(Encoding::Gzip, &compressed[..compressed.len() / 2], 1000);
        assert_eq!(collected.reading.malformed, 0);
        assert!(collected.finished);
        assert!(!collected.bytes.is_empty() && body.starts_with(&collected.bytes));
    }

    #[test]
    fn trailing_bytes_after_the_stream_are_flagged() {
        let mut compressed = gzip(b"hello");
        compressed.extend_from_slice(b"garbage after the trailer");
        let collected = decode(Encoding::Gzip, &compressed, 1 << 10);
        assert_eq!(collected.bytes, b"hello");
        assert_eq!(collected.reading.malformed, 1);
    }

    #[test]
    fn unsupported_encoding_is_flagged_once_and_reads_nothing() {
        let collected = decode(Encoding::Unsupported, b"\x28\xb5\x2f\xfd", 1);
        assert_eq!(collected.reading.malformed, 1);
        assert!(collected.bytes.is_empty());
        assert!(!collected.finished);
    }

    #[test]
    fn empty_compressed_body_is_not_malformed() {
        for encoding in [Encoding::Gzip, Encoding::Deflate] {
            let collected = decode(encoding, b"", 1);
            assert_eq!(collected.reading.malformed, 0);
            assert!(collected.finished);
        }
    }
}
