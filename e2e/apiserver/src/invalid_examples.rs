//! The corpus of hostile manifests in `examples/invalid/`, as every test that sends them reads it.
//!
//! Each file holds one object and a header of comment lines:
//! - `# expect: <text>` (the first line): text the refusal must contain, on the test API server, on
//!   kube-apiserver, through `kubectl apply` and in the offline schema check;
//! - `# category: <name>`: what it attacks, one of [`CATEGORIES`];
//! - `# generate: <size> <path>` (optional, repeatable): the string at `<path>` (such as
//!   `spec.members[0].pvcNames[0]`) is repeated until it is `<size>` bytes long (`2MiB`, `64KiB` or a
//!   number of bytes), so that a 2 MiB value needs no 2 MiB file in Git.
//!
//! Objects are sent as `kubectl apply` sends them ([`InvalidExample::as_kubectl_applies`]): with the
//! `kubectl.kubernetes.io/last-applied-configuration` annotation, which doubles a large value.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// What a manifest of the corpus attacks.
pub const CATEGORIES: [&str; 6] = [
    "schema-type",
    "cel-rule",
    "size-bound",
    "name-syntax",
    "intent-epoch",
    "hostile-string",
];

/// The annotation `kubectl apply` (client side) writes with the object it applied.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A corpus file that cannot be read as the header promises.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the first line must be `# expect: <text of the refusal>`")]
    NoExpectation { path: PathBuf },
    #[error("{path} is not one YAML object: {reason}")]
    NotOneObject { path: PathBuf, reason: String },
    #[error(
        "{path}: `# generate: {line}` is not `<size> <path>` of a string in the object: {reason}"
    )]
    BadGenerate {
        path: PathBuf,
        line: String,
        reason: String,
    },
    #[error("cannot write the generated manifest {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One manifest of the corpus, its header read and its generated values expanded.
#[derive(Debug, Clone)]
pub struct InvalidExample {
    /// Where the file is.
    pub path: PathBuf,
    /// The file's name, e.g. `no-members.yaml`.
    pub file_name: String,
    /// Text the refusal must contain.
    pub expect: String,
    /// Every `# category:` line (the corpus test requires exactly one of [`CATEGORIES`]).
    pub categories: Vec<String>,
    /// True when a `# generate:` line changed the object: the file alone is not what is sent.
    pub generated: bool,
    /// The object, with its generated values.
    pub object: Value,
}

