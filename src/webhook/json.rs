//! A JSON tree that keeps what CMC sent: object members in their original order (duplicates
//! included) and numbers as their original text.
//!
//! `serde_json::Value` would reorder nothing only with `preserve_order`, and would round numbers
//! through `f64`/`u64` unless `arbitrary_precision` is switched on crate-wide. Both the message
//! body ("every field in its original order with its original values") and the message id
//! ("numbers exactly as they appear in the input") need the original text, so this module lets
//! `serde_json` do all the lexing through [`RawValue`] and only records the pieces.
//!
//! It also writes the two serialisations the service needs: compact JSON in original order for
//! message bodies, and the canonical form (sorted keys, minimal escaping) hashed into
//! `Nats-Msg-Id`. No I/O here.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// One JSON value, as received, borrowing from the text it was read from wherever it can:
/// numbers always, strings and member names unless they hold escapes. An entry of a dozen
/// fields then costs a few allocations instead of two per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    /// The number's literal text, exactly as in the input (`1`, `-0`, `1.50`, `2e3`).
    Number(&'a str),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Members<'a, Json<'a>>),
}

/// Deepest nesting of arrays and objects accepted inside an entry field. CMC's entries are
/// flat; 32 leaves room for structured `apiData`. `RawValue` scanning does not limit depth,
/// and building the tree recurses (each level re-reading its own text), so without a limit a
/// body of nested brackets could exhaust the stack, and a high one multiplies the work.
pub const MAX_DEPTH: usize = 32;

/// What one linear pass over a JSON text that `serde_json` has already validated tells
/// before anything is built from it: how deep its brackets nest (brackets inside strings do
/// not count) and, for an object, how many elements the arrays that are its members hold.
/// Lets a request nested too deep or holding too many entries be refused in time
/// proportional to its size, in one pass rather than one per limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    pub max_nesting: usize,
    pub member_array_elements: usize,
}

impl Shape {
    pub fn of(text: &str) -> Shape {
        let bytes = text.as_bytes();
        let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0usize);
        let mut elements = 0usize;
        // Whether the container at depth 2 is an array, and whether its first element is
        // still to come.
        let (mut in_array, mut expect_first) = (false, false);
        while i < bytes.len() {
            let b = bytes[i];
            match b {
                b' ' | b'\t' | b'\n' | b'\r' | b':' => {}
                b',' => elements += usize::from(depth == 2 && in_array),
                b']' | b'}' => {
                    if depth == 2 {
                        in_array = false;
                        expect_first = false;
                    }
                    depth = depth.saturating_sub(1);
                }
                _ => {
                    if expect_first && depth == 2 {
                        elements += 1;
                        expect_first = false;
                    }
                    match b {
                        b'"' => {
                            // Jump through the string: only a quote or a backslash can end or
                            // escape it.
                            i += 1;
                            while let Some(at) = memchr::memchr2(b'"', b'\\', &bytes[i..]) {
                                i += at;
                                if bytes[i] == b'\\' {
                                    i += 2;
                                } else {
                                    break;
                                }
                            }
                        }
                        b'[' | b'{' => {
                            depth += 1;
                            deepest = deepest.max(depth);
                            if depth == 2 {
                                in_array = b == b'[';
                                expect_first = in_array;
                            }
                        }
                        _ => {}
                    }
                }
            }
            i += 1;
        }
        Shape {
            max_nesting: deepest,
            member_array_elements: elements,
        }
    }
}

