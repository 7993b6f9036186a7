//! embed / strip / extract on a synthetic llama model.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use gguf_tools::edit::{self, EditError};
use gguf_tools::filters::{Extra, FiltersError, QFilters};
use gguf_tools::gguf::{self, Value};
use gguf_tools::safe_io::FileError;
use gguf_tools::synth::{self, SynthOptions, WeightType};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// tiny: 2 layers, 2 KV heads, head dim 16.
const SHAPE: [usize; 3] = [2, 2, 16];

fn tiny_model(dir: &Path, weight_type: WeightType) -> PathBuf {
    let path = dir.join("tiny.gguf");
    let opts = SynthOptions {
        shape: synth::shape_by_name("tiny").unwrap(),
        weight_type,
        seed: 42,
    };
    synth::write(&opts, &path, false).unwrap();
    path
}

fn filters(shape: [usize; 3]) -> QFilters {
    let n = shape.iter().product::<usize>();
    // Awkward values (subnormals, -0.0, large) so bit-exactness is really tested.
    let data = (0..n)
        .map(|i| match i % 5 {
            0 => f32::from_bits(1 + i as u32),
            1 => -0.0,
            2 => 1.0e30 / (i as f32 + 1.0),
            _ => (i as f32 * 0.37).sin(),
        })
        .collect();
    let mut f = QFilters::new(shape[0], shape[1], shape[2], data).unwrap();
    f.metadata = BTreeMap::from([
        ("source".to_string(), "calibrated".to_string()),
        ("tokens".to_string(), "123456".to_string()),
        ("samples".to_string(), "64".to_string()),
    ]);
    // An extra tensor (as the expected-attention statistics are carried) must survive every
    // round trip with its shape.
    let extra = (0..6).map(|i| i as f32 * -0.25).collect();
    f.extra.insert(
        "ea_test".to_string(),
        Extra::new(vec![2, 3], extra).unwrap(),
    );
    f
}

fn save(dir: &Path, name: &str, f: &QFilters) -> PathBuf {
    let folder = dir.join(name);
    f.save(&folder).unwrap();
    folder
}

fn data_section(path: &Path) -> Vec<u8> {
    let file = gguf::read(path).unwrap();
    let bytes = fs::read(path).unwrap();
    bytes[file.data_offset as usize..].to_vec()
}

#[test]
fn embed_then_strip_gives_back_the_original_bytes() {
    for wt in [WeightType::F16, WeightType::Q8_0] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path(), wt);
        let f = filters(SHAPE);
        let folder = save(dir.path(), "filters", &f);
        let embedded = dir.path().join("embedded.gguf");
        edit::embed(&model, &folder, &embedded, false, false).unwrap();

        let orig = gguf::read(&model).unwrap();
        let emb = gguf::read(&embedded).unwrap();
        // Original keys unchanged and in order, new keys appended.
        assert_eq!(emb.metadata[..orig.metadata.len()], orig.metadata[..]);
        assert_eq!(emb.tensors, orig.tensors);
        assert_eq!(emb.data_offset % emb.alignment, 0);
        assert_eq!(data_section(&embedded), data_section(&model));
        assert_eq!(emb.get("qfilters.version"), Some(&Value::U32(1)));
        assert_eq!(emb.get("qfilters.layer_count"), Some(&Value::U32(2)));
        assert_eq!(emb.get("qfilters.head_count_kv"), Some(&Value::U32(2)));
        assert_eq!(emb.get("qfilters.head_dim"), Some(&Value::U32(16)));
        assert_eq!(emb.get_str("qfilters.source"), Some("calibrated"));
        assert_eq!(
            emb.get("qfilters.calibration.tokens"),
            Some(&Value::U32(123_456))
        );
        assert_eq!(
            emb.get("qfilters.calibration.samples"),
            Some(&Value::U32(64))
        );
        let temps = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(temps, 0, "no temporary file is left");

        let stripped = dir.path().join("stripped.gguf");
        edit::strip(&embedded, &stripped, false).unwrap();
        assert_eq!(fs::read(&stripped).unwrap(), fs::read(&model).unwrap());
    }
}

#[test]
fn extract_after_embed_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightType::F16);
    let f = filters(SHAPE);
    let folder = save(dir.path(), "filters", &f);
    let embedded = dir.path().join("embedded.gguf");
    edit::embed(&model, &folder, &embedded, false, false).unwrap();

    let out = dir.path().join("out").join("extracted.safetensors");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    edit::extract(&embedded, &out).unwrap();
    assert!(out.parent().unwrap().join("config.json").is_file());
    let back = QFilters::load(&out).unwrap();
    let bits = |q: &QFilters| q.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back), bits(&f));
    assert_eq!(back.shape(), f.shape());
    assert_eq!(
        back.extra, f.extra,
        "extra tensors through embed and extract"
    );
    assert_eq!(back.source, "calibrated");
    assert_eq!(
        back.metadata.get("tokens").map(String::as_str),
        Some("123456")
    );

    // And the extracted file embeds to the same header again.
    let again = dir.path().join("again.gguf");
    edit::embed(&model, &out, &again, false, false).unwrap();
    assert_eq!(fs::read(&again).unwrap(), fs::read(&embedded).unwrap());
}

