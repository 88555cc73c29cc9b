//! Module signing for Secure Boot: kvcd signs every module it stages with
//! the node's key (`[signing]` in kvcd.toml) in the kernel's own format
//! ([`modsig`]), in-process, and reports whether the running kernel trusts
//! that key ([`trust`]).
//!
//! A module that already carries a signature keeps it when its signer is
//! kvcd's own key, or a key of that signer's name is in one of the running
//! kernel's trusted keyrings; otherwise its signature is replaced by
//! kvcd's. Compressed modules are decompressed and stored signed,
//! uncompressed (the kernel verifies the uncompressed bytes).

mod der;
pub mod modsig;
pub mod trust;

use std::fs;
use std::io::{BufWriter, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use openssl::hash::MessageDigest;
use openssl::pkey::{Id, PKey, Private};
use openssl::x509::X509;
use serde::Serialize;

pub use modsig::{Hash, KeyAlgorithm, SignerInfo};
pub use trust::KernelTrust;

use crate::config::SigningSettings;

/// What kvcd knows of its signing certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertSummary {
    /// The certificate file.
    pub path: PathBuf,
    /// The subject, as the kernel names the key (CN, O, or "O: CN").
    pub subject: String,
    /// The issuer, as the kernel names it; what `modinfo` shows as `signer`.
    pub issuer: String,
    /// The serial number, `AA:BB:…`; what `modinfo` shows as `sig_key`.
    pub serial: String,
    /// The subject key identifier, hex, when the certificate has one.
    pub subject_key_id: Option<String>,
    /// The kernel's description of the key once loaded: `SUBJECT: KEYID-HEX`.
    pub kernel_description: String,
    /// SHA-256 of the certificate's DER, hex.
    pub fingerprint: String,
    /// End of validity (the kernel does not check it for module signatures).
    pub not_after: String,
}

/// The node's signing key, loaded and checked against its certificate.
pub struct Signer {
    settings: SigningSettings,
    key: PKey<Private>,
    algorithm: KeyAlgorithm,
    /// DER of the certificate's issuer Name.
    issuer: Vec<u8>,
    /// DER of the certificate's serial number INTEGER.
    serial: Vec<u8>,
    /// The serial's magnitude, as a signature's key id reads.
    serial_magnitude: Vec<u8>,
    cert: CertSummary,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("settings", &self.settings)
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// What signing one module did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignOutcome {
    /// Signed by kvcd into the destination; the signature it replaced, if any.
    Signed {
        /// The signer of the signature that was replaced.
        replaced: Option<SignerInfo>,
    },
    /// Left as it came (nothing written): it carries a signature the kernel trusts.
    Kept {
        /// Its signer.
        signer: SignerInfo,
        /// The trusted keyrings with a key of that signer, or empty when it is kvcd's own key.
        keyrings: Vec<String>,
    },
}