impl<'a> Json<'a> {
    /// Builds the tree of one raw value; the raw value has already been checked by `serde_json`.
    pub fn from_raw(raw: &'a RawValue) -> serde_json::Result<Json<'a>> {
        Self::from_raw_at(raw, 0)
    }

    fn from_raw_at(raw: &'a RawValue, depth: usize) -> serde_json::Result<Json<'a>> {
        use serde::de::{DeserializeSeed, Error};
        let text = raw.get();
        let first = text.as_bytes().first();
        if matches!(first, Some(b'{' | b'[')) && depth >= MAX_DEPTH {
            return Err(serde_json::Error::custom(format!(
                "nesting deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(match first {
            Some(b'{' | b'[') => {
                let mut de = serde_json::Deserializer::from_str(text);
                ContainerSeed { depth: depth + 1 }.deserialize(&mut de)?
            }
            // Most strings have no escapes: the validated text between the quotes is then the
            // value itself, and a second parse is not needed.
            Some(b'"') => match text.get(1..text.len() - 1) {
                Some(inner) if !inner.contains('\\') => Json::String(Cow::Borrowed(inner)),
                _ => Json::String(Cow::Owned(serde_json::from_str(text)?)),
            },
            Some(b't') => Json::Bool(true),
            Some(b'f') => Json::Bool(false),
            Some(b'n') => Json::Null,
            _ => Json::Number(text),
        })
    }

    /// A short name of the value's type, for error messages.
    pub fn kind(&self) -> &'static str {
        kind_of(self)
    }
}

fn kind_of(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// The type name of a raw value, judged by its first byte, for error messages.
pub fn raw_kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        de::DeserializeSeed::deserialize(ValueSeed { depth: 0 }, deserializer)
    }
}

/// One value at a known nesting depth.
struct ValueSeed {
    depth: usize,
}

impl<'de> de::DeserializeSeed<'de> for ValueSeed {
    type Value = Json<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Json<'de>, D::Error> {
        let raw: &'de RawValue = Deserialize::deserialize(deserializer)?;
        Json::from_raw_at(raw, self.depth).map_err(de::Error::custom)
    }
}

/// The members or elements of one object or array whose children sit at `depth`.
struct ContainerSeed {
    depth: usize,
}

impl<'de> de::DeserializeSeed<'de> for ContainerSeed {
    type Value = Json<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Json<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ContainerSeed {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = map.next_value_seed(ValueSeed { depth: self.depth })?;
            members.push((key, value));
        }
        Ok(Json::Object(Members(members)))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(8));
        while let Some(item) = seq.next_element_seed(ValueSeed { depth: self.depth })? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
}

/// A member name, borrowed from the input when it has no escapes.
struct KeySeed;

impl<'de> de::DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Reads the members of an object from JSON text that `serde_json` has already validated,
/// in one linear pass: what [`Members<Json>`]'s `Deserialize` builds (the same tree, strings
/// and names borrowed unless they hold escapes), without a `RawValue` and a second look at
/// every value. `None` when the text is not what a validated object looks like, or nests
/// deeper than [`MAX_DEPTH`]: the caller then reads it with `serde_json`, which says what is
/// wrong.
pub fn members_of_validated(text: &str) -> Option<Members<'_, Json<'_>>> {
    let mut scan = Scan { text, at: 0 };
    scan.ws();
    if scan.peek()? != b'{' {
        return None;
    }
    let members = scan.object_members(0)?;
    scan.ws();
    (scan.at == text.len()).then_some(members)
}

/// An element of the array [`member_array_validated`] reads: an object's members, or the kind
/// of the value found instead (`"a string"`, `"an array"`, …).
pub type Element<'a> = Result<Members<'a, Json<'a>>, &'static str>;

