//! ggml tensor types and their storage sizes, as laid out by ggml's block structs.

use std::fmt;

/// Every ggml type that may appear in a GGUF file. Removed ids (4, 5, 31-33, 36-38) are
/// deliberately absent so that files using them are rejected rather than misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    IQ2XXS = 16,
    IQ2XS = 17,
    IQ3XXS = 18,
    IQ1S = 19,
    IQ4NL = 20,
    IQ3S = 21,
    IQ2S = 22,
    IQ4XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
    NVFP4 = 40,
    Q1_0 = 41,
    Q2_0 = 42,
}

/// (type, elements per block, bytes per block, display name).
const TABLE: &[(GgmlType, u64, u64, &str)] = &[
    (GgmlType::F32, 1, 4, "F32"),
    (GgmlType::F16, 1, 2, "F16"),
    (GgmlType::Q4_0, 32, 18, "Q4_0"),
    (GgmlType::Q4_1, 32, 20, "Q4_1"),
    (GgmlType::Q5_0, 32, 22, "Q5_0"),
    (GgmlType::Q5_1, 32, 24, "Q5_1"),
    (GgmlType::Q8_0, 32, 34, "Q8_0"),
    (GgmlType::Q8_1, 32, 36, "Q8_1"),
    (GgmlType::Q2K, 256, 84, "Q2_K"),
    (GgmlType::Q3K, 256, 110, "Q3_K"),
    (GgmlType::Q4K, 256, 144, "Q4_K"),
    (GgmlType::Q5K, 256, 176, "Q5_K"),
    (GgmlType::Q6K, 256, 210, "Q6_K"),
    (GgmlType::Q8K, 256, 292, "Q8_K"),
    (GgmlType::IQ2XXS, 256, 66, "IQ2_XXS"),
    (GgmlType::IQ2XS, 256, 74, "IQ2_XS"),
    (GgmlType::IQ3XXS, 256, 98, "IQ3_XXS"),
    (GgmlType::IQ1S, 256, 50, "IQ1_S"),
    (GgmlType::IQ4NL, 32, 18, "IQ4_NL"),
    (GgmlType::IQ3S, 256, 110, "IQ3_S"),
    (GgmlType::IQ2S, 256, 82, "IQ2_S"),
    (GgmlType::IQ4XS, 256, 136, "IQ4_XS"),
    (GgmlType::I8, 1, 1, "I8"),
    (GgmlType::I16, 1, 2, "I16"),
    (GgmlType::I32, 1, 4, "I32"),
    (GgmlType::I64, 1, 8, "I64"),
    (GgmlType::F64, 1, 8, "F64"),
    (GgmlType::IQ1M, 256, 56, "IQ1_M"),
    (GgmlType::BF16, 1, 2, "BF16"),
    (GgmlType::TQ1_0, 256, 54, "TQ1_0"),
    (GgmlType::TQ2_0, 256, 66, "TQ2_0"),
    (GgmlType::MXFP4, 32, 17, "MXFP4"),
    (GgmlType::NVFP4, 64, 36, "NVFP4"),
    (GgmlType::Q1_0, 128, 18, "Q1_0"),
    (GgmlType::Q2_0, 64, 18, "Q2_0"),
];

impl GgmlType {
    /// The type for a raw id from a file, or `None` for ids ggml does not (or no longer) define.
    pub fn from_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|e| e.0 as u32 == id).map(|e| e.0)
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    fn entry(self) -> (u64, u64, &'static str) {
        // The table covers every variant; the fallback only keeps this total.
        TABLE
            .iter()
            .find(|e| e.0 == self)
            .map_or((1, 1, "?"), |e| (e.1, e.2, e.3))
    }

    /// Elements per quantization block.
    pub fn block_size(self) -> u64 {
        self.entry().0
    }

    /// Bytes per quantization block.
    pub fn type_size(self) -> u64 {
        self.entry().1
    }

    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Parses a name as printed by [`GgmlType::name`], case-insensitively.
    pub fn from_name(name: &str) -> Option<Self> {
        TABLE
            .iter()
            .find(|e| e.3.eq_ignore_ascii_case(name))
            .map(|e| e.0)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes a tensor of this type and shape (ne0 first) occupies, without alignment padding.
///
/// `None` when the first dimension is not a whole number of blocks (ggml cannot store such
/// a row) or when the size does not fit in a u64.
pub fn tensor_data_size(ggml_type: GgmlType, dims: &[u64]) -> Option<u64> {
    let block = ggml_type.block_size();
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % block != 0 {
        return None;
    }
    let mut size = (ne0 / block).checked_mul(ggml_type.type_size())?;
    for &d in dims.iter().skip(1) {
        size = size.checked_mul(d)?;
    }
    Some(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_removed_ids_are_unknown() {
        for e in TABLE {
            assert_eq!(GgmlType::from_id(e.0.id()), Some(e.0));
            assert_eq!(GgmlType::from_name(e.3), Some(e.0));
        }
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None);
        }
    }

    #[test]
    fn sizes_match_ggml_blocks() {
        assert_eq!(tensor_data_size(GgmlType::F32, &[3, 5]), Some(60));
        assert_eq!(tensor_data_size(GgmlType::F16, &[64]), Some(128));
        assert_eq!(tensor_data_size(GgmlType::Q8_0, &[64, 2]), Some(2 * 2 * 34));
        assert_eq!(
            tensor_data_size(GgmlType::Q4K, &[512, 3]),
            Some(2 * 144 * 3)
        );
        assert_eq!(tensor_data_size(GgmlType::Q8_0, &[33]), None);
        assert_eq!(tensor_data_size(GgmlType::F32, &[u64::MAX, 2]), None);
        assert_eq!(tensor_data_size(GgmlType::F32, &[]), Some(4));
    }
}