impl Signer {
    /// Loads the key and certificate `settings` name. Fails, naming the file
    /// and what is wrong, when the key is readable by anyone but its owner
    /// or not owned by the user kvcd runs as, is encrypted or of a type the
    /// kernel cannot verify, or does not match the certificate.
    pub fn load(settings: &SigningSettings) -> Result<Self> {
        let key_path = &settings.key;
        check_key_file(key_path)?;
        let pem = fs::read(key_path)
            .with_context(|| format!("[signing] key: reading {}", key_path.display()))?;
        if pem.windows(9).any(|w| w == b"ENCRYPTED") {
            bail!(
                "[signing] key: {} is encrypted; kvcd needs an unencrypted key (kept readable by root only)",
                key_path.display()
            );
        }
        let key = if pem.starts_with(b"-----") || pem.windows(10).any(|w| w == b"-----BEGIN") {
            // A callback that gives no passphrase: never a prompt.
            PKey::private_key_from_pem_callback(&pem, |_| Ok(0))
        } else {
            PKey::private_key_from_der(&pem)
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "[signing] key: {} is not a PEM or DER private key ({e})",
                key_path.display()
            )
        })?;
        let algorithm = match key.id() {
            Id::RSA => KeyAlgorithm::Rsa,
            Id::EC => KeyAlgorithm::Ecdsa,
            _ => bail!(
                "[signing] key: {} is neither an RSA nor an EC key; the kernel verifies module signatures made with RSA or ECDSA keys",
                key_path.display()
            ),
        };
        let cert_path = &settings.cert;
        let raw = fs::read(cert_path)
            .with_context(|| format!("[signing] cert: reading {}", cert_path.display()))?;
        let cert = if raw.windows(10).any(|w| w == b"-----BEGIN") {
            X509::from_pem(&raw)
        } else {
            X509::from_der(&raw)
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "[signing] cert: {} is not an X.509 certificate in DER or PEM ({e})",
                cert_path.display()
            )
        })?;
        let public = cert.public_key().with_context(|| {
            format!("[signing] cert: reading the key of {}", cert_path.display())
        })?;
        if !public.public_eq(&key) {
            bail!(
                "[signing] cert: {} does not match key {}: the certificate is for another key (give the certificate made from this key)",
                cert_path.display(),
                key_path.display()
            );
        }
        let serial = cert
            .serial_number()
            .to_bn()
            .context("reading the certificate's serial number")?;
        if serial.is_negative() {
            bail!(
                "[signing] cert: {} has a negative serial number",
                cert_path.display()
            );
        }
        let serial_magnitude = serial.to_vec();
        let issuer = cert
            .issuer_name()
            .to_der()
            .context("encoding the certificate's issuer")?;
        let subject = cert
            .subject_name()
            .to_der()
            .context("encoding the certificate's subject")?;
        let der = cert.to_der().context("encoding the certificate")?;
        let skid = cert.subject_key_id().map(|s| s.as_slice().to_vec());
        let subject_name = modsig::kernel_name(&subject)?;
        let key_id = skid.as_deref().unwrap_or(&serial_magnitude);
        let summary = CertSummary {
            path: cert_path.clone(),
            kernel_description: format!("{subject_name}: {}", crate::util::hex(key_id)),
            subject: subject_name,
            issuer: modsig::kernel_name(&issuer)?,
            serial: modsig::colon_hex(&serial_magnitude),
            subject_key_id: skid.as_deref().map(crate::util::hex),
            fingerprint: crate::util::sha256_hex(&der),
            not_after: cert.not_after().to_string(),
        };
        Ok(Self {
            settings: settings.clone(),
            key,
            algorithm,
            serial: der::unsigned_integer(&serial_magnitude),
            serial_magnitude,
            issuer,
            cert: summary,
        })
    }

    /// The certificate signed modules name.
    pub fn cert(&self) -> &CertSummary {
        &self.cert
    }

    /// The settings it was loaded from.
    pub fn settings(&self) -> &SigningSettings {
        &self.settings
    }

    /// What a module signed by this signer is recorded with: the digest and
    /// the certificate's fingerprint; another key or digest signs again.
    pub fn identity(&self) -> String {
        format!("{}:{}", self.settings.hash.name(), self.cert.fingerprint)
    }

    /// True when `s` is a signature made by this signer's key.
    pub fn is_own(&self, s: &SignerInfo) -> bool {
        s.by_serial && s.issuer == self.issuer && s.key_id == self.serial_magnitude
    }

    /// Signs the module at `src` (compressed or not) into the new file `dst`,
    /// unless it carries a signature to keep (see the module docs); a signature
    /// kvcd does not keep is replaced. `trust` is what the kernel trusts.
    pub fn sign_file(&self, src: &Path, dst: &Path, trust: &KernelTrust) -> Result<SignOutcome> {
        let mut input = crate::kmod::elf::open(src)?;
        let len = input
            .seek(SeekFrom::End(0))
            .with_context(|| format!("reading {}", src.display()))?;
        let mut head = [0u8; 4];
        input
            .seek(SeekFrom::Start(0))
            .and_then(|_| input.read_exact(&mut head))
            .ok()
            .filter(|()| head == *b"\x7fELF")
            .with_context(|| format!("{} is not an ELF kernel module", src.display()))?;
        let mut content_len = len;
        let mut replaced = None;
        if let Some((a, signer)) = find_signature(&mut *input, len, src)? {
            if self.is_own(&signer) && signer.hash == self.settings.hash.name() {
                return Ok(SignOutcome::Kept {
                    signer,
                    keyrings: Vec::new(),
                });
            }
            let keyrings = trust.keyrings_with_name(&signer.name);
            if !keyrings.is_empty() {
                return Ok(SignOutcome::Kept { signer, keyrings });
            }
            content_len = a.content_len;
            replaced = Some(signer);
        }
        input
            .seek(SeekFrom::Start(0))
            .with_context(|| format!("reading {}", src.display()))?;
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(dst)
            .with_context(|| format!("creating {}", dst.display()))?;
        let mut out = BufWriter::new(out);
        let md = match self.settings.hash {
            Hash::Sha256 => MessageDigest::sha256(),
            Hash::Sha384 => MessageDigest::sha384(),
            Hash::Sha512 => MessageDigest::sha512(),
        };
        let mut signer =
            openssl::sign::Signer::new(md, &self.key).context("starting a signature")?;
        let mut buf = vec![0u8; 128 * 1024];
        let mut left = content_len;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = input
                .read(&mut buf[..want])
                .with_context(|| format!("reading {}", src.display()))?;
            if n == 0 {
                bail!("{} shrank while it was signed", src.display());
            }
            signer.update(&buf[..n]).context("signing")?;
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", dst.display()))?;
            left -= n as u64;
        }
        let signature = signer.sign_to_vec().context("signing")?;
        let p7 = modsig::signed_data(
            &modsig::SignerRef::IssuerSerial {
                issuer: &self.issuer,
                serial: &self.serial,
            },
            self.settings.hash,
            self.algorithm,
            &signature,
        );
        out.write_all(&modsig::trailer(&p7)?)
            .and_then(|()| out.flush())
            .with_context(|| format!("writing {}", dst.display()))?;
        Ok(SignOutcome::Signed { replaced })
    }
}

