//! `crdgen`: writes the generated CRD YAML, one file per CRD, into `crds/` and the Helm chart's
//! `deploy/helm/lockstep/crds/` (or only into the directory given).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dirs = match std::env::args_os().nth(1) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => {
            let crate_dir = manifest_dir();
            vec![
                crate_dir.to_path_buf(),
                crate_dir
                    .join("..")
                    .join(lockstep_api::crds::HELM_CHART_CRDS),
            ]
        }
    };
    for dir in dirs {
        for crd in lockstep_api::crds::all() {
            let path = dir.join(lockstep_api::crds::file_name(&crd));
            std::fs::write(&path, lockstep_api::crds::to_yaml(&crd)?)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// The crate's directory: where cargo says it is when it runs this (a binary reused from a build in
/// another checkout of the same tree would otherwise read that checkout's files), else where it was built.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