impl InvalidExample {
    /// Reads one corpus file.
    pub fn read(path: &Path) -> Result<Self, CorpusError> {
        let text = std::fs::read_to_string(path).map_err(|source| CorpusError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let expect = text
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("# expect:"))
            .map(str::trim)
            .filter(|expect| !expect.is_empty())
            .ok_or_else(|| CorpusError::NoExpectation {
                path: path.to_path_buf(),
            })?
            .to_owned();
        let header = |key: &str| -> Vec<String> {
            text.lines()
                .filter_map(|line| line.strip_prefix(key))
                .map(|value| value.trim().to_owned())
                .collect()
        };
        let yaml: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text).map_err(|e| CorpusError::NotOneObject {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let mut object = serde_json::to_value(yaml).map_err(|e| CorpusError::NotOneObject {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if !object.is_object() {
            return Err(CorpusError::NotOneObject {
                path: path.to_path_buf(),
                reason: "not a mapping".into(),
            });
        }
        let generate = header("# generate:");
        for line in &generate {
            expand(&mut object, line).map_err(|reason| CorpusError::BadGenerate {
                path: path.to_path_buf(),
                line: line.clone(),
                reason,
            })?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file_name: path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
            expect,
            categories: header("# category:"),
            generated: !generate.is_empty(),
            object,
        })
    }

    /// Every `.yaml` file of `dir`, by name.
    pub fn read_all(dir: &Path) -> Result<Vec<Self>, CorpusError> {
        let entries = std::fs::read_dir(dir).map_err(|source| CorpusError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
            .collect();
        paths.sort();
        paths.iter().map(|path| Self::read(path)).collect()
    }

    /// The object as `kubectl apply` creates it: with the last-applied annotation holding the object.
    pub fn as_kubectl_applies(&self) -> Value {
        let mut object = self.object.clone();
        let applied = format!("{}\n", self.object);
        if let Some(metadata) = object
            .as_object_mut()
            .map(|o| {
                o.entry("metadata")
                    .or_insert_with(|| Value::Object(Default::default()))
            })
            .and_then(Value::as_object_mut)
        {
            let annotations = metadata
                .entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(annotations) = annotations.as_object_mut() {
                annotations.insert(LAST_APPLIED.to_owned(), Value::String(applied));
            }
        }
        object
    }

    /// The file to give `kubectl apply -f`: the corpus file itself, or for a generated one, the expanded
    /// object written as JSON into `scratch`.
    pub fn file_for_kubectl(&self, scratch: &Path) -> Result<PathBuf, CorpusError> {
        if !self.generated {
            return Ok(self.path.clone());
        }
        let path = scratch.join(format!("{}.json", self.file_name));
        std::fs::write(&path, self.object.to_string()).map_err(|source| CorpusError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// The resource (plural) of the object's kind, for the project's kinds.
    pub fn plural(&self) -> Option<&'static str> {
        match self.object["kind"].as_str()? {
            "ConsistencyGroup" => Some("consistencygroups"),
            "MemberCluster" => Some("memberclusters"),
            "ReplicationNode" => Some("replicationnodes"),
            _ => None,
        }
    }
}

/// Applies one `# generate: <size> <path>` line to `object`.
fn expand(object: &mut Value, line: &str) -> Result<(), String> {
    let (size, path) = line
        .split_once(' ')
        .ok_or_else(|| "expected a size and a path".to_owned())?;
    let size = parse_size(size)?;
    let mut target = object;
    for segment in path.trim().split('.') {
        let (key, indices) = match segment.find('[') {
            Some(at) => (&segment[..at], &segment[at..]),
            None => (segment, ""),
        };
        target = target
            .get_mut(key)
            .ok_or_else(|| format!("no field {key:?}"))?;
        for index in indices.split(']').filter(|part| !part.is_empty()) {
            let index: usize = index
                .trim_start_matches('[')
                .parse()
                .map_err(|_| format!("{index}] is not an index"))?;
            target = target
                .get_mut(index)
                .ok_or_else(|| format!("no item {index} in {key:?}"))?;
        }
    }
    let unit = target
        .as_str()
        .filter(|unit| !unit.is_empty() && unit.is_ascii())
        .ok_or_else(|| "the value to repeat must be a non-empty ASCII string".to_owned())?;
    let repeated: String = unit.chars().cycle().take(size).collect();
    *target = Value::String(repeated);
    Ok(())
}

/// `2MiB`, `64KiB` or a number of bytes.
fn parse_size(text: &str) -> Result<usize, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let unit = match unit {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        _ => return Err(format!("{text:?}: the unit is KiB, MiB or none")),
    };
    Ok(number * unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_generated_value_is_repeated_to_its_size() {
        let mut object = json!({"spec": {"members": [{"pvcNames": ["ab"]}]}});
        expand(&mut object, "5 spec.members[0].pvcNames[0]").unwrap();
        assert_eq!(object["spec"]["members"][0]["pvcNames"][0], "ababa");
        let mut object = json!({"spec": {"network": "x"}});
        expand(&mut object, "2MiB spec.network").unwrap();
        assert_eq!(object["spec"]["network"].as_str().unwrap().len(), 2 << 20);
    }

    #[test]
    fn a_generate_line_that_names_no_string_is_refused() {
        let mut object = json!({"spec": {"members": []}});
        assert!(expand(&mut object, "2MiB spec.members[0]").is_err());
        assert!(expand(&mut object, "2MiB spec.nothing").is_err());
        assert!(expand(&mut object, "2GiB spec.members").is_err());
        assert!(expand(&mut object, "spec.members").is_err());
    }
}
