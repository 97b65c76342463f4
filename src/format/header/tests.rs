use super::*;
use proptest::prelude::*;

/// The safetensors crate's name for `d`.
pub(crate) fn st_dtype(d: Dtype) -> safetensors::Dtype {
    serde_json::from_value(Value::String(d.name().into())).unwrap()
}

/// A file built by hand: length, JSON, then `data_len` bytes 0, 1, 2, ...
pub(crate) fn file(json: &str, data_len: usize) -> Vec<u8> {
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json.as_bytes());
    bytes.extend((0..data_len).map(|i| i as u8));
    bytes
}

fn parse(json: &str, data_len: usize) -> Result<Header, HeaderError> {
    let bytes = file(json, data_len);
    parse_header(&bytes, bytes.len() as u64)
}

macro_rules! assert_err {
    ($result:expr, $pattern:pat) => {
        match $result {
            Err(e @ $pattern) => e,
            other => panic!("expected {}, got {other:?}", stringify!($pattern)),
        }
    };
}

pub(crate) const TWO: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}"#;

#[test]
fn a_hand_built_header_gives_absolute_offsets_in_data_order() {
    // Listed out of order in the JSON; read back by offset.
    let json = r#"{"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let h = parse(json, 11).unwrap();
    let start = 8 + json.len();
    assert_eq!(h.data_start, start);
    assert_eq!(h.json_len, json.len() as u64);
    let names: Vec<_> = h
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.start, t.end))
        .collect();
    assert_eq!(
        names,
        [("a", start, start + 8), ("b", start + 8, start + 11)]
    );
    assert_eq!(h.tensors[0].shape, [2]);
    assert_eq!(h.tensors[1].dtype, Dtype::U8);
    assert_eq!(h.metadata["format"], "pt");
}

#[test]
fn zero_element_tensors_and_trailing_space_padding_are_legal() {
    let json = r#"{"e":{"dtype":"F32","shape":[0,4],"data_offsets":[4,4]},"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"z":{"dtype":"BF16","shape":[0],"data_offsets":[4,4]}}       "#;
    let h = parse(json, 4).unwrap();
    let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["w", "e", "z"]);
    assert_eq!(h.tensors[1].start, h.tensors[1].end);
    assert!(parse("{}  ", 0).unwrap().tensors.is_empty());
}

