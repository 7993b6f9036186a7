//! The writer and reader are exact inverses for every metadata type.

use gguf_tools::gguf::{
    self, tensor_data_size, Array, GgmlType, GgufFile, GgufString, TensorInfo, Value, ValueType,
};

fn every_type() -> Vec<(String, Value)> {
    let kv = |k: &str, v: Value| (k.to_string(), v);
    vec![
        kv("general.architecture", Value::from("llama")),
        kv("t.u8", Value::U8(250)),
        kv("t.i8", Value::I8(-120)),
        kv("t.u16", Value::U16(65_000)),
        kv("t.i16", Value::I16(-32_000)),
        kv("t.u32", Value::U32(4_000_000_000)),
        kv("t.i32", Value::I32(-2_000_000_000)),
        kv("t.f32", Value::F32(-1.5e-7)),
        kv("t.f32.negzero", Value::F32(-0.0)),
        kv("t.bool.true", Value::Bool(true)),
        kv("t.bool.false", Value::Bool(false)),
        kv("t.string", Value::from("plain")),
        kv("t.string.empty", Value::from("")),
        kv("t.string.unicode", Value::from("héllo ✓ 日本語 🦙")),
        kv(
            "t.string.raw",
            Value::String(GgufString(vec![0xff, 0x00, 0xc3])),
        ),
        kv("t.u64", Value::U64(u64::MAX)),
        kv("t.i64", Value::I64(i64::MIN)),
        kv("t.f64", Value::F64(std::f64::consts::PI)),
        kv("t.arr.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        kv("t.arr.i8", Value::Array(Array::I8(vec![-1, 2]))),
        kv("t.arr.u16", Value::Array(Array::U16(vec![1, 65535]))),
        kv("t.arr.i16", Value::Array(Array::I16(vec![-3]))),
        kv("t.arr.u32", Value::Array(Array::U32(vec![7; 5]))),
        kv("t.arr.i32", Value::Array(Array::I32(vec![-7, 7]))),
        kv(
            "t.arr.f32",
            Value::Array(Array::F32(vec![0.1, f32::MAX, f32::MIN_POSITIVE])),
        ),
        kv(
            "t.arr.bool",
            Value::Array(Array::Bool(vec![true, false, true])),
        ),
        kv(
            "t.arr.string",
            Value::Array(Array::String(vec!["a".into(), "".into(), "ü🦙".into()])),
        ),
        kv("t.arr.u64", Value::Array(Array::U64(vec![u64::MAX, 0]))),
        kv("t.arr.i64", Value::Array(Array::I64(vec![i64::MIN]))),
        kv("t.arr.f64", Value::Array(Array::F64(vec![1e300, -0.0]))),
        kv("t.arr.empty.u32", Value::Array(Array::U32(vec![]))),
        kv("t.arr.empty.string", Value::Array(Array::String(vec![]))),
        kv("t.arr.empty.array", Value::Array(Array::Array(vec![]))),
        kv(
            "t.arr.nested",
            Value::Array(Array::Array(vec![
                Array::F32(vec![1.0, 2.0]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::U8(vec![9]), Array::Bool(vec![])]),
                Array::U64(vec![]),
            ])),
        ),
        kv("ключ.ユニコード", Value::U8(1)),
    ]
}

/// A file whose tensors are backed by real (patterned) data bytes.
fn with_data(metadata: Vec<(String, Value)>, tensors: Vec<TensorInfo>) -> Vec<u8> {
    let file = GgufFile::new(metadata, tensors).unwrap();
    let mut bytes = file.header_bytes().unwrap();
    let data_len = file
        .tensors
        .iter()
        .map(|t| gguf::align_up(t.offset + t.size(), file.alignment).unwrap())
        .max()
        .unwrap_or(0);
    bytes.extend((0..data_len).map(|i| (i % 251) as u8));
    bytes
}

fn parse(bytes: &[u8]) -> GgufFile {
    gguf::read_from(bytes, bytes.len() as u64).unwrap()
}

