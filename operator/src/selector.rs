//! Kubernetes label selectors in their string form (`kubectl get -l`), as the ConfigMap's `nodeSelector` holds
//! them: `disktype=ssd`, `zone in (a, b)`, `!spot`, `tier!=batch,env` (requirements joined by commas, all must
//! hold). The empty string selects everything.

use std::collections::BTreeMap;
use std::fmt;

/// Longest label name (the part after an optional `prefix/`) and label value.
pub const MAX_LABEL_NAME_LEN: usize = 63;
/// Longest label key prefix (a DNS subdomain).
pub const MAX_LABEL_PREFIX_LEN: usize = 253;
/// Most requirements one selector may hold (a guard against pasted garbage).
pub const MAX_REQUIREMENTS: usize = 64;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value` (also true when the label is absent).
    NotEquals(String, String),
    /// `key in (a, b)`.
    In(String, Vec<String>),
    /// `key notin (a, b)` (also true when the label is absent).
    NotIn(String, Vec<String>),
    /// `key`: the label is present.
    Exists(String),
    /// `!key`: the label is absent.
    DoesNotExist(String),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// The selector that selects everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Parses the string form; the error says what is wrong and where.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(s)? {
            let part = part.trim();
            if part.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(format!("{s:?}: empty requirement (a stray comma?)"));
            }
            requirements.push(parse_requirement(part)?);
            if requirements.len() > MAX_REQUIREMENTS {
                return Err(format!("more than {MAX_REQUIREMENTS} requirements"));
            }
        }
        Ok(Self { requirements })
    }

    /// Whether a set of labels satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// The requirements, in the order given.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::Equals(k, v) => format!("{k}={v}"),
                Requirement::NotEquals(k, v) => format!("{k}!={v}"),
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Splits at commas outside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => {
                depth += 1;
                if depth > 1 {
                    return Err(format!("{s:?}: nested parentheses"));
                }
            }
            ')' => {
                depth = depth.checked_sub(1).ok_or_else(|| format!("{s:?}: ')' without '('"))?;
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("{s:?}: '(' without ')'"));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Requirement::DoesNotExist(key.to_string()));
    }
    for (op, make) in [
        ("!=", Requirement::NotEquals as fn(String, String) -> Requirement),
        ("==", Requirement::Equals),
        ("=", Requirement::Equals),
    ] {
        if let Some((k, v)) = part.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            check_key(k)?;
            check_value(v)?;
            return Ok(make(k.to_string(), v.to_string()));
        }
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let body = part[open + 1..].strip_suffix(')').ok_or_else(|| format!("{part:?}: text after ')'"))?;
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .map(|(k, op)| (k.trim(), op.trim()))
            .ok_or_else(|| format!("{part:?}: expected `key in (values)` or `key notin (values)`"))?;
        check_key(key)?;
        let mut values = Vec::new();
        for v in body.split(',') {
            let v = v.trim();
            check_value(v)?;
            values.push(v.to_string());
        }
        return match op {
            "in" => Ok(Requirement::In(key.to_string(), values)),
            "notin" => Ok(Requirement::NotIn(key.to_string(), values)),
            other => Err(format!("{part:?}: unknown operator {other:?} (use in or notin)")),
        };
    }
    check_key(part)?;
    Ok(Requirement::Exists(part.to_string()))
}

fn name_chars_ok(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if !is_dns_subdomain(p) || p.len() > MAX_LABEL_PREFIX_LEN {
            return Err(format!(
                "label key {key:?}: the prefix must be a DNS subdomain (lower case, digits, '-', '.')"
            ));
        }
    }
    if name.is_empty() || name.len() > MAX_LABEL_NAME_LEN || !name_chars_ok(name) {
        return Err(format!(
            "label key {key:?}: the name must be 1 to {MAX_LABEL_NAME_LEN} letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A label value: empty, or up to 63 letters, digits, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn check_value(v: &str) -> Result<(), String> {
    if v.is_empty() || (v.len() <= MAX_LABEL_NAME_LEN && name_chars_ok(v)) {
        Ok(())
    } else {
        Err(format!(
            "label value {v:?}: at most {MAX_LABEL_NAME_LEN} letters, digits, '-', '_' or '.', starting and ending \
             with a letter or digit"
        ))
    }
}

/// Lower-case DNS subdomain (RFC 1123): dot-separated labels of `a-z0-9-`, none starting or ending with `-`.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LABEL_PREFIX_LEN && s.split('.').all(is_dns_label)
}

/// Lower-case DNS label (RFC 1123): 1 to 63 of `a-z0-9-`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL_NAME_LEN
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_form_parses_and_matches() -> Result<(), String> {
        let node = labels(&[("disktype", "ssd"), ("topology.kubernetes.io/zone", "a")]);
        for (sel, want) in [
            ("", true),
            ("disktype=ssd", true),
            ("disktype==ssd", true),
            ("disktype!=ssd", false),
            ("disktype", true),
            ("!disktype", false),
            ("!spot", true),
            ("topology.kubernetes.io/zone in (a, b)", true),
            ("topology.kubernetes.io/zone notin (a,b)", false),
            ("tier notin (batch)", true),
            ("disktype=ssd, !spot, topology.kubernetes.io/zone in (a)", true),
            ("disktype=hdd,!spot", false),
        ] {
            assert_eq!(LabelSelector::parse(sel)?.matches(&node), want, "{sel}");
        }
        Ok(())
    }

    #[test]
    fn bad_selectors_say_why() {
        for bad in ["a=b,", "=x", "a in (b", "a in b)", "a foo (b)", "-a", "a=b c", "a/b/c=d", "Ab.C/x=y"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
