//! Attachment filenames as CMC sends them, decoded to readable text.
//!
//! Pure. A part's `filename` may be an RFC 2047 encoded word (`=?UTF-8?B?55S75YOPMS5qcGc=?=`,
//! decoded with the `rfc2047-decoder` crate) or an RFC 2231 / RFC 5987 extended parameter
//! (`filename*=UTF-8''%E7%94%BB%E5%83%8F1.jpg`, also split into `filename*0*=…; filename*1*=…`
//! continuations), or a plain name. The extended form wins when both are given (RFC 6266).
//! A name that cannot be decoded is kept as sent rather than refusing the mail.

use percent_encoding::percent_decode;

/// The readable filename of a part, from its raw `Content-Disposition` value and the plain
/// `filename` parameter (as multer extracted it), if any.
pub fn decode_filename(content_disposition: Option<&[u8]>, plain: Option<&str>) -> Option<String> {
    if let Some(extended) = content_disposition.and_then(extended_filename) {
        return Some(extended);
    }
    plain.map(decode_rfc2047)
}

/// Decodes RFC 2047 encoded words; text without any is returned as is.
pub fn decode_rfc2047(value: &str) -> String {
    if !value.contains("=?") {
        return value.to_owned();
    }
    rfc2047_decoder::decode(value.as_bytes()).unwrap_or_else(|_| value.to_owned())
}

/// The `filename*` parameter (RFC 2231 §4 and its §3 continuations), decoded.
fn extended_filename(header: &[u8]) -> Option<String> {
    let header = String::from_utf8_lossy(header);
    let mut whole: Option<String> = None;
    let mut pieces: Vec<(u32, bool, String)> = Vec::new();
    for param in split_params(&header) {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        let value = unquote(value.trim());
        if name == "filename*" {
            whole = Some(value);
        } else if let Some(rest) = name.strip_prefix("filename*") {
            let (index, encoded) = match rest.strip_suffix('*') {
                Some(i) => (i, true),
                None => (rest, false),
            };
            if let Ok(index) = index.parse::<u32>() {
                pieces.push((index, encoded, value));
            }
        }
    }
    if let Some(value) = whole {
        return decode_ext_value(&value);
    }
    if pieces.is_empty() {
        return None;
    }
    pieces.sort_by_key(|(i, _, _)| *i);
    // The charset is named in the first piece only; later encoded pieces are bare
    // percent-encoding, unencoded pieces are literal.
    let mut charset = "utf-8".to_owned();
    let mut bytes = Vec::new();
    for (n, (_, encoded, value)) in pieces.iter().enumerate() {
        if !encoded {
            bytes.extend_from_slice(value.as_bytes());
            continue;
        }
        let mut data = value.as_str();
        if n == 0 {
            let mut parts = value.splitn(3, '\'');
            if let (Some(cs), Some(_lang), Some(rest)) = (parts.next(), parts.next(), parts.next())
            {
                charset = cs.to_owned();
                data = rest;
            }
        }
        bytes.extend(percent_decode(data.as_bytes()));
    }
    Some(decode_charset(&charset, &bytes))
}

/// `charset'language'percent-encoded` (RFC 5987 ext-value).
fn decode_ext_value(value: &str) -> Option<String> {
    let mut parts = value.splitn(3, '\'');
    let (charset, _lang, data) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes: Vec<u8> = percent_decode(data.as_bytes()).collect();
    Some(decode_charset(charset, &bytes))
}

fn decode_charset(charset: &str, bytes: &[u8]) -> String {
    let charset = if charset.is_empty() { "utf-8" } else { charset };
    match encoding_rs::Encoding::for_label(charset.as_bytes()) {
        Some(encoding) => encoding.decode_without_bom_handling(bytes).0.into_owned(),
        None => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Splits a header value at the semicolons that are not inside quotes.
fn split_params(header: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in header.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&header[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&header[start..]);
    out
}

fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        out.push(next);
                    }
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2047_base64_and_quoted_printable_names_are_decoded() {
        assert_eq!(decode_rfc2047("=?UTF-8?B?55S75YOPMS5qcGc=?="), "画像1.jpg");
        assert_eq!(
            decode_rfc2047("=?UTF-8?Q?=E7=94=BB=E5=83=8F1.jpg?="),
            "画像1.jpg"
        );
        assert_eq!(
            decode_rfc2047("=?ISO-2022-JP?B?GyRCMmhBfBsoQg==?=.png"),
            "画像.png"
        );
        assert_eq!(decode_rfc2047("report.pdf"), "report.pdf");
        // Not decodable: kept as sent.
        assert_eq!(decode_rfc2047("=?bogus"), "=?bogus");
    }

    #[test]
    fn rfc2231_extended_names_win_over_the_plain_one() {
        let cd = b"form-data; name=\"attachment1\"; filename=\"fallback.jpg\"; filename*=UTF-8''%E7%94%BB%E5%83%8F1.jpg";
        assert_eq!(
            decode_filename(Some(cd), Some("fallback.jpg")).as_deref(),
            Some("画像1.jpg")
        );
        let cont = b"form-data; name=\"a\"; filename*0*=UTF-8''%E7%94%BB; filename*1*=%E5%83%8F; filename*2=\"1.jpg\"";
        assert_eq!(
            decode_filename(Some(cont), None).as_deref(),
            Some("画像1.jpg")
        );
        let sjis = b"form-data; name=\"a\"; filename*=Shift_JIS'ja'%89%E6%91%9C.txt";
        assert_eq!(
            decode_filename(Some(sjis), None).as_deref(),
            Some("画像.txt")
        );
    }

    #[test]
    fn plain_and_missing_names() {
        let cd = b"form-data; name=\"attachment2\"; filename=\"report.pdf\"";
        assert_eq!(
            decode_filename(Some(cd), Some("report.pdf")).as_deref(),
            Some("report.pdf")
        );
        assert_eq!(decode_filename(Some(b"form-data; name=\"x\""), None), None);
        assert_eq!(
            decode_filename(None, Some("=?UTF-8?B?55S75YOPMS5qcGc=?=")).as_deref(),
            Some("画像1.jpg")
        );
    }

    proptest::proptest! {
        /// Whatever a sender puts in Content-Disposition, decoding returns a name (or none)
        /// without panicking, and a plain ASCII name without `=?` comes back unchanged.
        #[test]
        fn decoding_never_panics(header in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
                                 plain in "[A-Za-z0-9._ -]{0,40}") {
            let _ = decode_filename(Some(&header), Some(&plain));
            proptest::prop_assert_eq!(decode_filename(None, Some(&plain)), Some(plain.clone()));
        }
    }
}