#[test]
fn every_metadata_type_round_trips_bit_exactly() {
    let file = GgufFile::new(every_type(), vec![]).unwrap();
    let bytes = file.header_bytes().unwrap();
    let back = parse(&bytes);
    assert_eq!(back.metadata, file.metadata);
    assert_eq!(back.version, 3);
    assert_eq!(back.header_bytes().unwrap(), bytes);
    // Floats compare by bits too (catches -0.0 / NaN payload changes PartialEq would hide).
    let bits = |f: &GgufFile| match f.get("t.f32.negzero") {
        Some(Value::F32(v)) => v.to_bits(),
        _ => panic!("missing"),
    };
    assert_eq!(bits(&back), bits(&file));
}

#[test]
fn nan_payloads_survive_a_round_trip() {
    let nan = f32::from_bits(0x7fc0_1234);
    let file = GgufFile::new(
        vec![
            ("a".into(), Value::F32(nan)),
            ("b".into(), Value::Array(Array::F32(vec![nan, 1.0]))),
        ],
        vec![],
    )
    .unwrap();
    let bytes = file.header_bytes().unwrap();
    assert_eq!(parse(&bytes).header_bytes().unwrap(), bytes);
}

#[test]
fn tensors_and_alignment_round_trip() {
    for alignment in [None, Some(1u32), Some(64), Some(4096)] {
        let mut meta = every_type();
        if let Some(a) = alignment {
            meta.push(("general.alignment".into(), Value::U32(a)));
        }
        let a = u64::from(alignment.unwrap_or(32));
        let t = |name: &str, dims: Vec<u64>, ty, offset| TensorInfo {
            name: name.into(),
            dims,
            ggml_type: ty,
            offset,
        };
        let first = t("a", vec![64, 3], GgmlType::Q8_0, 0);
        let second_off = gguf::align_up(first.size(), a).unwrap();
        let tensors = vec![
            first,
            t("b", vec![5], GgmlType::F32, second_off),
            t(
                "c.ü",
                vec![256, 1, 2, 1],
                GgmlType::Q4K,
                gguf::align_up(second_off + 20, a).unwrap(),
            ),
        ];
        let bytes = with_data(meta, tensors.clone());
        let back = parse(&bytes);
        assert_eq!(back.tensors, tensors);
        assert_eq!(back.alignment, a);
        assert_eq!(back.data_offset % a, 0);
        let header = back.header_bytes().unwrap();
        assert_eq!(header.len() as u64, back.data_offset);
        assert_eq!(header[..], bytes[..header.len()]);
    }
}

#[test]
fn value_type_ids_match_the_spec() {
    let ids: Vec<u32> = [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::F32,
        ValueType::Bool,
        ValueType::String,
        ValueType::Array,
        ValueType::U64,
        ValueType::I64,
        ValueType::F64,
    ]
    .iter()
    .map(|t| t.id())
    .collect();
    assert_eq!(ids, (0..13).collect::<Vec<_>>());
    assert_eq!(tensor_data_size(GgmlType::BF16, &[4, 4]), Some(32));
}

#[test]
fn header_layout_is_the_documented_one() {
    // One u32 key and one F32 tensor, checked byte by byte against the GGUF spec.
    let file = GgufFile::new(
        vec![("k".into(), Value::U32(7))],
        vec![TensorInfo {
            name: "t".into(),
            dims: vec![2, 3],
            ggml_type: GgmlType::F32,
            offset: 0,
        }],
    )
    .unwrap();
    let b = file.header_bytes().unwrap();
    let mut e = Vec::new();
    e.extend(b"GGUF");
    e.extend(3u32.to_le_bytes());
    e.extend(1u64.to_le_bytes()); // tensors
    e.extend(1u64.to_le_bytes()); // kv
    e.extend(1u64.to_le_bytes());
    e.extend(b"k");
    e.extend(4u32.to_le_bytes());
    e.extend(7u32.to_le_bytes());
    e.extend(1u64.to_le_bytes());
    e.extend(b"t");
    e.extend(2u32.to_le_bytes());
    e.extend(2u64.to_le_bytes());
    e.extend(3u64.to_le_bytes());
    e.extend(0u32.to_le_bytes());
    e.extend(0u64.to_le_bytes());
    e.resize(e.len().div_ceil(32) * 32, 0);
    assert_eq!(b, e);
}
