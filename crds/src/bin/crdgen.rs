//! `crdgen`: writes the generated CRD YAML into `crds/` (or the directory given), one file per CRD.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for crd in lockstep_api::crds::all() {
        let path = dir.join(lockstep_api::crds::file_name(&crd));
        std::fs::write(&path, lockstep_api::crds::to_yaml(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
