//! The kernel's module signature format: the module, then a detached PKCS#7
//! SignedData over it, then a 12-byte `module_signature` record (only the
//! id type, PKCS#7, and the signature's big-endian length are set for
//! PKCS#7) and the marker `~Module signature appended~\n`. Pure encoding
//! and decoding; the files are read and written in [`super`].

use anyhow::{Context as _, Result, bail};

use super::der::{self, Reader};

/// What ends a signed module.
pub const MARKER: &[u8] = b"~Module signature appended~\n";
/// Size of the `module_signature` record before the marker.
pub const INFO_LEN: usize = 12;
/// `id_type` of a PKCS#7 signature (`PKEY_ID_PKCS7`).
const PKEY_ID_PKCS7: u8 = 2;
/// How many bytes at the end of a file [`appended`] needs.
pub const TAIL_LEN: usize = INFO_LEN + MARKER.len();

/// The digest a module is signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// SHA-256 (the default).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl Hash {
    /// Every digest kvcd signs with, by name.
    pub const ALL: [(&'static str, Self); 3] = [
        ("sha256", Self::Sha256),
        ("sha384", Self::Sha384),
        ("sha512", Self::Sha512),
    ];

    /// The name the kernel and `modinfo` use (`sha256`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    /// The digest named `name`, if kvcd signs with it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
    }

    /// Content octets of the digest's OBJECT IDENTIFIER.
    fn oid(self) -> &'static [u8] {
        match self {
            Self::Sha256 => &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01],
            Self::Sha384 => &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02],
            Self::Sha512 => &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03],
        }
    }

    /// Content octets of ECDSA-with-this-digest's OBJECT IDENTIFIER.
    fn ecdsa_oid(self) -> &'static [u8] {
        match self {
            Self::Sha256 => &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],
            Self::Sha384 => &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
            Self::Sha512 => &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
        }
    }
}

/// The public-key algorithm of a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// RSA, PKCS#1 v1.5.
    Rsa,
    /// ECDSA (X9.62 DER signature).
    Ecdsa,
}

/// `id-data`: the (detached) content is plain data.
const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
/// `id-signedData`.
const OID_SIGNED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
/// `rsaEncryption`.
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// How a signature names the certificate of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerRef<'a> {
    /// The certificate's issuer (its DER Name) and serial number (its DER INTEGER).
    IssuerSerial {
        /// DER of the issuer Name.
        issuer: &'a [u8],
        /// DER of the serial number INTEGER.
        serial: &'a [u8],
    },
}

/// Encodes the detached PKCS#7 SignedData of a module signature: no
/// certificates, no signed attributes (the signature is over the
/// module's digest itself), one signer.
pub fn signed_data(
    signer: &SignerRef<'_>,
    hash: Hash,
    algorithm: KeyAlgorithm,
    signature: &[u8],
) -> Vec<u8> {
    use der::{constructed, tlv};
    // Digest parameters are absent (RFC 5754); rsaEncryption's are NULL.
    let digest_alg = constructed(der::SEQUENCE, &[&tlv(der::OID, hash.oid())]);
    let sig_alg = match algorithm {
        KeyAlgorithm::Rsa => constructed(
            der::SEQUENCE,
            &[&tlv(der::OID, OID_RSA), &tlv(der::NULL, &[])],
        ),
        KeyAlgorithm::Ecdsa => constructed(der::SEQUENCE, &[&tlv(der::OID, hash.ecdsa_oid())]),
    };
    let SignerRef::IssuerSerial { issuer, serial } = signer;
    let sid = constructed(der::SEQUENCE, &[issuer, serial]);
    let version1 = tlv(der::INTEGER, &[1]);
    let signer_info = constructed(
        der::SEQUENCE,
        &[
            &version1,
            &sid,
            &digest_alg,
            &sig_alg,
            &tlv(der::OCTET_STRING, signature),
        ],
    );
    let signed = constructed(
        der::SEQUENCE,
        &[
            &version1,
            &constructed(der::SET, &[&digest_alg]),
            &constructed(der::SEQUENCE, &[&tlv(der::OID, OID_DATA)]),
            &constructed(der::SET, &[&signer_info]),
        ],
    );
    constructed(
        der::SEQUENCE,
        &[
            &tlv(der::OID, OID_SIGNED_DATA),
            &constructed(der::CONTEXT_0, &[&signed]),
        ],
    )
}

