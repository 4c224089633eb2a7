//! The meter alone (issue 5, scenario f): bytes per second through
//! `Meter::for_response(true, "text/event-stream", "")` over the recorded SSE
//! corpus, next to a plain `memchr` newline scan of the same bytes, the
//! physical floor of any line-oriented reader.
//!
//! The corpus is every `tests/fixtures/sse/*.sse` concatenated, fed through
//! one meter per iteration in the chunk shapes a proxy sees: one SSE event
//! per chunk (how the API and the mock write), and 1460-byte chunks (one TCP
//! segment of payload, cutting lines and UTF-8 anywhere).
//!
//! `cargo bench --bench meter`; `scripts/bench` reads criterion's estimates
//! from `target/criterion/meter/`.

// A benchmark with missing fixtures should stop at once, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::meter::Meter;

fn corpus() -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sse");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sse"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .sse fixtures in {}", dir.display());
    let mut corpus = Vec::new();
    for file in files {
        corpus.extend(std::fs::read(file).unwrap());
    }
    corpus
}

/// Splits after every blank line (`\n\n`): one event per chunk.
fn event_chunks(corpus: &[u8]) -> Vec<&[u8]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for end in memchr::memmem::find_iter(corpus, b"\n\n") {
        chunks.push(&corpus[start..end + 2]);
        start = end + 2;
    }
    if start < corpus.len() {
        chunks.push(&corpus[start..]);
    }
    chunks
}

fn meter_all(chunks: &[&[u8]]) -> u64 {
    let mut meter = Meter::for_response(true, "text/event-stream", "");
    for chunk in chunks {
        meter.feed(chunk);
    }
    meter.finish();
    meter.reading().map_or(0, |r| r.usage.output_tokens)
}

fn memchr_newlines(chunks: &[&[u8]]) -> usize {
    chunks
        .iter()
        .map(|c| memchr::memchr_iter(b'\n', c).count())
        .sum()
}

fn bench_meter(c: &mut Criterion) {
    let corpus = corpus();
    let by_event = event_chunks(&corpus);
    let by_segment: Vec<&[u8]> = corpus.chunks(1460).collect();
    // The meter must actually read usage from the corpus, or the figure is
    // the speed of doing nothing.
    assert!(meter_all(&by_event) > 0 && meter_all(&by_segment) > 0);

    let mut group = c.benchmark_group("meter");
    group.throughput(Throughput::Bytes(corpus.len() as u64));
    group.bench_function("sse_meter_event_chunks", |b| {
        b.iter(|| meter_all(black_box(&by_event)))
    });
    group.bench_function("sse_meter_1460b_chunks", |b| {
        b.iter(|| meter_all(black_box(&by_segment)))
    });
    group.bench_function("memchr_newlines_event_chunks", |b| {
        b.iter(|| memchr_newlines(black_box(&by_event)))
    });
    group.finish();
}

criterion_group!(benches, bench_meter);
criterion_main!(benches);