#[test]
fn null_metadata_counts_as_empty() {
    assert!(parse(r#"{"__metadata__":null}"#, 0)
        .unwrap()
        .metadata
        .is_empty());
}

#[test]
fn a_file_shorter_than_the_length_field_is_rejected() {
    assert_eq!(
        parse_header(&[1, 0, 0], 3),
        Err(HeaderError::TooShort { file_len: 3 })
    );
    assert_eq!(
        parse_header(&[], 0),
        Err(HeaderError::TooShort { file_len: 0 })
    );
}

#[test]
fn an_absurd_header_length_is_rejected_before_anything_is_read() {
    let mut bytes = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
    bytes.extend(b"{}");
    assert_err!(
        parse_header(&bytes, u64::MAX),
        HeaderError::HeaderTooLarge { len: 100_000_001 }
    );
    let bytes = u64::MAX.to_le_bytes();
    assert_err!(parse_header(&bytes, 8), HeaderError::HeaderTooLarge { .. });
}

#[test]
fn a_header_length_past_the_end_of_the_file_is_rejected() {
    let mut bytes = 100u64.to_le_bytes().to_vec();
    bytes.extend(b"{}");
    let e = assert_err!(
        parse_header(&bytes, 10),
        HeaderError::HeaderPastEnd {
            len: 100,
            available: 2
        }
    );
    assert!(e.to_string().contains("100"), "{e}");
    // A prefix that stops inside the header is reported the same way.
    assert_err!(
        parse_header(&bytes, 1000),
        HeaderError::HeaderPastEnd { available: 2, .. }
    );
}

#[test]
fn a_header_that_is_not_utf8_is_rejected_with_its_offset() {
    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend([b'{', 0xFF, b'}', b' ']);
    let len = bytes.len() as u64;
    assert_eq!(
        parse_header(&bytes, len),
        Err(HeaderError::NotUtf8 { offset: 9 })
    );
}

#[test]
fn a_header_that_is_not_json_is_rejected() {
    assert_err!(parse(r#"{"a":{"dtype":"F32""#, 0), HeaderError::Json { .. });
    assert_err!(parse("", 0), HeaderError::Json { .. });
    assert_err!(parse("{} x", 0), HeaderError::Json { .. });
}

#[test]
fn a_header_that_is_not_an_object_is_rejected() {
    assert_err!(parse("[1, 2]", 0), HeaderError::NotObject);
    assert_err!(parse("\"weights\"", 0), HeaderError::NotObject);
    assert_err!(parse("null", 0), HeaderError::NotObject);
}

#[test]
fn a_tensor_name_given_twice_is_rejected_not_collapsed() {
    let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    let e = assert_err!(parse(json, 2), HeaderError::DuplicateTensor { .. });
    assert!(e.to_string().contains("`a`"), "{e}");
    assert_err!(
        parse(r#"{"__metadata__":{},"__metadata__":{}}"#, 0),
        HeaderError::DuplicateTensor { .. }
    );
}

#[test]
fn an_unknown_dtype_is_rejected_with_the_tensor_name() {
    let e = assert_err!(
        parse(
            r#"{"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#,
            1
        ),
        HeaderError::UnknownDtype { .. }
    );
    assert_eq!(e.to_string(), "tensor `w` has unknown dtype `F4`");
}

#[test]
fn each_missing_field_is_named() {
    for (json, field) in [
        (r#"{"w":{"shape":[1],"data_offsets":[0,1]}}"#, "dtype"),
        (r#"{"w":{"dtype":"U8","data_offsets":[0,1]}}"#, "shape"),
        (r#"{"w":{"dtype":"U8","shape":[1]}}"#, "data_offsets"),
    ] {
        let e = assert_err!(parse(json, 1), HeaderError::MissingField { .. });
        assert_eq!(
            e,
            HeaderError::MissingField {
                tensor: "w".into(),
                field
            }
        );
    }
}

#[test]
fn fields_of_the_wrong_type_are_rejected() {
    for (json, field) in [
        (
            r#"{"w":{"dtype":8,"shape":[1],"data_offsets":[0,1]}}"#,
            "dtype",
        ),
        (
            r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
            "shape",
        ),
        (
            r#"{"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}"#,
            "shape",
        ),
        (
            r#"{"w":{"dtype":"U8","shape":1,"data_offsets":[0,1]}}"#,
            "shape",
        ),
        (
            r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
            "data_offsets",
        ),
        (
            r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,"1"]}}"#,
            "data_offsets",
        ),
    ] {
        match parse(json, 1) {
            Err(HeaderError::BadField { field: f, .. }) => assert_eq!(f, field, "{json}"),
            other => panic!("{json}: {other:?}"),
        }
    }
}

#[test]
fn a_field_given_twice_in_one_tensor_is_rejected() {
    let json = r#"{"w":{"dtype":"U8","shape":[1],"shape":[2],"data_offsets":[0,1]}}"#;
    let e = assert_err!(parse(json, 1), HeaderError::DuplicateField { .. });
    assert_eq!(
        e.to_string(),
        "tensor `w`: field `shape` appears more than once"
    );
}

#[test]
fn a_tensor_entry_that_is_not_an_object_is_rejected() {
    assert_err!(
        parse(r#"{"w":[1,2]}"#, 0),
        HeaderError::TensorNotObject {
            found: "an array",
            ..
        }
    );
    assert_err!(
        parse(r#"{"w":null}"#, 0),
        HeaderError::TensorNotObject { found: "null", .. }
    );
}

#[test]
fn a_shape_whose_size_overflows_is_rejected() {
    let huge = usize::MAX / 2 + 1;
    let json = format!(r#"{{"w":{{"dtype":"U8","shape":[{huge},2],"data_offsets":[0,0]}}}}"#);
    assert_err!(parse(&json, 0), HeaderError::ShapeOverflow { .. });
    // Elements fit, bits do not.
    let json = format!(
        r#"{{"w":{{"dtype":"F64","shape":[{}],"data_offsets":[0,0]}}}}"#,
        usize::MAX / 8
    );
    assert_err!(parse(&json, 0), HeaderError::ShapeOverflow { .. });
    // A zero anywhere makes the product zero, however large the rest.
    let json =
        format!(r#"{{"w":{{"dtype":"U8","shape":[{huge},0,{huge}],"data_offsets":[0,0]}}}}"#);
    assert!(parse(&json, 0).is_ok());
}

#[test]
fn a_byte_range_that_does_not_match_the_shape_is_rejected() {
    let e = assert_err!(
        parse(
            r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#,
            12
        ),
        HeaderError::SizeMismatch {
            expected: 16,
            actual: 12,
            ..
        }
    );
    assert!(e.to_string().contains("tensor `w`"), "{e}");
}

#[test]
fn offsets_that_end_before_they_start_are_rejected() {
    assert_err!(
        parse(
            r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}}"#,
            4
        ),
        HeaderError::EndBeforeStart {
            start: 4,
            end: 2,
            ..
        }
    );
}

#[test]
fn offsets_past_the_data_section_are_rejected() {
    let e = assert_err!(
        parse(
            r#"{"w":{"dtype":"U8","shape":[9],"data_offsets":[0,9]}}"#,
            8
        ),
        HeaderError::OutOfRange {
            end: 9,
            data_len: 8,
            ..
        }
    );
    assert!(e.to_string().contains("tensor `w`"), "{e}");
    let json = format!(
        r#"{{"w":{{"dtype":"U8","shape":[1],"data_offsets":[{0},{0}]}}}}"#,
        u64::MAX
    );
    assert_err!(parse(&json, 0), HeaderError::OutOfRange { .. });
}

#[test]
fn overlapping_tensors_are_rejected() {
    let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
    let e = assert_err!(parse(json, 6), HeaderError::Overlap { start: 2, .. });
    assert_eq!(
        e.to_string(),
        "tensor `b` at data offset 2 overlaps tensor `a`"
    );
    // A zero-length tensor inside another overlaps it too.
    let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"e":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}"#;
    assert_err!(parse(json, 4), HeaderError::Overlap { .. });
    // Two tensors on the same bytes.
    let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}"#;
    assert_err!(parse(json, 4), HeaderError::Overlap { .. });
}

#[test]
fn gaps_between_tensors_are_rejected() {
    let json = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#;
    let e = assert_err!(parse(json, 5), HeaderError::Gap { from: 2, to: 3, .. });
    assert!(e.to_string().contains("tensor `b`"), "{e}");
    // Data that does not start at offset 0 leaves a gap too.
    let json = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
    assert_err!(parse(json, 3), HeaderError::Gap { from: 0, to: 1, .. });
}

#[test]
fn bytes_after_the_last_tensor_are_rejected() {
    assert_err!(
        parse(TWO, 12),
        HeaderError::TrailingBytes { from: 11, to: 12 }
    );
    assert_err!(
        parse("{}", 1),
        HeaderError::TrailingBytes { from: 0, to: 1 }
    );
    assert!(parse(TWO, 11).is_ok());
}

#[test]
fn metadata_must_be_a_map_of_strings_without_repeated_keys() {
    assert_err!(
        parse(r#"{"__metadata__":["x"]}"#, 0),
        HeaderError::MetadataNotMap { found: "an array" }
    );
    assert_err!(
        parse(r#"{"__metadata__":"x"}"#, 0),
        HeaderError::MetadataNotMap { found: "a string" }
    );
    let e = assert_err!(
        parse(r#"{"__metadata__":{"n":1}}"#, 0),
        HeaderError::MetadataValue { .. }
    );
    assert!(e.to_string().contains("`n`"), "{e}");
    assert_err!(
        parse(r#"{"__metadata__":{"k":"1","k":"2"}}"#, 0),
        HeaderError::DuplicateMetadataKey { .. }
    );
}

// ---- properties ----

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    proptest::sample::select(Dtype::ALL.to_vec())
}

/// A valid file written by the safetensors crate: up to four tensors of
/// random dtype and small shape, with random data and metadata.
fn valid_file() -> impl Strategy<Value = Vec<u8>> {
    let tensor = (dtype_strategy(), proptest::collection::vec(0usize..4, 0..3));
    (
        proptest::collection::btree_map("[a-z.]{1,6}", tensor, 0..4),
        proptest::collection::hash_map("[a-z]{1,4}", "[ -~]{0,6}", 0..3),
        any::<u64>(),
    )
        .prop_map(|(tensors, metadata, seed)| {
            let data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
                .into_iter()
                .map(|(name, (d, shape))| {
                    let len = shape.iter().product::<usize>() * d.bitsize() / 8;
                    let bytes = (0..len as u64)
                        .map(|i| (seed.rotate_left(i as u32) ^ i) as u8)
                        .collect();
                    (name, d, shape, bytes)
                })
                .collect();
            let views: Vec<_> = data
                .iter()
                .map(|(n, d, s, b)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(st_dtype(*d), s.clone(), b).unwrap(),
                    )
                })
                .collect();
            let metadata = (!metadata.is_empty()).then_some(metadata);
            safetensors::serialize(views, metadata).unwrap()
        })
}

/// Asserts that a header we accept is one the reference reader accepts,
/// with the same tensors.
fn agrees_with_reference(bytes: &[u8], header: &Header) -> Result<(), TestCaseError> {
    let reference = safetensors::SafeTensors::deserialize(bytes);
    prop_assert!(
        reference.is_ok(),
        "accepted here, rejected by safetensors: {:?}",
        reference.err()
    );
    let reference = reference.unwrap();
    let mut theirs: Vec<_> = reference
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = serde_json::to_value(view.dtype()).unwrap();
            (
                name,
                dtype.as_str().map(str::to_string),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    theirs.sort();
    let mut ours: Vec<_> = header
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                Some(t.dtype.name().to_string()),
                t.shape.clone(),
                bytes[t.start..t.end].to_vec(),
            )
        })
        .collect();
    ours.sort();
    prop_assert_eq!(ours, theirs);
    let (_, reference_header) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let their_meta: BTreeMap<String, String> = reference_header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    prop_assert_eq!(&header.metadata, &their_meta);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), extra in 0u64..1000) {
        let _ = parse_header(&bytes, bytes.len() as u64);
        let _ = parse_header(&bytes, bytes.len() as u64 + extra);
    }

    #[test]
    fn random_json_after_a_fitting_length_never_panics(
        body in proptest::collection::vec(proptest::sample::select(b"{}[],:\"0123456789 -e.\\aFU8_".to_vec()), 0..80),
        data in 0usize..32,
    ) {
        let body = String::from_utf8(body).unwrap();
        let _ = parse(&body, data);
    }

    #[test]
    fn files_written_by_safetensors_are_accepted_and_read_alike(bytes in valid_file()) {
        let header = parse_header(&bytes, bytes.len() as u64);
        prop_assert!(header.is_ok(), "{:?}", header);
        agrees_with_reference(&bytes, &header.unwrap())?;
    }

    #[test]
    fn mutated_headers_never_panic_and_are_accepted_only_when_valid(
        bytes in valid_file(),
        edits in proptest::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![
                any::<u8>(),
                proptest::sample::select(b"{}[],:\"0123456789 -e.".to_vec()),
            ]),
            1..4,
        ),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = bytes;
        // Aim most edits at the length field and the JSON.
        let json_len = bytes.get(..8).map_or(0, |b| {
            let mut len = [0; 8];
            len.copy_from_slice(b);
            u64::from_le_bytes(len).min(4096) as usize
        });
        let header_end = bytes.len().min(8 + json_len + 16);
        for (at, byte) in edits {
            let i = at.index(header_end.max(1));
            if let Some(b) = bytes.get_mut(i) {
                *b = byte;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        if let Ok(header) = parse_header(&bytes, bytes.len() as u64) {
            agrees_with_reference(&bytes, &header)?;
        }
    }
}
