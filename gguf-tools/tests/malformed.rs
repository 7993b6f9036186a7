//! Malformed input: typed errors, no panics, and no allocation beyond what the file size
//! implies. A thread-local counting allocator records the largest single allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use gguf_tools::gguf::{self, GgufError, GgufFile};
use gguf_tools::synth::{self, SynthOptions, WeightType};

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: the thread-local may already be gone while a thread shuts down.
        let _ = LARGEST.try_with(|m| m.set(m.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Parses `bytes`, asserting that no single allocation exceeded a small multiple of the
/// input size (plus the reader's fixed buffers).
fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    LARGEST.with(|m| m.set(0));
    let result = gguf::read_from(bytes, bytes.len() as u64);
    let largest = LARGEST.with(Cell::get);
    let bound = 64 * 1024 + 4 * bytes.len();
    assert!(
        largest <= bound,
        "allocated {largest} bytes for a {}-byte file",
        bytes.len()
    );
    result
}

/// Raw GGUF builder for hand-made (and lying) headers.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw::default();
        r.0.extend(b"GGUF");
        r.u32(3).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend(s.as_bytes());
        self
    }
    fn pad(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        dims.iter().for_each(|&d| {
            self.u64(d);
        });
        self.u32(ty).u64(offset)
    }
}

fn small_model() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut shape = synth::shape_by_name("tiny").unwrap();
    shape.layers = 1;
    shape.vocab = 32;
    shape.embd = 32;
    shape.heads = 2;
    shape.kv_heads = 1;
    shape.ff = 32;
    let opts = SynthOptions {
        shape,
        weight_type: WeightType::Q8_0,
        seed: 3,
    };
    synth::write(&opts, &path, false).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn every_truncation_is_a_typed_error() {
    let bytes = small_model();
    parse(&bytes).unwrap();
    for len in 0..bytes.len() {
        let err = parse(&bytes[..len]).expect_err("truncated file parsed");
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. }
                    | GgufError::CountTooLarge { .. }
                    | GgufError::OffsetPastEnd { .. }
                    | GgufError::DataPastEnd { .. }
            ),
            "prefix {len}: {err}"
        );
    }
}

