//! What cert-manager would make for a rendered overlay's `Certificate`s:
//! each one's Secret (`spec.secretName`) with `tls.crt`, `tls.key` and
//! `ca.crt`, signed as its `issuerRef` says (a `selfSigned` Issuer, or a
//! `ca` Issuer whose CA is another Certificate's Secret), with its
//! `commonName`, `dnsNames`, `isCA` and `usages`; ECDSA P-256 keys in
//! PKCS#8, as the overlay's `privateKey` asks. podman plays no cert-manager.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_yaml::Value;

/// cert-manager's keys in a certificate's Secret.
pub const CERT_KEY: &str = "tls.crt";
/// The private key.
pub const KEY_KEY: &str = "tls.key";
/// The issuing CA's certificate.
pub const CA_KEY: &str = "ca.crt";

/// One Secret cert-manager would write: its name and PEM values by key.
#[derive(Debug, Clone)]
pub(crate) struct IssuedSecret {
    /// `spec.secretName` of the Certificate.
    pub name: String,
    /// The Certificate's namespace.
    pub namespace: String,
    /// [`CERT_KEY`], [`KEY_KEY`], [`CA_KEY`] → PEM.
    pub data: BTreeMap<String, String>,
}

/// How an Issuer signs.
enum IssuerKind {
    SelfSigned,
    /// Signs with the certificate in this Secret.
    Ca(String),
}

/// The Secrets of every Certificate in `objects`, CAs before what they sign.
pub(crate) fn issue(objects: &[Value]) -> Result<Vec<IssuedSecret>> {
    let mut issuers = BTreeMap::new();
    for issuer in objects.iter().filter(|o| o["kind"] == "Issuer") {
        let name = text(issuer, &["metadata", "name"])?;
        let kind = if issuer["spec"].get("selfSigned").is_some() {
            IssuerKind::SelfSigned
        } else if let Some(secret) = issuer["spec"]["ca"]["secretName"].as_str() {
            IssuerKind::Ca(secret.to_string())
        } else {
            bail!("Issuer {name}: only selfSigned and ca issuers are issued for podman");
        };
        issuers.insert(name.to_string(), kind);
    }
    let mut pending: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Certificate")
        .collect();
    // The CA key pairs and parameters by Secret name, to sign with.
    let mut signers: BTreeMap<String, (CertificateParams, KeyPair, String)> = BTreeMap::new();
    let mut issued = Vec::new();
    while !pending.is_empty() {
        let before = pending.len();
        let mut waiting = Vec::new();
        for certificate in pending {
            let name = text(certificate, &["metadata", "name"])?;
            let issuer_name = text(certificate, &["spec", "issuerRef", "name"])?;
            let issuer = issuers
                .get(issuer_name)
                .with_context(|| format!("Certificate {name}: no Issuer {issuer_name}"))?;
            if let IssuerKind::Ca(secret) = issuer {
                if !signers.contains_key(secret) {
                    waiting.push(certificate);
                    continue;
                }
            }
            let (params, key) =
                parameters(certificate).with_context(|| format!("Certificate {name}"))?;
            let (cert_pem, ca_pem) = match issuer {
                IssuerKind::SelfSigned => {
                    let pem = params.self_signed(&key)?.pem();
                    (pem.clone(), pem)
                }
                IssuerKind::Ca(secret) => {
                    let (ca_params, ca_key, ca_pem) = &signers[secret];
                    let signer = Issuer::from_params(ca_params, ca_key);
                    (params.signed_by(&key, &signer)?.pem(), ca_pem.clone())
                }
            };
            let secret_name = text(certificate, &["spec", "secretName"])?.to_string();
            let key_pem = key.serialize_pem();
            issued.push(IssuedSecret {
                name: secret_name.clone(),
                namespace: certificate["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
                data: BTreeMap::from([
                    (CERT_KEY.to_string(), cert_pem.clone()),
                    (KEY_KEY.to_string(), key_pem),
                    (CA_KEY.to_string(), ca_pem),
                ]),
            });
            if certificate["spec"]["isCA"].as_bool() == Some(true) {
                signers.insert(secret_name, (params, key, cert_pem));
            }
        }
        if waiting.len() == before {
            bail!(
                "Certificates whose CA no Certificate makes: {:?}",
                names(&waiting)
            );
        }
        pending = waiting;
    }
    Ok(issued)
}

fn names(objects: &[&Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn text<'a>(object: &'a Value, path: &[&str]) -> Result<&'a str> {
    let mut value = object;
    for field in path {
        value = &value[*field];
    }
    value.as_str().with_context(|| {
        format!(
            "{} has no {}",
            object["kind"].as_str().unwrap_or("?"),
            path.join(".")
        )
    })
}

/// The certificate's subject, names, CA flag and usages, and a new key.
fn parameters(certificate: &Value) -> Result<(CertificateParams, KeyPair)> {
    let spec = &certificate["spec"];
    let algorithm = spec["privateKey"]["algorithm"].as_str().unwrap_or("RSA");
    let size = spec["privateKey"]["size"].as_u64().unwrap_or(0);
    if algorithm != "ECDSA" || size != 256 {
        bail!("privateKey {algorithm} {size}: only ECDSA 256 is issued for podman");
    }
    let dns_names: Vec<String> = spec["dnsNames"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    let mut params = CertificateParams::new(dns_names)?;
    if let Some(common_name) = spec["commonName"].as_str() {
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
    }
    if spec["isCA"].as_bool() == Some(true) {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    for usage in spec["usages"].as_sequence().into_iter().flatten() {
        match usage.as_str().unwrap_or_default() {
            "digital signature" => params.key_usages.push(KeyUsagePurpose::DigitalSignature),
            "key encipherment" => params.key_usages.push(KeyUsagePurpose::KeyEncipherment),
            "cert sign" => params.key_usages.push(KeyUsagePurpose::KeyCertSign),
            "crl sign" => params.key_usages.push(KeyUsagePurpose::CrlSign),
            "server auth" => params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth),
            "client auth" => params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth),
            other => bail!("usage {other:?} is not issued for podman"),
        }
    }
    Ok((params, KeyPair::generate()?))
}
