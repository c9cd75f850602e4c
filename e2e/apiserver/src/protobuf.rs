//! Just enough of Kubernetes' protobuf encoding to read what kubectl 1.33's typed generators send
//! (`kubectl create namespace|configmap|secret …` post `application/vnd.kubernetes.protobuf`): the
//! `k8s\0` + `runtime.Unknown` envelope, and `Namespace`, `ConfigMap` and `Secret` with the usual
//! `ObjectMeta` fields (name, generateName, namespace, labels, annotations, finalizers). Any other kind
//! gets `415`. Answers are always JSON, which those clients accept.

use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Skip,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos)?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// The next field, or `None` at the end (or on malformed input).
    fn field(&mut self) -> Option<(u64, Wire<'a>)> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.pos += 8;
                Wire::Skip
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                let end = self.pos.checked_add(len)?;
                let bytes = self.buf.get(self.pos..end)?;
                self.pos = end;
                Wire::Bytes(bytes)
            }
            5 => {
                self.pos += 4;
                Wire::Skip
            }
            _ => return None,
        };
        Some((key >> 3, wire))
    }
}

fn string(bytes: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(TABLE[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `map<string, string>` (or `bytes` values, base64-encoded as in JSON) entry.
fn map_entry(bytes: &[u8], binary: bool, into: &mut Map<String, Value>) {
    let mut r = Reader::new(bytes);
    let (mut key, mut value) = (String::new(), Value::String(String::new()));
    while let Some((field, wire)) = r.field() {
        match (field, wire) {
            (1, Wire::Bytes(b)) => key = String::from_utf8_lossy(b).into_owned(),
            (2, Wire::Bytes(b)) if binary => value = Value::String(base64(b)),
            (2, Wire::Bytes(b)) => value = string(b),
            _ => {}
        }
    }
    into.insert(key, value);
}

fn object_meta(bytes: &[u8]) -> Value {
    let mut meta = Map::new();
    let (mut labels, mut annotations, mut finalizers) = (Map::new(), Map::new(), Vec::new());
    let mut r = Reader::new(bytes);
    while let Some((field, wire)) = r.field() {
        match (field, wire) {
            // Go's protobuf writes empty strings too; JSON clients leave them out.
            (1 | 2 | 3 | 6, Wire::Bytes([])) => {}
            (1, Wire::Bytes(b)) => drop(meta.insert("name".into(), string(b))),
            (2, Wire::Bytes(b)) => drop(meta.insert("generateName".into(), string(b))),
            (3, Wire::Bytes(b)) => drop(meta.insert("namespace".into(), string(b))),
            (6, Wire::Bytes(b)) => drop(meta.insert("resourceVersion".into(), string(b))),
            (11, Wire::Bytes(b)) => map_entry(b, false, &mut labels),
            (12, Wire::Bytes(b)) => map_entry(b, false, &mut annotations),
            (14, Wire::Bytes(b)) => finalizers.push(string(b)),
            _ => {}
        }
    }
    if !labels.is_empty() {
        meta.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        meta.insert("annotations".into(), Value::Object(annotations));
    }
    if !finalizers.is_empty() {
        meta.insert("finalizers".into(), Value::Array(finalizers));
    }
    Value::Object(meta)
}

fn decode_kind(kind: &str, raw: &[u8]) -> Option<Value> {
    let mut object = Map::new();
    let (mut data, mut binary, mut string_data) = (Map::new(), Map::new(), Map::new());
    let mut r = Reader::new(raw);
    while let Some((field, wire)) = r.field() {
        match (kind, field, wire) {
            (_, 1, Wire::Bytes(b)) => drop(object.insert("metadata".into(), object_meta(b))),
            ("Namespace", 2, Wire::Bytes(b)) => {
                let mut spec = Reader::new(b);
                let mut finalizers = Vec::new();
                while let Some((f, w)) = spec.field() {
                    if let (1, Wire::Bytes(s)) = (f, w) {
                        finalizers.push(string(s));
                    }
                }
                if !finalizers.is_empty() {
                    object.insert("spec".into(), json!({"finalizers": finalizers}));
                }
            }
            ("ConfigMap", 2, Wire::Bytes(b)) => map_entry(b, false, &mut data),
            ("ConfigMap", 3, Wire::Bytes(b)) => map_entry(b, true, &mut binary),
            ("ConfigMap", 4, Wire::Varint(v)) | ("Secret", 5, Wire::Varint(v)) => {
                drop(object.insert("immutable".into(), Value::Bool(v != 0)));
            }
            ("Secret", 2, Wire::Bytes(b)) => map_entry(b, true, &mut data),
            ("Secret", 3, Wire::Bytes(b)) if !b.is_empty() => {
                drop(object.insert("type".into(), string(b)))
            }
            ("Secret", 4, Wire::Bytes(b)) => map_entry(b, false, &mut string_data),
            ("Namespace" | "ConfigMap" | "Secret", _, _) => {}
            _ => return None,
        }
    }
    for (key, map) in [
        ("data", data),
        ("binaryData", binary),
        ("stringData", string_data),
    ] {
        if !map.is_empty() {
            object.insert(key.into(), Value::Object(map));
        }
    }
    Some(Value::Object(object))
}

/// Decodes a protobuf request body into JSON; `None` for anything this module does not read.
pub fn decode(body: &[u8]) -> Option<Value> {
    let envelope = body.strip_prefix(MAGIC)?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), None);
    let mut r = Reader::new(envelope);
    while let Some((field, wire)) = r.field() {
        match (field, wire) {
            (1, Wire::Bytes(type_meta)) => {
                let mut t = Reader::new(type_meta);
                while let Some((f, w)) = t.field() {
                    match (f, w) {
                        (1, Wire::Bytes(b)) => {
                            api_version = String::from_utf8_lossy(b).into_owned()
                        }
                        (2, Wire::Bytes(b)) => kind = String::from_utf8_lossy(b).into_owned(),
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = Some(b),
            _ => {}
        }
    }
    let mut object = decode_kind(&kind, raw?)?;
    if let Some(obj) = object.as_object_mut() {
        obj.insert("apiVersion".into(), Value::String(api_version));
        obj.insert("kind".into(), Value::String(kind));
    }
    Some(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![(n << 3) | 2, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn decodes_a_config_map() {
        let meta = [
            field(1, b"cm"),
            field(11, &[field(1, b"app"), field(2, b"web")].concat()),
        ]
        .concat();
        let raw = [
            field(1, &meta),
            field(2, &[field(1, b"k"), field(2, b"v")].concat()),
        ]
        .concat();
        let type_meta = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &raw)].concat();
        assert_eq!(
            decode(&body),
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "cm", "labels": {"app": "web"}}, "data": {"k": "v"}}))
        );
        assert_eq!(base64(b"hello"), "aGVsbG8=");
    }
}