/// What JSON text that `serde_json` has already validated, holding an object, has under key
/// `name`, read in one pass: `Some(None)` when no such member, `Some(Some(Err(kind)))` when it
/// is not an array, else its elements. `None` leaves the text to `serde_json`, which says what
/// is wrong with it: a key given twice, an element nested deeper than [`MAX_DEPTH`], or text
/// that is not what a validated object looks like.
#[allow(clippy::type_complexity)]
pub fn member_array_validated<'a>(
    text: &'a str,
    name: &str,
) -> Option<Option<Result<Vec<Element<'a>>, &'static str>>> {
    let mut scan = Scan { text, at: 0 };
    scan.eat(b'{')?;
    let mut seen: std::collections::HashSet<Cow<'a, str>> = std::collections::HashSet::new();
    let mut found = None;
    scan.ws();
    if scan.peek()? == b'}' {
        scan.at += 1;
    } else {
        loop {
            scan.ws();
            let key = scan.string()?;
            scan.eat(b':')?;
            scan.ws();
            if key == name {
                found = Some(if scan.peek()? == b'[' {
                    Ok(scan.elements()?)
                } else {
                    Err(scan.skip_kind()?)
                });
            } else {
                scan.skip_value()?;
            }
            if !seen.insert(key) {
                return None;
            }
            scan.ws();
            match scan.peek()? {
                b',' => scan.at += 1,
                b'}' => {
                    scan.at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    scan.ws();
    (scan.at == text.len()).then_some(found)
}

/// A cursor over validated JSON text.
struct Scan<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.ws();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// The members of the object whose `{` is at the cursor; its values sit at `depth`.
    fn object_members(&mut self, depth: usize) -> Option<Members<'a, Json<'a>>> {
        self.eat(b'{')?;
        let mut members = Vec::with_capacity(16);
        self.ws();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(Members(members));
        }
        loop {
            self.ws();
            let key = self.string()?;
            self.eat(b':')?;
            let value = self.value(depth)?;
            members.push((key, value));
            self.ws();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(Members(members));
                }
                _ => return None,
            }
        }
    }

    /// The string whose opening quote is at the cursor: the text between the quotes when it
    /// has no escapes, else what `serde_json` decodes it to.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.at;
        let escaped = self.skip_string()?;
        if escaped {
            serde_json::from_str(&self.text[start..self.at])
                .ok()
                .map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(&self.text[start + 1..self.at - 1]))
        }
    }

    /// Moves past the string whose opening quote is at the cursor; whether it holds escapes.
    fn skip_string(&mut self) -> Option<bool> {
        let bytes = self.text.as_bytes();
        if self.peek()? != b'"' {
            return None;
        }
        let mut i = self.at + 1;
        let mut escaped = false;
        loop {
            // Only a quote or a backslash can end or escape a string.
            i += memchr::memchr2(b'"', b'\\', bytes.get(i..)?)?;
            if bytes[i] == b'"' {
                break;
            }
            escaped = true;
            i += 2;
        }
        self.at = i + 1;
        Some(escaped)
    }

    /// Moves past the value at the cursor without building it.
    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.skip_string().map(drop),
            b'{' | b'[' => {
                let bytes = self.text.as_bytes();
                let mut depth = 0usize;
                loop {
                    match *bytes.get(self.at)? {
                        b'"' => {
                            self.skip_string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => self.value(0).map(drop),
        }
    }

    /// The kind of the value at the cursor (named as in error messages), moving past it.
    fn skip_kind(&mut self) -> Option<&'static str> {
        self.ws();
        let kind = match self.peek()? {
            b'{' => "an object",
            b'[' => "an array",
            b'"' => "a string",
            b't' | b'f' => "a boolean",
            b'n' => "null",
            _ => "a number",
        };
        self.skip_value()?;
        Some(kind)
    }

    /// The elements of the array whose `[` is at the cursor: each object's members, or the
    /// kind of a value that is not an object.
    fn elements(&mut self) -> Option<Vec<Element<'a>>> {
        self.eat(b'[')?;
        let mut items = Vec::with_capacity(16);
        self.ws();
        if self.peek()? == b']' {
            self.at += 1;
            return Some(items);
        }
        loop {
            self.ws();
            let item = match self.peek()? {
                b'{' => Ok(self.object_members(0)?),
                _ => Err(self.skip_kind()?),
            };
            items.push(item);
            self.ws();
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(items);
                }
                _ => return None,
            }
        }
    }

    /// The value at the cursor, inside containers `depth` deep.
    fn value(&mut self, depth: usize) -> Option<Json<'a>> {
        self.ws();
        let first = self.peek()?;
        if matches!(first, b'{' | b'[') && depth >= MAX_DEPTH {
            return None;
        }
        Some(match first {
            b'"' => Json::String(self.string()?),
            b'{' => Json::Object(self.object_members(depth + 1)?),
            b'[' => {
                self.at += 1;
                let mut items = Vec::with_capacity(8);
                self.ws();
                if self.peek()? == b']' {
                    self.at += 1;
                } else {
                    loop {
                        items.push(self.value(depth + 1)?);
                        self.ws();
                        match self.peek()? {
                            b',' => self.at += 1,
                            b']' => {
                                self.at += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
                Json::Array(items)
            }
            b't' => self.literal("true", Json::Bool(true))?,
            b'f' => self.literal("false", Json::Bool(false))?,
            b'n' => self.literal("null", Json::Null)?,
            b'-' | b'0'..=b'9' => {
                let start = self.at;
                while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = self.peek() {
                    self.at += 1;
                }
                Json::Number(&self.text[start..self.at])
            }
            _ => return None,
        })
    }

    fn literal(&mut self, word: &str, value: Json<'a>) -> Option<Json<'a>> {
        self.text[self.at..].starts_with(word).then(|| {
            self.at += word.len();
            value
        })
    }
}

/// The members of a JSON object in their original order, duplicates kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Members<'a, V>(pub Vec<(Cow<'a, str>, V)>);

impl<V> Members<'_, V> {
    /// The first key that appears more than once, if any.
    pub fn first_duplicate(&self) -> Option<&str> {
        let mut keys: Vec<&str> = self.0.iter().map(|(k, _)| k.as_ref()).collect();
        keys.sort_unstable();
        keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    }

    /// The value of the first member called `key`.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<'de, V: Deserialize<'de>> Members<'de, V> {
    /// Collects the members of a map being deserialised.
    pub(crate) fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
        while let Some(key) = map.next_key_seed(KeySeed)? {
            members.push((key, map.next_value::<V>()?));
        }
        Ok(Members(members))
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Members<'de, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor<V>(std::marker::PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for MembersVisitor<V> {
            type Value = Members<'de, V>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Members::from_map(map)
            }
        }

        deserializer.deserialize_map(MembersVisitor(std::marker::PhantomData))
    }
}