/// Refuses a key file anyone but its owner can read or write, or that is
/// not owned by the user kvcd runs as (root).
fn check_key_file(path: &Path) -> Result<()> {
    let meta =
        fs::metadata(path).with_context(|| format!("[signing] key: reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("[signing] key: {} is not a regular file", path.display());
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        bail!(
            "[signing] key: {} is owned by uid {}; a signing key must be owned by the user kvcd runs as (uid {euid})",
            path.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!(
            "[signing] key: {} has mode {mode:04o}: a signing key must be readable by its owner only (chmod 0600 {})",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// The signature at the end of the module file at `path` (compressed or
/// not): none when it carries none.
pub fn read_signature(path: &Path) -> Result<Option<SignerInfo>> {
    let mut input = crate::kmod::elf::open(path)?;
    let len = input
        .seek(SeekFrom::End(0))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(find_signature(&mut *input, len, path)?.map(|(_, s)| s))
}

/// Where the signature of the module `input` (of `len` bytes, read from
/// `path`) is, and who made it; none when it carries none.
fn find_signature(
    input: &mut dyn crate::kmod::elf::ReadSeek,
    len: u64,
    path: &Path,
) -> Result<Option<(modsig::Appended, SignerInfo)>> {
    if len < modsig::TAIL_LEN as u64 {
        return Ok(None);
    }
    let corrupt = || format!("{} has a corrupt module signature", path.display());
    let mut tail = [0u8; modsig::TAIL_LEN];
    input
        .seek(SeekFrom::Start(len - modsig::TAIL_LEN as u64))
        .and_then(|_| input.read_exact(&mut tail))
        .with_context(|| format!("reading {}", path.display()))?;
    let Some(a) = modsig::appended(&tail, len).with_context(corrupt)? else {
        return Ok(None);
    };
    let mut p7 = vec![0u8; usize::try_from(a.signature_len).with_context(corrupt)?];
    input
        .seek(SeekFrom::Start(a.content_len))
        .and_then(|_| input.read_exact(&mut p7))
        .with_context(|| format!("reading {}", path.display()))?;
    let signer = modsig::signer_of(&p7).with_context(corrupt)?;
    Ok(Some((a, signer)))
}

/// `[signing]` as one run uses it: the signer (or why it cannot sign) and
/// what the running kernel trusts, read once.
#[derive(Debug)]
pub struct Signing {
    /// The settings it was loaded from.
    pub settings: SigningSettings,
    /// The loaded key, or why it could not be loaded.
    pub signer: Result<Signer, String>,
    /// What the running kernel trusts.
    pub trust: KernelTrust,
}

impl Signing {
    /// Loads the key of `settings` and reads the running kernel's trust.
    pub fn load(settings: &SigningSettings) -> Self {
        Self {
            settings: settings.clone(),
            signer: Signer::load(settings).map_err(|e| format!("{e:#}")),
            trust: KernelTrust::read(),
        }
    }

    /// The keyrings of the running kernel that hold kvcd's certificate.
    pub fn trusted_by(&self) -> Vec<String> {
        self.signer.as_ref().map_or_else(
            |_| Vec::new(),
            |s| self.trust.keyrings_with(&s.cert().kernel_description),
        )
    }

    /// Why the kernel refused a module file at `path` it could not verify,
    /// with what to do about it: who signed it (if anyone), and how to
    /// enroll the certificate. `opted_out` is true when the file's config
    /// sets `sign = false`.
    pub fn explain_rejection(signing: Option<&Self>, path: &Path, opted_out: bool) -> String {
        let signature = match read_signature(path) {
            Ok(s) => s,
            Err(e) => return format!("its signature could not be read: {e:#}"),
        };
        let Some(s) = signature else {
            return match (signing, opted_out) {
                (None, _) => "the module carries no signature: set [signing] in kvcd.toml (a key enrolled on this node) so that kvcd signs what it stages".to_owned(),
                (Some(_), true) => "the module carries no signature: its config sets sign = false".to_owned(),
                (Some(g), false) => format!(
                    "the module carries no signature, though [signing] is set ({})",
                    g.signer.as_ref().err().map_or("kvcd signed nothing", String::as_str)
                ),
            };
        };
        let what = format!(
            "it is signed by \"{}\" (key id {}, {})",
            s.name,
            modsig::colon_hex(&s.key_id),
            s.hash
        );
        let ours = signing.and_then(|g| g.signer.as_ref().ok().filter(|o| o.is_own(&s)));
        let trust = signing.map_or_else(KernelTrust::read, |g| g.trust.clone());
        let keyrings = match ours {
            Some(o) => trust.keyrings_with(&o.cert().kernel_description),
            None => trust.keyrings_with_name(&s.name),
        };
        if !keyrings.is_empty() {
            return format!(
                "{what}, a key in {}, yet the kernel refused it: see the kernel log (`journalctl -k`)",
                keyrings.join(", ")
            );
        }
        let enroll = "run `mokutil --import CERT` (DER; it asks for a one-time password), reboot, and confirm the enrollment in MokManager with that password";
        match ours {
            Some(o) => format!(
                "{what}, kvcd's own key, which the kernel does not trust: enroll kvcd's certificate: {}",
                enroll.replace("CERT", &o.cert().path.display().to_string())
            ),
            None => format!(
                "{what}, a key the kernel does not trust: enroll the signer's certificate ({enroll}), or set [signing] in kvcd.toml to a key enrolled on this node so that kvcd signs the module"
            ),
        }
    }
}

/// What `kvcd signing`, `kvcctl status` and D-Bus report about signing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SigningStatus {
    /// True when `[signing]` is set in kvcd.toml.
    pub configured: bool,
    /// The key file, when configured.
    pub key: Option<PathBuf>,
    /// The digest, when configured.
    pub hash: Option<String>,
    /// The certificate, when it could be loaded.
    pub cert: Option<CertSummary>,
    /// Why the key or certificate cannot be used, if so.
    pub error: Option<String>,
    /// The running kernel's keyrings that hold kvcd's certificate (empty: not trusted).
    pub trusted_by: Vec<String>,
    /// Whether the kernel refuses modules it cannot verify (`yes: lockdown (integrity)`, `no`, `unknown`).
    pub enforced: String,
    /// What the running kernel trusts and enforces.
    pub kernel: KernelTrust,
}

impl SigningStatus {
    /// The status for `settings` (none: signing is off), read now.
    pub fn read(settings: Option<&SigningSettings>) -> Self {
        match settings {
            Some(s) => Self::of(&Signing::load(s)),
            None => {
                let kernel = KernelTrust::read();
                Self {
                    configured: false,
                    key: None,
                    hash: None,
                    cert: None,
                    error: None,
                    trusted_by: Vec::new(),
                    enforced: kernel.enforced_by(),
                    kernel,
                }
            }
        }
    }

    /// The status of a loaded `signing`.
    pub fn of(signing: &Signing) -> Self {
        Self {
            configured: true,
            key: Some(signing.settings.key.clone()),
            hash: Some(signing.settings.hash.name().to_owned()),
            cert: signing.signer.as_ref().ok().map(|s| s.cert().clone()),
            error: signing.signer.as_ref().err().cloned(),
            trusted_by: signing.trusted_by(),
            enforced: signing.trust.enforced_by(),
            kernel: signing.trust.clone(),
        }
    }

    /// True when `[signing]` is set and modules it signs would be refused:
    /// its key cannot be used, or the kernel enforces signatures and no
    /// keyring it could read holds the certificate.
    pub fn will_fail(&self) -> bool {
        self.configured
            && (self.error.is_some()
                || (self.kernel.enforced() == Some(true)
                    && self.kernel.keyring_error.is_none()
                    && self.trusted_by.is_empty()))
    }

    /// The names of [`SigningStatus::wire`]'s fields, in the order they are shown.
    pub const FIELDS: [&'static str; 14] = [
        "signing",
        "key",
        "cert",
        "subject",
        "key id",
        "serial",
        "not after",
        "hash",
        "error",
        "trusted by",
        "lockdown",
        "sig_enforce",
        "secure boot",
        "signatures enforced",
    ];

    /// The status as text fields (the D-Bus `Signing` property), named as in [`SigningStatus::FIELDS`].
    pub fn wire(&self) -> std::collections::BTreeMap<String, String> {
        let mut m = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_owned(), v);
        };
        let opt = |b: Option<bool>, yes: &str, no: &str| match b {
            Some(true) => yes.to_owned(),
            Some(false) => no.to_owned(),
            None => "unknown".to_owned(),
        };
        if self.configured {
            put("signing", "on".to_owned());
            if let Some(k) = &self.key {
                put("key", k.display().to_string());
            }
            if let Some(c) = &self.cert {
                put("cert", c.path.display().to_string());
                put("subject", c.subject.clone());
                if let Some(id) = &c.subject_key_id {
                    put("key id", id.clone());
                }
                put("serial", c.serial.clone());
                put("not after", c.not_after.clone());
            }
            if let Some(h) = &self.hash {
                put("hash", h.clone());
            }
            if let Some(e) = &self.error {
                put("error", e.clone());
            }
            put(
                "trusted by",
                match (&self.kernel.keyring_error, self.trusted_by.is_empty()) {
                    (Some(e), true) => format!("unknown ({e})"),
                    (_, true) => "none".to_owned(),
                    (_, false) => self.trusted_by.join(", "),
                },
            );
        } else {
            put(
                "signing",
                "off ([signing] is not set in kvcd.toml; modules are staged as they come)"
                    .to_owned(),
            );
        }
        put(
            "lockdown",
            self.kernel
                .lockdown
                .clone()
                .unwrap_or_else(|| "unknown".to_owned()),
        );
        put("sig_enforce", opt(self.kernel.sig_enforce, "yes", "no"));
        put("secure boot", opt(self.kernel.secure_boot, "on", "off"));
        put("signatures enforced", self.enforced.clone());
        m
    }

    /// Human lines, `field: value`, of a wire form (unknown fields last).
    pub fn lines_of(wire: &std::collections::BTreeMap<String, String>) -> Vec<String> {
        let known = Self::FIELDS
            .iter()
            .filter_map(|k| wire.get(*k).map(|v| format!("{k}: {v}")));
        let unknown = wire
            .iter()
            .filter(|(k, _)| !Self::FIELDS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}: {v}"));
        known.chain(unknown).collect()
    }
}
