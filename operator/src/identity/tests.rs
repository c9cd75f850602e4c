//! Tests of token verification: JWKS parsing, signatures, claims and every refusal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const NOW: i64 = 1_800_000_000;

fn expect() -> Expectations {
    Expectations {
        audience: DEFAULT_AUDIENCE.into(),
        service_account: "system:serviceaccount:lockstep:lockstep-sidecar".into(),
        max_lifetime_seconds: 3600,
    }
}

fn token(signer: &TokenSigner, node: &str) -> String {
    signer
        .pod_token(
            DEFAULT_AUDIENCE,
            "lockstep",
            "lockstep-sidecar",
            &format!("lockstep-sidecar-{node}"),
            node,
            NOW,
            600,
        )
        .unwrap()
}

#[test]
fn a_token_names_its_cluster_by_key_and_its_node_by_claim() {
    let east = TokenSigner::generate().unwrap();
    let west = TokenSigner::generate().unwrap();
    let (east_jwks, west_jwks) = (east.jwks(), west.jwks());
    let keys = KeySets::build([
        ("east", Some(east_jwks.as_str())),
        ("west", Some(west_jwks.as_str())),
    ]);
    let who = verify(&keys, &token(&west, "west-node-1"), &expect(), NOW + 10).unwrap();
    assert_eq!(who.cluster, "west");
    assert_eq!(who.node, "west-node-1");
    assert_eq!(who.pod, "lockstep/lockstep-sidecar-west-node-1");
    assert_eq!(keys.keys_of("east"), 1);
}

#[test]
fn every_flaw_is_refused_with_its_reason() {
    let east = TokenSigner::generate().unwrap();
    let stranger = TokenSigner::generate().unwrap();
    let jwks = east.jwks();
    let keys = KeySets::build([("east", Some(jwks.as_str()))]);
    let good = token(&east, "n1");
    let check = |token: &str, now: i64| verify(&keys, token, &expect(), now);

    assert!(matches!(check("abc", NOW), Err(Refusal::Malformed(_))));
    assert!(matches!(
        check(&token(&stranger, "n1"), NOW),
        Err(Refusal::UnknownKey { .. })
    ));
    // A signature of another key under east's kid.
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged = token(&stranger, "n1");
    let forged_signature = forged.rsplit('.').next().unwrap();
    parts[2] = forged_signature;
    assert!(matches!(
        check(&parts.join("."), NOW),
        Err(Refusal::Signature { .. })
    ));
    // Claims changed after signing.
    let other_node = east
        .pod_token(
            DEFAULT_AUDIENCE,
            "lockstep",
            "lockstep-sidecar",
            "p",
            "n2",
            NOW,
            600,
        )
        .unwrap();
    let swapped = format!(
        "{}.{}.{}",
        good.split('.').next().unwrap(),
        other_node.split('.').nth(1).unwrap(),
        good.rsplit('.').next().unwrap()
    );
    assert!(matches!(
        check(&swapped, NOW),
        Err(Refusal::Signature { .. })
    ));
    assert!(matches!(
        check(&good, NOW + 600 + CLOCK_SKEW_SECONDS + 1),
        Err(Refusal::Lifetime(_))
    ));
    assert!(matches!(
        check(&good, NOW - CLOCK_SKEW_SECONDS - 1),
        Err(Refusal::Lifetime(_))
    ));
    let long = east
        .pod_token(
            DEFAULT_AUDIENCE,
            "lockstep",
            "lockstep-sidecar",
            "p",
            "n1",
            NOW,
            7200,
        )
        .unwrap();
    assert!(matches!(check(&long, NOW), Err(Refusal::Lifetime(_))));
    let audience = east
        .pod_token(
            "https://kubernetes.default.svc",
            "lockstep",
            "lockstep-sidecar",
            "p",
            "n1",
            NOW,
            600,
        )
        .unwrap();
    assert!(matches!(
        check(&audience, NOW),
        Err(Refusal::Audience { .. })
    ));
    let app = east
        .pod_token(DEFAULT_AUDIENCE, "shop", "default", "p", "n1", NOW, 600)
        .unwrap();
    assert!(matches!(
        check(&app, NOW),
        Err(Refusal::ServiceAccount { .. })
    ));
    let unbound = east
        .sign(&serde_json::json!({
            "aud": [DEFAULT_AUDIENCE], "exp": NOW + 600, "iat": NOW,
            "sub": "system:serviceaccount:lockstep:lockstep-sidecar",
            "kubernetes.io": {"namespace": "lockstep", "serviceaccount": {"name": "lockstep-sidecar"}},
        }))
        .unwrap();
    assert_eq!(check(&unbound, NOW), Err(Refusal::Unbound));
    assert!(check(&good, NOW).is_ok());
}

#[test]
fn clusters_sharing_a_key_are_both_refused_and_a_malformed_set_is_refused() {
    let shared = TokenSigner::generate().unwrap();
    let jwks = shared.jwks();
    let keys = KeySets::build([
        ("east", Some(jwks.as_str())),
        ("west", Some(jwks.as_str())),
        ("north", Some("{\"keys\": []}")),
        ("south", None),
    ]);
    assert!(keys.refused("east").unwrap().contains("west"));
    assert!(keys.refused("west").unwrap().contains("east"));
    assert!(keys.refused("north").unwrap().contains("no key"));
    assert_eq!(keys.refused("south"), None);
    assert_eq!(keys.keys_of("east"), 0);
    assert!(matches!(
        verify(&keys, &token(&shared, "n1"), &expect(), NOW),
        Err(Refusal::RefusedCluster { .. })
    ));
}

#[test]
fn an_rsa_key_set_as_kube_publishes_it_verifies_rs256() {
    // RFC 7515 appendix A.2: an RS256 JWS and its key (n, e), checked as kube's RSA keys are.
    let n = "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ";
    let jwks = serde_json::json!({"keys": [{"kty": "RSA", "kid": "rsa-1", "n": n, "e": "AQAB"}]})
        .to_string();
    let keys = KeySets::build([("east", Some(jwks.as_str()))]);
    assert_eq!(keys.keys_of("east"), 1);
    let parsed = parse_jwks(&jwks).unwrap();
    let PublicKey::Rsa { n, e } = &parsed[0].1 else {
        panic!("not RSA")
    };
    let signed = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ";
    let signature = b64("cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw").unwrap();
    assert!(
        signature::RsaPublicKeyComponents { n, e }
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                signed.as_bytes(),
                &signature
            )
            .is_ok()
    );
}