#[test]
fn from_gguf_reads_embedded_filters_and_none_without() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightType::F16);
    assert!(QFilters::from_gguf(&model).unwrap().is_none());
    let f = filters(SHAPE);
    let folder = save(dir.path(), "filters", &f);
    let embedded = dir.path().join("e.gguf");
    edit::embed(&model, &folder, &embedded, false, false).unwrap();
    let back = QFilters::from_gguf(&embedded).unwrap().unwrap();
    assert_eq!(back.data, f.data);
    assert_eq!(back.extra, f.extra);
    assert!(!back.extra.is_empty());
    assert_eq!(back.filter(1, 1), &f.data[48..64]);
    assert_eq!(back.filter(2, 0), &[] as &[f32]);
}

#[test]
fn uncalibrated_source_is_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightType::F16);
    let mut f = filters(SHAPE);
    f.metadata.clear();
    f.source = "downloaded".into();
    let file = dir.path().join("published.safetensors");
    f.save(&file).unwrap();
    let embedded = dir.path().join("e.gguf");
    edit::embed(&model, &file, &embedded, false, false).unwrap();
    let emb = gguf::read(&embedded).unwrap();
    assert_eq!(
        emb.get_str("qfilters.source"),
        Some("published.safetensors")
    );
    assert!(emb.get("qfilters.calibration.tokens").is_none());
}

#[test]
fn embed_refuses_a_wrong_shape_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightType::F16);
    let folder = save(dir.path(), "filters", &filters([30, 3, 64]));
    let out = dir.path().join("o.gguf");
    let err = edit::embed(&model, &folder, &out, false, false).unwrap_err();
    assert!(matches!(
        err,
        EditError::Filters(FiltersError::ShapeMismatch { .. })
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("[30, 3, 64]") && msg.contains("[2, 2, 16]"),
        "{msg}"
    );
    assert!(!out.exists());
}

#[test]
fn embed_refuses_nan_filters() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightType::F16);
    let mut values = vec![0.5f32; SHAPE.iter().product()];
    values[17] = f32::NAN;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, SHAPE.to_vec(), &bytes).unwrap();
    let file = dir.path().join("nan.safetensors");
    safetensors::serialize_to_file(
        [("q_filters", view)],
        &None::<HashMap<String, String>>,
        &file,
    )
    .unwrap();
    let err = edit::embed(&model, &file, &dir.path().join("o.gguf"), false, false).unwrap_err();
    assert!(
        matches!(
            err,
            EditError::Filters(FiltersError::NonFinite {
                layer: 0,
                head: 1,
                dim: 1,
                ..
            })
        ),
        "{err}"
    );
}

#[test]
fn embed_refuses_to_overwrite_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightType::F16);
    let before = fs::read(&model).unwrap();
    let folder = save(dir.path(), "filters", &filters(SHAPE));
    let sneaky = dir.path().join(".").join("tiny.gguf");
    for out in [model.clone(), sneaky] {
        let err = edit::embed(&model, &folder, &out, true, false).unwrap_err();
        assert!(
            matches!(err, EditError::File(FileError::OutputIsInput { .. })),
            "{err}"
        );
    }
    #[cfg(unix)]
    {
        let link = dir.path().join("link.gguf");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        let err = edit::embed(&model, &folder, &link, true, false).unwrap_err();
        assert!(
            matches!(err, EditError::File(FileError::OutputIsInput { .. })),
            "{err}"
        );
        let hard = dir.path().join("hard.gguf");
        fs::hard_link(&model, &hard).unwrap();
        let err = edit::strip(&hard, &model, false).unwrap_err();
        assert!(
            matches!(err, EditError::File(FileError::OutputIsInput { .. })),
            "{err}"
        );
    }
    assert_eq!(fs::read(&model).unwrap(), before);
}

#[test]
fn existing_keys_need_force_which_replaces_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightType::F16);
    let first = save(dir.path(), "first", &filters(SHAPE));
    let embedded = dir.path().join("e.gguf");
    edit::embed(&model, &first, &embedded, false, false).unwrap();

    let mut other = filters(SHAPE);
    other.data.iter_mut().for_each(|v| *v = 0.25);
    let second = save(dir.path(), "second", &other);
    let out = dir.path().join("e2.gguf");
    let err = edit::embed(&embedded, &second, &out, false, false).unwrap_err();
    assert!(matches!(err, EditError::AlreadyHasFilters(_)), "{err}");
    assert!(err.to_string().contains("--force"));

    edit::embed(&embedded, &second, &out, true, false).unwrap();
    let file = gguf::read(&out).unwrap();
    let count = file
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("qfilters."))
        .count();
    // 8 keys of the filters and 2 of the extra tensor, none left over from the first.
    assert_eq!(count, 10);
    assert_eq!(QFilters::from_gguf(&out).unwrap().unwrap().data, other.data);
    let stripped = dir.path().join("s.gguf");
    edit::strip(&out, &stripped, false).unwrap();
    assert_eq!(fs::read(&stripped).unwrap(), fs::read(&model).unwrap());
}