#[test]
fn lying_counts_are_refused_before_allocating() {
    let cases: Vec<Raw> = vec![
        Raw::header(0, u64::MAX),
        Raw::header(u64::MAX, 0),
        Raw::header(1 << 40, 1 << 40),
        {
            let mut r = Raw::header(0, 1);
            r.u64(u64::MAX - 3);
            r
        },
        {
            let mut r = Raw::header(0, 1);
            r.str("k").u32(8).u64(1 << 50);
            r
        },
        {
            let mut r = Raw::header(0, 1);
            r.str("k").u32(9).u32(6).u64(u64::MAX / 2);
            r
        },
        {
            let mut r = Raw::header(0, 1);
            r.str("k").u32(9).u32(8).u64(1 << 40).pad(64);
            r
        },
        {
            // Nested arrays each claiming as many elements as the file could hold.
            let mut r = Raw::header(0, 1);
            r.str("k").u32(9);
            for _ in 0..10 {
                r.u32(9).u64(4000);
            }
            r.pad(48_000);
            r
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let err = parse(&c.0).expect_err("lying file parsed");
        assert!(
            matches!(
                err,
                GgufError::CountTooLarge { .. } | GgufError::Truncated { .. }
            ),
            "case {i}: {err}"
        );
    }
}

#[test]
fn deep_nesting_is_bounded() {
    let mut r = Raw::header(0, 1);
    r.str("k").u32(9);
    for _ in 0..100_000 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    assert!(matches!(parse(&r.0), Err(GgufError::NestingTooDeep { .. })));
}

#[test]
fn unknown_types_and_bad_values() {
    let mut r = Raw::header(0, 1);
    r.str("k").u32(13).pad(8);
    assert!(matches!(
        parse(&r.0),
        Err(GgufError::UnknownValueType { type_id: 13, .. })
    ));

    let mut r = Raw::header(0, 1);
    r.str("k").u32(9).u32(99).u64(0);
    assert!(matches!(
        parse(&r.0),
        Err(GgufError::UnknownValueType { type_id: 99, .. })
    ));

    let mut r = Raw::header(0, 1);
    r.str("k").u32(7);
    r.0.push(2);
    assert!(matches!(
        parse(&r.0),
        Err(GgufError::InvalidBool { byte: 2, .. })
    ));

    let mut r = Raw::header(0, 2);
    r.str("k").u32(4).u32(1).str("k").u32(4).u32(1);
    assert!(matches!(parse(&r.0), Err(GgufError::DuplicateKey(_))));

    let mut r = Raw::header(0, 1);
    r.str("").u32(4).u32(1);
    assert!(matches!(parse(&r.0), Err(GgufError::EmptyKey { .. })));

    let mut bad_magic = Raw::header(0, 0);
    bad_magic.0[0] = b'X';
    assert!(matches!(
        parse(&bad_magic.0),
        Err(GgufError::BadMagic { .. })
    ));

    for (version, big_endian) in [(1u32, false), (4, false), (0, false), (0x0300_0000, true)] {
        let mut r = Raw::default();
        r.0.extend(b"GGUF");
        r.u32(version).u64(0).u64(0);
        let err = parse(&r.0).unwrap_err();
        if big_endian {
            assert!(matches!(err, GgufError::BigEndian(_)), "{err}");
        } else {
            assert!(
                matches!(err, GgufError::UnsupportedVersion(v) if v == version),
                "{err}"
            );
        }
    }
}

#[test]
fn bad_alignment_is_refused() {
    for (ty, value) in [(4u32, 0u32), (4, 3), (4, 48), (10, 32)] {
        let mut r = Raw::header(0, 1);
        r.str("general.alignment").u32(ty).u32(value);
        if ty == 10 {
            r.u32(0);
        }
        let err = parse(&r.0).unwrap_err();
        assert!(
            matches!(err, GgufError::BadAlignment { .. }),
            "{ty}/{value}: {err}"
        );
    }
}

fn one_tensor(dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut r = Raw::header(1, 0);
    r.tensor("t", dims, ty, offset);
    let pad = r.0.len().div_ceil(32) * 32 - r.0.len();
    r.pad(pad + data);
    r.0
}

#[test]
fn tensor_info_errors() {
    parse(&one_tensor(&[8], 0, 0, 32)).unwrap();
    let check = |bytes: Vec<u8>, ok: fn(&GgufError) -> bool| {
        let err = parse(&bytes).unwrap_err();
        assert!(ok(&err), "{err}");
    };
    check(one_tensor(&[8], 0, 32, 32), |e| {
        matches!(e, GgufError::OffsetPastEnd { .. })
    });
    check(one_tensor(&[8], 0, u64::MAX - 31, 32), |e| {
        matches!(e, GgufError::OffsetPastEnd { .. })
    });
    check(one_tensor(&[8], 0, 4, 64), |e| {
        matches!(e, GgufError::MisalignedOffset { .. })
    });
    check(one_tensor(&[8], 4, 0, 32), |e| {
        matches!(e, GgufError::UnknownGgmlType { type_id: 4, .. })
    });
    check(one_tensor(&[8], 1000, 0, 32), |e| {
        matches!(e, GgufError::UnknownGgmlType { .. })
    });
    check(one_tensor(&[1, 1, 1, 1, 1], 0, 0, 32), |e| {
        matches!(e, GgufError::TooManyDims { n_dims: 5, .. })
    });
    check(one_tensor(&[u64::MAX, u64::MAX], 0, 0, 32), |e| {
        matches!(e, GgufError::SizeOverflow { .. })
    });
    check(one_tensor(&[33], 8, 0, 64), |e| {
        matches!(e, GgufError::RowNotBlocks { .. })
    });
    check(one_tensor(&[1 << 62, 4], 24, 0, 32), |e| {
        matches!(e, GgufError::SizeOverflow { .. })
    });

    let mut r = Raw::header(u32::MAX as u64, 0);
    r.u32(u32::MAX).pad(64);
    assert!(parse(&r.0).is_err());

    // Huge n_dims is refused before the dims are read.
    let mut r = Raw::header(1, 0);
    r.str("t").u32(u32::MAX).pad(64);
    assert!(matches!(parse(&r.0), Err(GgufError::TooManyDims { .. })));

    // Two tensors sharing bytes.
    let mut r = Raw::header(2, 0);
    r.tensor("a", &[16], 0, 0).tensor("b", &[8], 0, 32);
    let pad = r.0.len().div_ceil(32) * 32 - r.0.len();
    r.pad(pad + 64);
    assert!(matches!(parse(&r.0), Err(GgufError::Overlap { .. })));

    let mut r = Raw::header(2, 0);
    r.tensor("a", &[8], 0, 0).tensor("a", &[8], 0, 32);
    assert!(matches!(parse(&r.0), Err(GgufError::DuplicateTensor(_))));
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn mutation_fuzz_never_panics() {
    let base = small_model();
    // Only the header is interesting; keep a little data so offsets can still validate.
    let header_len = gguf::read_from(&base[..], base.len() as u64)
        .unwrap()
        .data_offset as usize;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut parsed = 0;
    for _ in 0..4000 {
        let mut b = base.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(header_len.min(b.len()));
            match rng.below(6) {
                0 => b[i] ^= 1 << rng.below(8),
                1 => b[i] = rng.next() as u8,
                // Lengths and counts are little-endian: hit their high bytes too.
                2 => b[i] = 0xff,
                3 => b[i] = 0,
                4 => {
                    let end = (i + 8).min(b.len());
                    b[i..end].iter_mut().for_each(|x| *x = 0xff);
                }
                _ => b.truncate(i),
            }
        }
        let result = std::panic::catch_unwind(|| parse(&b));
        match result {
            Ok(Ok(file)) => {
                parsed += 1;
                let _ = file.write_header(&mut std::io::sink());
                let _ = gguf_tools::inspect::report("m", &file).to_text();
                let _ = gguf_tools::filters::QFilters::from_metadata(&file.metadata);
            }
            Ok(Err(_)) => {}
            Err(_) => panic!("reader panicked on a mutated file"),
        }
    }
    // Some mutations (e.g. inside string values) leave the file valid.
    assert!(parsed > 0);
}
