//! The few DER encodings a module signature needs (writing a PKCS#7
//! SignedData) and a reader that walks one (finding its signer).

use anyhow::{Result, bail};

/// Tag of a SEQUENCE.
pub(crate) const SEQUENCE: u8 = 0x30;
/// Tag of a SET.
pub(crate) const SET: u8 = 0x31;
/// Tag of an INTEGER.
pub(crate) const INTEGER: u8 = 0x02;
/// Tag of an OCTET STRING.
pub(crate) const OCTET_STRING: u8 = 0x04;
/// Tag of an OBJECT IDENTIFIER.
pub(crate) const OID: u8 = 0x06;
/// Tag of a NULL.
pub(crate) const NULL: u8 = 0x05;
/// Tag of `[0]`, constructed (an explicit context tag).
pub(crate) const CONTEXT_0: u8 = 0xa0;
/// Tag of `[1]`, constructed.
pub(crate) const CONTEXT_1: u8 = 0xa1;
/// Tag of `[0]`, primitive (an implicit OCTET STRING).
pub(crate) const CONTEXT_0_PRIMITIVE: u8 = 0x80;

/// One element: tag, length, content.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        // Fits in the short form.
        out.push(u8::try_from(len).unwrap_or(0));
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        let n = bytes.len() - skip;
        out.push(0x80 | u8::try_from(n).unwrap_or(0));
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A constructed element whose content is `parts` in order.
pub(crate) fn constructed(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    tlv(tag, &parts.concat())
}

/// The content octets of a non-negative INTEGER given as big-endian magnitude.
pub(crate) fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    let skip = magnitude.iter().take_while(|&&b| b == 0).count();
    let m = &magnitude[skip..];
    let mut content = Vec::with_capacity(m.len() + 1);
    if m.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(m);
    tlv(INTEGER, &content)
}

/// An element read from DER: its tag, its content, and its whole encoding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Element<'a> {
    /// The tag byte (only single-byte tags are read).
    pub(crate) tag: u8,
    /// The content octets.
    pub(crate) content: &'a [u8],
    /// Tag, length and content.
    pub(crate) raw: &'a [u8],
}

/// Reads the elements of a constructed content one after another.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    /// True when every element was read.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next element, if any is left; an error when it is malformed.
    pub(crate) fn next_element(&mut self) -> Result<Option<Element<'a>>> {
        let data = self.rest;
        let Some((&tag, after)) = data.split_first() else {
            return Ok(None);
        };
        if tag & 0x1f == 0x1f {
            bail!("multi-byte DER tags are not used in module signatures");
        }
        let Some((&first, after)) = after.split_first() else {
            bail!("DER element truncated in its length");
        };
        let (len, after) = if first < 0x80 {
            (usize::from(first), after)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || after.len() < n {
                bail!("DER element has a bad length of {n} octets");
            }
            let len = after[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &after[n..])
        };
        if after.len() < len {
            bail!(
                "DER element of {len} bytes runs past its end ({} left)",
                after.len()
            );
        }
        let header = data.len() - after.len();
        let raw = &data[..header + len];
        self.rest = &after[len..];
        Ok(Some(Element {
            tag,
            content: &after[..len],
            raw,
        }))
    }

    /// The next element, which must have `tag`.
    pub(crate) fn expect(&mut self, tag: u8, what: &str) -> Result<Element<'a>> {
        match self.next_element()? {
            Some(e) if e.tag == tag => Ok(e),
            Some(e) => bail!("{what}: expected tag {tag:#04x}, found {:#04x}", e.tag),
            None => bail!("{what}: missing"),
        }
    }

    /// The next element if it has `tag` (else nothing is consumed).
    pub(crate) fn optional(&mut self, tag: u8) -> Result<Option<Element<'a>>> {
        if self.rest.first() == Some(&tag) {
            return self.next_element();
        }
        Ok(None)
    }
}

/// Dotted text of an OBJECT IDENTIFIER's content octets.
pub(crate) fn oid_text(content: &[u8]) -> String {
    let mut parts: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for &b in content {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (acc / 40).min(2);
                parts.push(first);
                parts.push(acc - first * 40);
            } else {
                parts.push(acc);
            }
            acc = 0;
        }
    }
    parts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_short_and_long_forms() {
        assert_eq!(tlv(OCTET_STRING, &[1, 2]), vec![4, 2, 1, 2]);
        let long = tlv(OCTET_STRING, &[0u8; 200]);
        assert_eq!(&long[..3], &[4, 0x81, 200]);
        let longer = tlv(OCTET_STRING, &[0u8; 300]);
        assert_eq!(&longer[..4], &[4, 0x82, 1, 44]);
        let mut r = Reader::new(&longer);
        let e = r.next_element().unwrap().unwrap();
        assert_eq!(e.content.len(), 300);
        assert!(r.is_empty());
    }

    #[test]
    fn integers_are_positive_and_minimal() {
        assert_eq!(unsigned_integer(&[0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(unsigned_integer(&[0, 0, 5]), vec![2, 1, 5]);
        assert_eq!(unsigned_integer(&[]), vec![2, 1, 0]);
    }

    #[test]
    fn truncated_and_overlong_elements_are_errors() {
        assert!(Reader::new(&[0x30]).next_element().is_err());
        assert!(Reader::new(&[0x30, 5, 1]).next_element().is_err());
        assert!(
            Reader::new(&[0x30, 0x85, 1, 1, 1, 1, 1])
                .next_element()
                .is_err()
        );
        assert!(Reader::new(&[0x1f, 1, 0]).next_element().is_err());
    }

    #[test]
    fn oids_read_as_dotted_text() {
        let sha256 = [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
        assert_eq!(oid_text(&sha256), "2.16.840.1.101.3.4.2.1");
        assert_eq!(oid_text(&[0x55, 0x04, 0x03]), "2.5.4.3");
    }
}
