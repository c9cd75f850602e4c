//! `kubectl lockstep certs`: the certificates of the gRPC Control path's TLS (README, "Certificates and
//! node identity") — the operator's serving certificate Secret and the CA bundle Secret the sidecars
//! trust — with their subjects, issuers and expiry, read from the namespace (`-n`).

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::Api;
use serde::Serialize;
use x509_parser::pem::Pem;

use crate::{
    PluginError,
    connect::Connection,
    output::{Report, table},
};

/// The flags of `certs`: the Secrets' names, as the chart's values name them.
#[derive(Debug, Clone, clap::Args)]
pub struct CertArgs {
    /// The operator's serving certificate (`controlTls.secretName`): its tls.crt and ca.crt.
    #[arg(long, default_value = "lockstep-control-tls")]
    pub tls_secret: String,
    /// The CA bundle the sidecars trust (`controlTls.caSecretName`): its ca.crt.
    #[arg(long, default_value = "lockstep-control-ca")]
    pub ca_secret: String,
}

/// What `certs` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertsReport {
    /// The namespace read.
    pub namespace: String,
    /// Every certificate found.
    pub certificates: Vec<CertificateLine>,
    /// Secrets not found (this cluster may be a member without the operator's certificate).
    pub missing: Vec<String>,
}

/// One certificate of one Secret key.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateLine {
    /// The Secret.
    pub secret: String,
    /// The key: tls.crt or ca.crt.
    pub key: String,
    /// The subject.
    pub subject: String,
    /// The issuer.
    pub issuer: String,
    /// Whether it is a CA.
    pub ca: bool,
    /// When it stops being valid (RFC 3339).
    pub not_after: String,
    /// Whole days until then (negative: expired).
    pub days_left: i64,
}

/// Reads the Secrets and their certificates.
pub async fn report(connection: &Connection, args: &CertArgs) -> Result<CertsReport, PluginError> {
    let namespace = connection.namespace.clone();
    let secrets = Api::<Secret>::namespaced(connection.client.clone(), &namespace);
    let mut report = CertsReport {
        namespace: namespace.clone(),
        certificates: Vec::new(),
        missing: Vec::new(),
    };
    let now = Timestamp::now().as_second();
    for (name, keys) in [
        (&args.tls_secret, &["tls.crt", "ca.crt"][..]),
        (&args.ca_secret, &["ca.crt"][..]),
    ] {
        let secret = secrets.get_opt(name).await.map_err(|error| {
            PluginError::api(format!("reading Secret {namespace}/{name}"), error)
        })?;
        let Some(secret) = secret else {
            report.missing.push(name.clone());
            continue;
        };
        for key in keys {
            let Some(bytes) = secret.data.as_ref().and_then(|data| data.get(*key)) else {
                continue;
            };
            for line in certificates(&bytes.0, now).map_err(|why| {
                PluginError::Refused(format!("Secret {namespace}/{name} key {key}: {why}"))
            })? {
                report.certificates.push(CertificateLine {
                    secret: name.clone(),
                    key: (*key).to_owned(),
                    ..line
                });
            }
        }
    }
    if report.certificates.is_empty() {
        return Err(PluginError::Refused(format!(
            "no certificates in Secrets {} or {} of namespace {namespace} (name the chart's namespace with -n, or the Secrets with --tls-secret and --ca-secret)",
            args.tls_secret, args.ca_secret
        )));
    }
    Ok(report)
}

/// The certificates of a PEM bundle, with days left counted from `now` (Unix seconds).
pub fn certificates(pem: &[u8], now: i64) -> Result<Vec<CertificateLine>, String> {
    let mut lines = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(|error| format!("not PEM: {error}"))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let certificate = block
            .parse_x509()
            .map_err(|error| format!("not an X.509 certificate: {error}"))?;
        let not_after = certificate.validity().not_after.timestamp();
        lines.push(CertificateLine {
            secret: String::new(),
            key: String::new(),
            subject: certificate.subject().to_string(),
            issuer: certificate.issuer().to_string(),
            ca: certificate.is_ca(),
            not_after: Timestamp::from_second(not_after)
                .map_or_else(|_| not_after.to_string(), |time| time.to_string()),
            days_left: (not_after - now).div_euclid(86_400),
        });
    }
    if lines.is_empty() {
        return Err("no PEM certificate in it".to_owned());
    }
    Ok(lines)
}

impl Report for CertsReport {
    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .certificates
            .iter()
            .map(|line| {
                vec![
                    line.secret.clone(),
                    line.key.clone(),
                    line.subject.clone(),
                    line.issuer.clone(),
                    if line.ca { "yes" } else { "no" }.to_owned(),
                    line.not_after.clone(),
                    if line.days_left < 0 {
                        "EXPIRED".to_owned()
                    } else {
                        format!("{}d", line.days_left)
                    },
                ]
            })
            .collect();
        let mut text = table(
            &[
                "SECRET",
                "KEY",
                "SUBJECT",
                "ISSUER",
                "CA",
                "NOT AFTER",
                "EXPIRES IN",
            ],
            &rows,
        );
        for name in &self.missing {
            text.push_str(&format!("Secret {}/{name}: not found\n", self.namespace));
        }
        text
    }
}
