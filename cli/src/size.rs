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

/// Bytes for people: `10 GiB`, `1.5 MiB`, `512 B` (powers of 1024, one decimal when not whole).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u64 << (10 * unit);
    if bytes % scale == 0 {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_for_people() {
        assert_eq!(super::format_size(0), "0 B");
        assert_eq!(super::format_size(512), "512 B");
        assert_eq!(super::format_size(10 << 30), "10 GiB");
        assert_eq!(super::format_size(3 << 19), "1.5 MiB");
    }

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