/// Bytes that must be escaped inside a JSON string: control characters, `"` and `\`.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Whether any byte of `bytes` must be escaped in a JSON string (see [`NEEDS_ESCAPE`]),
/// checked eight bytes at a time: whether a word holds a byte below 0x20, a `"` or a `\`
/// is three subtractions and masks (the classic "has a zero byte" test, exact as a yes or
/// no), where a byte-by-byte check of the short strings of an entry cost twice as much.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGHS;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        if below(x, 0x20) | below(x ^ (ONES * 0x22), 1) | below(x ^ (ONES * 0x5c), 1) != 0 {
            return true;
        }
    }
    words.remainder().iter().any(|&b| NEEDS_ESCAPE[b as usize])
}

/// Writes `s` as a JSON string with only `"`, `\` and control characters escaped
/// (`\b \f \n \r \t`, others as `\u00xx` in lowercase hex); everything else raw.
pub fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Most strings need no escaping.
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !NEEDS_ESCAPE[b as usize] {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Writes `value` as compact JSON, members in their original order.
pub fn write_compact(out: &mut Vec<u8>, value: &Json<'_>) {
    write_value(out, value, false);
}

/// Writes `value` in canonical form: object keys sorted by their UTF-8 bytes at every level,
/// no whitespace, minimal string escaping, numbers as received.
pub fn write_canonical(out: &mut Vec<u8>, value: &Json<'_>) {
    write_value(out, value, true);
}

fn write_value(out: &mut Vec<u8>, value: &Json<'_>, sorted: bool) {
    match value {
        Json::Null => out.extend_from_slice(b"null"),
        Json::Bool(true) => out.extend_from_slice(b"true"),
        Json::Bool(false) => out.extend_from_slice(b"false"),
        Json::Number(n) => out.extend_from_slice(n.as_bytes()),
        Json::String(s) => write_string(out, s),
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, sorted);
            }
            out.push(b']');
        }
        Json::Object(members) => write_members(out, members.0.iter(), sorted),
    }
}

/// Writes the members of an object in canonical form (see [`write_canonical`]), taking them
/// in `order`: a permutation that sorts their keys by bytes (stable for duplicates).
pub fn write_canonical_members_in(
    out: &mut Vec<u8>,
    members: &Members<'_, Json<'_>>,
    order: &[usize],
) {
    out.push(b'{');
    for (n, &i) in order.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        let (key, value) = &members.0[i];
        write_string(out, key);
        out.push(b':');
        write_canonical(out, value);
    }
    out.push(b'}');
}