#[test]
fn strip_and_extract_without_filters_fail() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightType::F16);
    let out = dir.path().join("o.gguf");
    assert!(matches!(
        edit::strip(&model, &out, false),
        Err(EditError::NoFilters(_))
    ));
    assert!(matches!(
        edit::extract(&model, &dir.path().join("f.safetensors")),
        Err(EditError::NoFilters(_))
    ));
}

#[test]
fn load_checks_config_json_against_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let folder = save(dir.path(), "f", &filters(SHAPE));
    let cfg = folder.join("config.json");
    fs::write(
        &cfg,
        r#"{"num_layers": 3, "num_kv_heads": 2, "kv_head_dim": 16}"#,
    )
    .unwrap();
    let err = QFilters::load(&folder).unwrap_err();
    assert!(matches!(err, FiltersError::ConfigMismatch { .. }), "{err}");
    // A model's own config.json beside the file is not ours and is ignored.
    fs::write(&cfg, r#"{"architectures": ["LlamaForCausalLM"]}"#).unwrap();
    QFilters::load(&folder).unwrap();
    // ... and save refuses to overwrite it.
    let err = filters(SHAPE).save(&folder).unwrap_err();
    assert!(matches!(err, FiltersError::ForeignConfig(_)), "{err}");
}

#[test]
fn new_and_check_shape_validate() {
    assert!(matches!(
        QFilters::new(2, 2, 2, vec![0.0; 7]),
        Err(FiltersError::LengthMismatch { .. })
    ));
    assert!(matches!(
        QFilters::new(0, 2, 2, vec![]),
        Err(FiltersError::BadShape { .. })
    ));
    assert!(matches!(
        QFilters::new(1, 1, 2, vec![0.0, f32::INFINITY]),
        Err(FiltersError::NonFinite { dim: 1, .. })
    ));
    let f = QFilters::new(30, 3, 64, vec![0.0; 30 * 3 * 64]).unwrap();
    let msg = f.check_shape(16, 8, 64).unwrap_err().to_string();
    assert!(msg.contains("filters have shape [30, 3, 64] (layers, kv heads, head dim) but the model needs [16, 8, 64]"), "{msg}");
    f.check_shape(30, 3, 64).unwrap();
}

#[test]
fn tuned_defaults_round_trip_through_safetensors_and_gguf_as_typed_keys() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightType::F16);
    let mut f = filters(SHAPE);
    for (k, v) in [
        ("defaults.recency", "32"),
        ("defaults.window", "16"),
        ("defaults.granularity", "position"),
        ("defaults.policy", "qfilters+keydiff"),
        ("defaults.evidence", "r0 w32 head: 20.1/22.3; chosen r32"),
    ] {
        f.metadata.insert(k.to_string(), v.to_string());
    }
    let folder = save(dir.path(), "filters", &f);
    assert_eq!(QFilters::load(&folder).unwrap().metadata, f.metadata);
    let embedded = dir.path().join("e.gguf");
    edit::embed(&model, &folder, &embedded, false, false).unwrap();
    let file = gguf::read(&embedded).unwrap();
    let key = |k: &str| file.metadata.iter().find(|(n, _)| n == k).map(|(_, v)| v);
    assert_eq!(key("qfilters.defaults.recency"), Some(&Value::F32(32.0)));
    assert_eq!(key("qfilters.defaults.window"), Some(&Value::U32(16)));
    assert_eq!(
        key("qfilters.defaults.granularity").and_then(Value::as_str),
        Some("position")
    );
    assert_eq!(
        key("qfilters.defaults.policy").and_then(Value::as_str),
        Some("qfilters+keydiff")
    );
    let back = QFilters::from_gguf(&embedded).unwrap().unwrap();
    for k in [
        "defaults.recency",
        "defaults.window",
        "defaults.granularity",
        "defaults.policy",
        "defaults.evidence",
    ] {
        assert_eq!(back.metadata.get(k), f.metadata.get(k), "{k}");
    }
    // Extracted again, the safetensors file carries them too; strip removes them with the rest.
    let out = dir.path().join("x").join("f.safetensors");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    edit::extract(&embedded, &out).unwrap();
    assert_eq!(
        QFilters::load(&out)
            .unwrap()
            .metadata
            .get("defaults.window"),
        Some(&"16".to_string())
    );
    let stripped = dir.path().join("s.gguf");
    edit::strip(&embedded, &stripped, false).unwrap();
    assert_eq!(fs::read(&stripped).unwrap(), fs::read(&model).unwrap());
    // A default that is not a number cannot be embedded as one.
    f.metadata
        .insert("defaults.window".to_string(), "wide".to_string());
    let bad = save(dir.path(), "bad", &f);
    let err = edit::embed(&model, &bad, &dir.path().join("b.gguf"), false, false).unwrap_err();
    assert!(
        err.to_string().contains("qfilters.defaults.window"),
        "{err}"
    );
}
