//! Patches: JSON patch (RFC 6902), JSON merge patch (RFC 7386), and strategic merge patch treated as a
//! merge patch after its `$`-directives (`$patch`, `$setElementOrder/…`, `$retainKeys`,
//! `$deleteFromPrimitiveList/…`) are dropped. Lists are therefore replaced whole, never merged by key.
//! Server-side apply lives in [`crate::managed`].

use serde_json::Value;

use crate::error::ApiError;

/// The kinds of patch a `PATCH` may carry, by its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json`
    Json,
    /// `application/merge-patch+json`
    Merge,
    /// `application/strategic-merge-patch+json`
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply)
    Apply,
}

impl PatchType {
    /// Reads the patch type from a `Content-Type` header.
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        match media {
            "application/json-patch+json" => Ok(Self::Json),
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(Self::Apply),
            other => Err(ApiError::unsupported_media_type(other)),
        }
    }
}

/// Applies a JSON, merge or strategic patch to `target` in place.
pub fn apply(kind: PatchType, target: &mut Value, body: &[u8]) -> Result<(), ApiError> {
    match kind {
        PatchType::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(target, &patch).map_err(|e| ApiError::unprocessable(e.to_string()))
        }
        PatchType::Merge | PatchType::Strategic => {
            let mut patch: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON merge patch: {e}")))?;
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            if kind == PatchType::Strategic {
                strip_directives(&mut patch);
            }
            json_patch::merge(target, &patch);
            Ok(())
        }
        PatchType::Apply => Err(ApiError::internal("server-side apply is not a plain patch")),
    }
}

/// Removes strategic-merge-patch directives (keys beginning with `$`) everywhere in a patch.
fn strip_directives(patch: &mut Value) {
    match patch {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_json_and_strategic_patches() -> Result<(), ApiError> {
        let mut v = json!({"data": {"a": "1", "b": "2"}, "list": [1, 2]});
        apply(
            PatchType::Merge,
            &mut v,
            br#"{"data": {"a": null, "c": "3"}, "list": [3]}"#,
        )?;
        assert_eq!(v, json!({"data": {"b": "2", "c": "3"}, "list": [3]}));
        apply(
            PatchType::Json,
            &mut v,
            br#"[{"op": "replace", "path": "/data/b", "value": "x"}]"#,
        )?;
        assert_eq!(v["data"]["b"], "x");
        apply(
            PatchType::Strategic,
            &mut v,
            br#"{"$setElementOrder/list": [1], "data": {"$retainKeys": ["b"], "d": "4"}}"#,
        )?;
        assert_eq!(v["data"]["d"], "4");
        assert!(v.get("$setElementOrder/list").is_none());
        let failed = apply(
            PatchType::Json,
            &mut v,
            br#"[{"op": "test", "path": "/data/b", "value": "no"}]"#,
        );
        assert_eq!(failed.map_err(|e| e.code), Err(422));
        Ok(())
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml; charset=utf-8").ok(),
            Some(PatchType::Apply)
        );
        assert_eq!(
            PatchType::from_content_type("text/plain").map_err(|e| e.code),
            Err(415)
        );
    }
}
