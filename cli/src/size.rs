//! Sizes with binary suffixes, as users type them: `10G`, `512M`, `4096`, `1.5T` is refused (whole numbers only).

/// Parses `N`, `NK`, `NM`, `NG`, `NT` (also with `iB`/`B`, any case) as bytes, powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size: use a whole number like 10G, 512M or 4096"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown size suffix {suffix:?}; use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn sizes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512mib"), Ok(512 << 20));
        assert!(parse_size("1.5T").unwrap_err().contains("size"));
        assert!(parse_size("10X").unwrap_err().contains("suffix"));
        assert!(parse_size("99999999999T").unwrap_err().contains("too large"));
    }
}