/// What follows a module's content: the PKCS#7 signature, the record and the marker.
pub fn trailer(pkcs7: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(pkcs7.len()).context("signature longer than 4 GiB")?;
    let mut out = Vec::with_capacity(pkcs7.len() + TAIL_LEN);
    out.extend_from_slice(pkcs7);
    // algo, hash, id_type, signer_len, key_id_len, 3 bytes of padding, sig_len.
    out.extend_from_slice(&[0, 0, PKEY_ID_PKCS7, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(MARKER);
    Ok(out)
}

/// Where a module's signature is, read from the last [`TAIL_LEN`] bytes
/// of a file of `file_len` bytes: none when the marker is not there; an
/// error when the record after the signature is inconsistent.
pub fn appended(tail: &[u8], file_len: u64) -> Result<Option<Appended>> {
    if tail.len() < TAIL_LEN || !tail.ends_with(MARKER) {
        return Ok(None);
    }
    let info = &tail[tail.len() - TAIL_LEN..tail.len() - MARKER.len()];
    if info[2] != PKEY_ID_PKCS7 {
        bail!(
            "its signature is of id type {} where the kernel reads only PKCS#7 ({PKEY_ID_PKCS7})",
            info[2]
        );
    }
    if info[..2] != [0, 0] || info[3..8] != [0; 5] {
        bail!("its signature record has fields set that PKCS#7 signatures leave zero");
    }
    let sig_len = u64::from(u32::from_be_bytes([info[8], info[9], info[10], info[11]]));
    let overhead = sig_len + TAIL_LEN as u64;
    if sig_len == 0 || overhead > file_len {
        bail!(
            "its signature record says {sig_len} bytes of signature but the file has {file_len} bytes"
        );
    }
    Ok(Some(Appended {
        content_len: file_len - overhead,
        signature_len: sig_len,
    }))
}

/// A signature at the end of a module file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Bytes of module content before the signature.
    pub content_len: u64,
    /// Bytes of PKCS#7 signature.
    pub signature_len: u64,
}

/// Who signed a module, as read from its PKCS#7 signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerInfo {
    /// The signer's name as the kernel forms it from the issuer (CN, O, or both), e.g. `Build time autogenerated kernel key`.
    pub name: String,
    /// The key id `modinfo` shows: the certificate's serial number, or its subject key identifier.
    pub key_id: Vec<u8>,
    /// True when the signature names its certificate by issuer and serial number.
    pub by_serial: bool,
    /// The DER of the issuer Name, when named by issuer and serial.
    pub issuer: Vec<u8>,
    /// The digest name (`sha256`), or the OID when kvcd does not know it.
    pub hash: String,
}

/// Reads the signer of a PKCS#7 module signature.
pub fn signer_of(pkcs7: &[u8]) -> Result<SignerInfo> {
    let mut top = Reader::new(pkcs7);
    let ci = top.expect(der::SEQUENCE, "ContentInfo")?;
    let mut ci = Reader::new(ci.content);
    let ty = ci.expect(der::OID, "ContentInfo type")?;
    if ty.content != OID_SIGNED_DATA {
        bail!(
            "the signature is a PKCS#7 {} where SignedData was expected",
            der::oid_text(ty.content)
        );
    }
    let wrapped = ci.expect(der::CONTEXT_0, "SignedData")?;
    let sd = Reader::new(wrapped.content).expect(der::SEQUENCE, "SignedData")?;
    let mut sd = Reader::new(sd.content);
    sd.expect(der::INTEGER, "SignedData version")?;
    sd.expect(der::SET, "SignedData digest algorithms")?;
    sd.expect(der::SEQUENCE, "SignedData content info")?;
    sd.optional(der::CONTEXT_0)?;
    sd.optional(der::CONTEXT_1)?;
    let infos = sd.expect(der::SET, "SignedData signer infos")?;
    let si = Reader::new(infos.content).expect(der::SEQUENCE, "SignerInfo")?;
    let mut si = Reader::new(si.content);
    si.expect(der::INTEGER, "SignerInfo version")?;
    let sid = si
        .next_element()?
        .context("SignerInfo: no signer identifier")?;
    let (name, key_id, by_serial, issuer) = match sid.tag {
        der::SEQUENCE => {
            let mut r = Reader::new(sid.content);
            let issuer = r.expect(der::SEQUENCE, "signer issuer")?;
            let serial = r.expect(der::INTEGER, "signer serial number")?;
            let mut serial = serial.content;
            // The serial as modinfo prints it: without the sign octet.
            while serial.len() > 1 && serial[0] == 0 {
                serial = &serial[1..];
            }
            (
                kernel_name(issuer.raw)?,
                serial.to_vec(),
                true,
                issuer.raw.to_vec(),
            )
        }
        der::CONTEXT_0_PRIMITIVE => (String::new(), sid.content.to_vec(), false, Vec::new()),
        t => bail!("SignerInfo: signer identifier of tag {t:#04x}"),
    };
    let alg = si.expect(der::SEQUENCE, "SignerInfo digest algorithm")?;
    let oid = Reader::new(alg.content).expect(der::OID, "digest algorithm OID")?;
    let hash = Hash::ALL
        .iter()
        .find(|(_, h)| h.oid() == oid.content)
        .map_or_else(|| der::oid_text(oid.content), |(n, _)| (*n).to_owned());
    Ok(SignerInfo {
        name,
        key_id,
        by_serial,
        issuer,
        hash,
    })
}

