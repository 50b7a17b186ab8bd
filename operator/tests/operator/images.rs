//! The images the manifests and the operator name are the ones the Dockerfile builds: every `ghcr.io/blockmesh/NAME:TAG`
//! in operator/deploy and csi/deploy, and the operator's default server image, names a stage of the repository's
//! Dockerfile and the workspace version, as `scripts/build-images.sh` tags them.
use std::collections::BTreeSet;
use std::path::Path;

const REGISTRY: &str = "ghcr.io/blockmesh/";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the operator crate sits in the repository")
}

/// The stages (`FROM ... AS name`) of the Dockerfile.
fn stages() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("the Dockerfile");
    text.lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| w.eq_ignore_ascii_case("AS"))?;
            words.get(at + 1).map(|s| s.to_string())
        })
        .collect()
}

/// Every `ghcr.io/blockmesh/...` image named in the YAML files of `dir`, with the file naming it.
fn images_in(dir: &Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for word in text.split_whitespace() {
            let word = word.trim_matches(|c| c == '"' || c == '\'');
            if word.starts_with(REGISTRY) {
                found.push((word.to_string(), path.display().to_string()));
            }
        }
    }
    found
}

#[test]
fn every_image_named_is_a_dockerfile_stage_at_the_workspace_version() {
    let stages = stages();
    for want in ["blockmesh", "blockmesh-operator", "blockmesh-csi"] {
        assert!(stages.contains(want), "the Dockerfile has no stage {want}: {stages:?}");
    }
    let version = env!("CARGO_PKG_VERSION");
    let mut images = images_in(&repo().join("operator/deploy"));
    images.extend(images_in(&repo().join("csi/deploy")));
    images.push((blockmesh_operator::resources::DEFAULT_SERVER_IMAGE.to_string(), "DEFAULT_SERVER_IMAGE".into()));
    let named: BTreeSet<&str> =
        images.iter().filter_map(|(i, _)| i.strip_prefix(REGISTRY)?.split(':').next()).collect();
    for want in ["blockmesh", "blockmesh-operator", "blockmesh-csi"] {
        assert!(named.contains(want), "no manifest names the image {want}: {images:?}");
    }
    for (image, place) in &images {
        let (name, tag) =
            image[REGISTRY.len()..].split_once(':').unwrap_or_else(|| panic!("{place}: {image} has no tag"));
        assert!(stages.contains(name), "{place}: {image} is no stage of the Dockerfile ({stages:?})");
        assert_eq!(tag, version, "{place}: {image} is not tagged with the workspace version");
    }
}
