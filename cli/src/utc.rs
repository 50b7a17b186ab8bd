//! Calendar fields of a Unix time in UTC (proleptic Gregorian; H. Hinnant's days-to-civil algorithm), for the
//! client's times and the syslog timestamps, without a date-time crate.

/// A UTC date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// The UTC calendar fields of `secs` seconds since the Unix epoch.
pub fn utc(secs: u64) -> Utc {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    Utc {
        year: yoe + era * 400 + i64::from(month <= 2),
        month: month as u32,
        day: day as u32,
        hour: (rem / 3_600) as u32,
        minute: (rem % 3_600 / 60) as u32,
        second: (rem % 60) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_fields() {
        assert_eq!(utc(0), Utc { year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0 });
        assert_eq!(utc(951_782_400), Utc { year: 2000, month: 2, day: 29, hour: 0, minute: 0, second: 0 });
        assert_eq!(utc(1_796_165_130), Utc { year: 2026, month: 12, day: 1, hour: 22, minute: 45, second: 30 });
    }
}