/// Writes an object made of `members`, sorted by key when `sorted` (a stable sort, so
/// duplicate keys keep their relative order and the output stays deterministic).
pub fn write_members<'b, 'a: 'b>(
    out: &mut Vec<u8>,
    members: impl Iterator<Item = &'b (Cow<'a, str>, Json<'a>)>,
    sorted: bool,
) {
    let mut members: Vec<&(Cow<'a, str>, Json<'a>)> = members.collect();
    if sorted {
        members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    }
    out.push(b'{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, key);
        out.push(b':');
        write_value(out, value, sorted);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Json<'_> {
        serde_json::from_str(text).unwrap()
    }

    fn canonical(text: &str) -> String {
        let mut out = Vec::new();
        write_canonical(&mut out, &parse(text));
        String::from_utf8(out).unwrap()
    }

    fn compact(text: &str) -> String {
        let mut out = Vec::new();
        write_compact(&mut out, &parse(text));
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_keep_their_text() {
        assert_eq!(
            compact(r#"[1, -0, 1.50, 2e3, 12345678901234567890123]"#),
            "[1,-0,1.50,2e3,12345678901234567890123]"
        );
    }

    #[test]
    fn canonical_sorts_keys_at_every_level_by_bytes() {
        assert_eq!(
            canonical(r#"{"b": {"z": 1, "a": 2}, "a": [ {"y":1,"x":2} ], "B": null, "é": 1}"#),
            r#"{"B":null,"a":[{"x":2,"y":1}],"b":{"a":2,"z":1},"é":1}"#
        );
    }

    #[test]
    fn compact_keeps_original_order_and_duplicates() {
        assert_eq!(
            compact(r#"{"b":1, "a":2, "b":3}"#),
            r#"{"b":1,"a":2,"b":3}"#
        );
    }

    #[test]
    fn strings_are_escaped_minimally() {
        assert_eq!(
            canonical(r#""\u003Cid@x\u003E \" \\ \/ \b\f\n\r\t \u0001 \u001F \u007f 本""#),
            "\"<id@x> \\\" \\\\ / \\b\\f\\n\\r\\t \\u0001 \\u001f \u{7f} 本\""
        );
    }

    #[test]
    fn duplicates_are_found() {
        let m: Members<Json> = serde_json::from_str(r#"{"a":1,"b":2,"a":3}"#).unwrap();
        assert_eq!(m.first_duplicate(), Some("a"));
        let m: Members<Json> = serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap();
        assert_eq!(m.first_duplicate(), None);
    }

    #[test]
    fn nesting_is_limited_without_exhausting_the_stack() {
        let deep = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
        assert!(serde_json::from_str::<Members<Json>>(&deep(MAX_DEPTH)).is_ok());
        let err = serde_json::from_str::<Members<Json>>(&deep(MAX_DEPTH + 1)).unwrap_err();
        assert!(err.to_string().contains("nesting"), "{err}");
        // Far deeper than any stack could recurse: refused, not a crash.
        assert!(serde_json::from_str::<Members<Json>>(&deep(100_000)).is_err());
    }

    #[test]
    fn nesting_is_measured_outside_strings() {
        let depth = |text| Shape::of(text).max_nesting;
        assert_eq!(depth(r#"{"a":[1,{"b":[]}]}"#), 4);
        assert_eq!(depth(r#"{"a":"[[[[\"{{"}"#), 1);
        assert_eq!(depth("1"), 0);
    }

    #[test]
    fn member_array_elements_are_counted_without_parsing() {
        let count = |text: &str| Shape::of(text).member_array_elements;
        assert_eq!(count(r#"{"deliveries":[]}"#), 0);
        assert_eq!(count(r#"{"deliveries":[ ]}"#), 0);
        assert_eq!(count(r#"{"deliveries":[{"a":1}]}"#), 1);
        assert_eq!(
            count(r#"{"deliveries":[{"a":[1,2,3],"b":{"c":","}},{"s":"x\",]"}, 7]}"#),
            3
        );
        assert_eq!(count(r#"{"x":"[1,2]","deliveries":[1,2]}"#), 2);
        assert_eq!(count(r#"{"a":[1],"b":{"c":[1,2]},"d":[ "x" , null ]}"#), 3);
        let many: Vec<String> = (0..1000)
            .map(|i| format!(r#"{{"status":"q","i":{i}}}"#))
            .collect();
        assert_eq!(
            count(&format!(r#"{{"deliveries":[{}]}}"#, many.join(","))),
            1000
        );
    }

    mod one_pass {
        use super::super::*;
        use proptest::prelude::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                "\\PC{0,10}".prop_map(|s| serde_json::to_string(&s).unwrap()),
                "[a-z\"\\\\/\\x00-\\x1f\u{e9}\u{672c}]{0,8}"
                    .prop_map(|s| serde_json::to_string(&s).unwrap()),
                Just(r#""\u003Cid@x\u003E \/ \ud83d\ude00""#.to_owned()),
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                text(),
                prop_oneof!["-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,2})?"],
                Just("null".to_owned()),
                Just("true".to_owned()),
                Just("false".to_owned()),
            ];
            leaf.prop_recursive(4, 24, 5, |inner| {
                prop_oneof![
                    prop::collection::vec((inner.clone(), "[ \t\r\n]{0,2}"), 0..5).prop_map(
                        |items| {
                            let items: Vec<String> = items
                                .into_iter()
                                .map(|(v, w)| format!("{w}{v}{w}"))
                                .collect();
                            format!("[{}]", items.join(","))
                        }
                    ),
                    object(inner),
                ]
            })
        }

        fn object(inner: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
            prop::collection::vec((text(), inner, "[ \n]{0,2}"), 0..6).prop_map(|members| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(k, v, w)| format!("{w}{k}{w}:{w}{v}{w}"))
                    .collect();
                format!("{{{}}}", members.join(","))
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]
            /// The one-pass reader builds exactly the tree `serde_json` builds.
            #[test]
            fn reads_what_serde_reads(text in object(value()), pad in "[ \n]{0,2}") {
                let text = format!("{pad}{text}{pad}");
                let by_serde: Members<Json> = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(members_of_validated(&text), Some(by_serde));
            }
        }

        #[test]
        fn too_deep_is_left_to_serde() {
            let deep = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
            assert!(members_of_validated(&deep(MAX_DEPTH)).is_some());
            assert!(members_of_validated(&deep(MAX_DEPTH + 1)).is_none());
            assert_eq!(
                members_of_validated(&deep(MAX_DEPTH)),
                serde_json::from_str::<Members<Json>>(&deep(MAX_DEPTH)).ok()
            );
        }
    }

    mod escaping {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]
            /// Strings are escaped exactly as `serde_json` escapes them (SPEC §2's canonical
            /// JSON: `"`, `\` and control characters only, `\u00xx` in lowercase hex).
            #[test]
            fn write_string_is_serde_json(s in prop_oneof![
                "\\PC{0,40}",
                "[\\x00-\\x1f\"\\\\ a\u{7f}\u{80}\u{e9}\u{672c}\u{1F600}]{0,40}",
                ".{0,40}",
            ]) {
                let mut out = Vec::new();
                write_string(&mut out, &s);
                prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
            }

            #[test]
            fn needs_escape_is_the_table(bytes in prop::collection::vec(
                prop_oneof![any::<u8>(), 0x20u8..0x7f, Just(b'"'), Just(b'\\'), Just(0x1f), Just(0x20)],
                0..40,
            )) {
                prop_assert_eq!(needs_escape(&bytes), bytes.iter().any(|&b| NEEDS_ESCAPE[b as usize]));
            }
        }
    }

    #[test]
    fn kinds_are_named() {
        for (text, kind) in [
            ("null", "null"),
            ("true", "a boolean"),
            ("1", "a number"),
            ("\"x\"", "a string"),
            ("[]", "an array"),
            ("{}", "an object"),
        ] {
            assert_eq!(parse(text).kind(), kind);
            let raw: &RawValue = serde_json::from_str(text).unwrap();
            assert_eq!(raw_kind(raw), kind);
        }
    }
}
