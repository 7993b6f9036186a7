//! `gguf-tools synth` models of every weight type load and run in llama.cpp (CPU), and the
//! binary says which llama.cpp patches it carries.

use crate::common::*;
use gguf_tools::synth::{self, Shape, SynthOptions, WeightType};

#[test]
fn every_synth_weight_type_loads_and_decodes_with_eviction() {
    let dir = tempfile::tempdir().unwrap();
    // Tiny, but 256 wide: Q4_K blocks hold 256 values.
    let shape = Shape {
        name: "tiny256",
        layers: 2,
        embd: 256,
        heads: 4,
        kv_heads: 2,
        ff: 512,
        vocab: 256,
    };
    for (name, ty) in [
        ("f16", WeightType::F16),
        ("q8_0", WeightType::Q8_0),
        ("q4_0", WeightType::Q4_0),
        ("q4_k", WeightType::Q4K),
    ] {
        let path = dir.path().join(format!("{name}.gguf"));
        let opts = SynthOptions {
            shape,
            weight_type: ty,
            seed: 3,
        };
        synth::write_with_threads(&opts, &path, false, 2).unwrap();
        let json = dir.path().join(format!("{name}.json"));
        run_ok(qfilters().args([
            "bench",
            "-m",
            path.to_str().unwrap(),
            "--policy",
            "knorm",
            "--prompt",
            "96",
            "--gen",
            "8",
            "--budget",
            "48",
            "--window",
            "16",
            "--batch",
            "32",
            "--reps",
            "1",
            "-t",
            "1",
            "--json",
            json.to_str().unwrap(),
        ]));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let run = &v["runs"][0];
        assert!(
            run["decode_tok_s"].as_f64().unwrap() > 0.0,
            "{name}: no decode"
        );
        assert!(
            run["evicted"].as_u64().unwrap() > 0,
            "{name}: nothing evicted"
        );
        assert!(
            run["live_cells"].as_u64().unwrap() <= 48,
            "{name}: over budget"
        );
    }
}

#[test]
fn version_names_the_llama_cpp_patch_set() {
    let out = run_ok(qfilters().arg("--version"));
    let text = String::from_utf8_lossy(&out.stdout);
    let expected = if qfilters::LLAMA_SOURCE == "pinned" {
        // The pinned source carries exactly the patches in the tree, by content, sorted by name.
        use sha2::Digest;
        let mut patches: Vec<_> = std::fs::read_dir(root().join("vendor/patches"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "patch"))
            .collect();
        patches.sort();
        assert!(!patches.is_empty(), "vendor/patches holds no patch");
        let ids: Vec<String> = patches
            .iter()
            .map(|p| {
                let hex: String = sha2::Sha256::digest(std::fs::read(p).unwrap())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let name = p.file_stem().unwrap().to_string_lossy();
                format!("{name}@{}", &hex[..8])
            })
            .collect();
        ids.join("+")
    } else {
        // A user's checkout is never patched.
        "none".to_string()
    };
    assert!(
        // The CPU backend follows after "; " (`cpu: dispatch, variant zen4`).
        text.contains(&format!("(llama.cpp patches: {expected};")),
        "{text}"
    );
}