/// The name the kernel gives an X.509 Name (DER) in key descriptions and
/// signer messages: the CN, the O, or "O: CN" when the CN does not start
/// like the O; the email address when neither is there.
pub fn kernel_name(name_der: &[u8]) -> Result<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const EMAIL: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01];
    let (mut cn, mut o, mut email) = (None, None, None);
    let seq = Reader::new(name_der).expect(der::SEQUENCE, "Name")?;
    let mut rdns = Reader::new(seq.content);
    while let Some(rdn) = rdns.next_element()? {
        let mut atvs = Reader::new(rdn.content);
        while let Some(atv) = atvs.next_element()? {
            let mut r = Reader::new(atv.content);
            let oid = r.expect(der::OID, "attribute type")?;
            let value = r.next_element()?.context("attribute without a value")?;
            let text = String::from_utf8_lossy(value.content).into_owned();
            match oid.content {
                CN => cn = Some(text),
                O => o = Some(text),
                EMAIL => email = Some(text),
                _ => {}
            }
        }
    }
    Ok(match (cn, o, email) {
        (Some(cn), Some(o), _) => {
            let prefix = |n: usize| cn.as_bytes().get(..n) == o.as_bytes().get(..n);
            if cn.starts_with(&o) || (cn.len() >= 7 && o.len() >= 7 && prefix(7)) {
                cn
            } else {
                format!("{o}: {cn}")
            }
        }
        (Some(cn), None, _) => cn,
        (None, Some(o), _) => o,
        (None, None, Some(e)) => e,
        (None, None, None) => String::new(),
    })
}

/// `5E:E1:13`: a key id the way `modinfo` prints it.
pub fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(cn: Option<&str>, o: Option<&str>) -> Vec<u8> {
        use der::{constructed, tlv};
        let mut rdns = Vec::new();
        for (oid, v) in [
            (&[0x55u8, 0x04, 0x0a][..], o),
            (&[0x55, 0x04, 0x03][..], cn),
        ] {
            if let Some(v) = v {
                let atv = constructed(
                    der::SEQUENCE,
                    &[&tlv(der::OID, oid), &tlv(0x0c, v.as_bytes())],
                );
                rdns.push(constructed(der::SET, &[&atv]));
            }
        }
        let parts: Vec<&[u8]> = rdns.iter().map(Vec::as_slice).collect();
        constructed(der::SEQUENCE, &parts)
    }

    #[test]
    fn names_follow_the_kernel() {
        assert_eq!(kernel_name(&name(Some("k"), None)).unwrap(), "k");
        assert_eq!(kernel_name(&name(None, Some("Org"))).unwrap(), "Org");
        assert_eq!(
            kernel_name(&name(Some("Debian Secure Boot CA"), Some("Debian"))).unwrap(),
            "Debian Secure Boot CA"
        );
        assert_eq!(
            kernel_name(&name(Some("signer"), Some("Vendor Inc"))).unwrap(),
            "Vendor Inc: signer"
        );
    }

    #[test]
    fn signed_data_round_trips_its_signer() {
        let issuer = name(Some("kvcd test"), None);
        let serial = der::unsigned_integer(&[0x9f, 0x01]);
        let p7 = signed_data(
            &SignerRef::IssuerSerial {
                issuer: &issuer,
                serial: &serial,
            },
            Hash::Sha512,
            KeyAlgorithm::Rsa,
            &[7; 256],
        );
        let s = signer_of(&p7).unwrap();
        assert_eq!(s.name, "kvcd test");
        assert_eq!(s.key_id, vec![0x9f, 0x01]);
        assert_eq!(s.hash, "sha512");
        assert!(s.by_serial);
        assert_eq!(colon_hex(&s.key_id), "9F:01");
    }

    #[test]
    fn the_trailer_is_found_again() {
        let content = vec![0x7fu8; 1000];
        let p7 = vec![0x30u8; 300];
        let mut file = content.clone();
        file.extend(trailer(&p7).unwrap());
        let tail = &file[file.len() - TAIL_LEN..];
        let a = appended(tail, file.len() as u64).unwrap().unwrap();
        assert_eq!(a.content_len, 1000);
        assert_eq!(a.signature_len, 300);
        assert_eq!(appended(&content[..TAIL_LEN], 1000).unwrap(), None);
    }

    #[test]
    fn an_inconsistent_record_is_an_error() {
        let mut t = trailer(&[0x30; 10]).unwrap();
        let n = t.len();
        // A length past the start of the file.
        t[n - MARKER.len() - 4..n - MARKER.len()].copy_from_slice(&5000u32.to_be_bytes());
        let e = appended(&t[t.len() - TAIL_LEN..], t.len() as u64).unwrap_err();
        assert!(e.to_string().contains("5000 bytes of signature"), "{e}");
        let mut t = trailer(&[0x30; 10]).unwrap();
        let n = t.len();
        t[n - MARKER.len() - INFO_LEN + 2] = 1;
        let e = appended(&t[t.len() - TAIL_LEN..], t.len() as u64).unwrap_err();
        assert!(e.to_string().contains("only PKCS#7"), "{e}");
    }

    #[test]
    fn garbage_is_not_a_signer() {
        assert!(signer_of(&[0x30, 3, 6, 1, 1]).is_err());
        assert!(signer_of(&[]).is_err());
    }
}
