//! fio's number syntax: sizes with binary suffixes (`4k`, `128K`, `1m`, `2GiB`), block-size ranges
//! (`4k-128k`), durations with a unit (`10`, `10s`, `500ms`, `2m`) and fio's 0/1 booleans.
//!
//! fio's default `kb_base=1024` is the only base understood: `k`, `K`, `KiB` and `KB` all mean 1024.
//! A bare duration is in seconds, as for fio's `runtime` and `ramp_time`.
//! Every parser returns a [`UnitError`] naming the text that did not parse, so clap and the job-file
//! reader can show it next to the option it came from.

use std::time::Duration;

/// A value the user typed could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a number with an optional size suffix.
    #[error("`{0}` is not a size: write a number with an optional k/m/g/t suffix, e.g. 4k or 1g")]
    BadSize(String),
    /// Not `MIN-MAX` with MIN <= MAX.
    #[error("`{0}` is not a block-size range: write MIN-MAX with MIN <= MAX, e.g. 4k-128k")]
    BadRange(String),
    /// Not a number with an optional time unit.
    #[error("`{0}` is not a duration: write a number of seconds or add a unit (us, ms, s, m, h), e.g. 10s")]
    BadDuration(String),
    /// Not a `SIZE/PCT:...` block-size split adding up to 100%.
    #[error("`{0}` is not a bssplit: write SIZE/PERCENT entries joined by `:` adding up to 100, e.g. 4k/80:64k/20")]
    BadSplit(String),
    /// Not `N` or `R,W`.
    #[error("`{0}` is not a rate: write a number (k/m suffixes allowed) or READ,WRITE")]
    BadRate(String),
    /// Not one of fio's boolean spellings.
    #[error("`{0}` is not a boolean: write 1 or 0 (true/false, yes/no, on/off also work)")]
    BadBool(String),
}

/// Splits `text` into its leading decimal digits and the rest, after trimming blanks.
fn split_number(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits_end == 0 {
        return None;
    }
    let number = text[..digits_end].parse::<u64>().ok()?;
    Some((number, text[digits_end..].trim()))
}

/// Parses a byte count in fio's syntax: `4096`, `4k`, `4K`, `4KiB`, `1m`, `2g`, `1t`, `1p`.
///
/// # Example
/// ```
/// assert_eq!(tpio::units::parse_size("128k"), Ok(131072));
/// ```
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::BadSize(text.to_string());
    let (number, suffix) = split_number(text).ok_or_else(bad)?;
    let lower = suffix.to_ascii_lowercase();
    let shift = match lower.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(bad()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// An inclusive range of block sizes, from fio's `bsrange=MIN-MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRange {
    /// Smallest block in bytes.
    pub min: u64,
    /// Largest block in bytes.
    pub max: u64,
}

/// Parses `MIN-MAX` (each a size as in [`parse_size`]) with MIN <= MAX.
pub fn parse_size_range(text: &str) -> Result<SizeRange, UnitError> {
    let bad = || UnitError::BadRange(text.to_string());
    let (low, high) = text.split_once('-').ok_or_else(bad)?;
    let min = parse_size(low).map_err(|_| bad())?;
    let max = parse_size(high).map_err(|_| bad())?;
    if min == 0 || min > max {
        return Err(bad());
    }
    Ok(SizeRange { min, max })
}

/// A size, or a share of the target's capacity (`size=50%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeOrPercent {
    /// Bytes.
    Bytes(u64),
    /// Percent of the capacity, in (0, 100].
    Percent(f64),
}

/// Parses `size`: a size as in [`parse_size`] or `N%` with 0 < N <= 100.
pub fn parse_size_or_percent(text: &str) -> Result<SizeOrPercent, UnitError> {
    match text.trim().strip_suffix('%') {
        Some(number) => {
            let percent: f64 = number
                .trim()
                .parse()
                .map_err(|_| UnitError::BadSize(text.to_string()))?;
            if !(percent > 0.0 && percent <= 100.0) {
                return Err(UnitError::BadSize(text.to_string()));
            }
            Ok(SizeOrPercent::Percent(percent))
        }
        None => parse_size(text).map(SizeOrPercent::Bytes),
    }
}

/// Parses fio's `bssplit`: `SIZE/PCT:SIZE/PCT:...`; entries with an empty percentage share what
/// the others leave of 100 equally. The percentages must add up to 100 (one comma-separated list
/// per direction is not supported: one list applies to reads and writes).
pub fn parse_bssplit(text: &str) -> Result<SizeSplit, UnitError> {
    let bad = || UnitError::BadSplit(text.to_string());
    if text.contains(',') {
        return Err(bad());
    }
    let mut entries: Vec<(u64, Option<u32>)> = Vec::new();
    for part in text.split(':').filter(|part| !part.trim().is_empty()) {
        let (size, percent) = match part.split_once('/') {
            Some((size, percent)) if !percent.trim().is_empty() => (
                size,
                Some(percent.trim().parse::<u32>().map_err(|_| bad())?),
            ),
            Some((size, _)) => (size, None),
            None => (part, None),
        };
        entries.push((parse_size(size).map_err(|_| bad())?, percent));
    }
    let given: u32 = entries.iter().filter_map(|(_, percent)| *percent).sum();
    let open = entries
        .iter()
        .filter(|(_, percent)| percent.is_none())
        .count() as u32;
    if entries.is_empty() || given > 100 || (open == 0 && given != 100) {
        return Err(bad());
    }
    let left = 100 - given;
    let mut shared = 0;
    let mut split: Vec<(u64, u32)> = Vec::new();
    let mut open_seen = 0;
    for (size, percent) in entries {
        let percent = percent.unwrap_or_else(|| {
            open_seen += 1;
            let share = if open_seen == open {
                left - shared
            } else {
                left / open
            };
            shared += share;
            share
        });
        if percent > 0 {
            split.push((size, percent));
        }
    }
    if split.is_empty() {
        return Err(bad());
    }
    Ok(SizeSplit(split))
}

/// A parsed `bssplit`: (block size, percent) pairs adding up to 100.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeSplit(pub Vec<(u64, u32)>);

/// Parses fio's `rate`/`rate_iops`: `N` (both directions) or `R,W` (either may be empty); each
/// a number with an optional size suffix. Returns `[read, write]`.
pub fn parse_rate(text: &str) -> Result<[Option<u64>; 2], UnitError> {
    let one = |part: &str| -> Result<Option<u64>, UnitError> {
        if part.trim().is_empty() {
            return Ok(None);
        }
        match parse_size(part) {
            Ok(0) => Ok(None),
            Ok(value) => Ok(Some(value)),
            Err(_) => Err(UnitError::BadRate(text.to_string())),
        }
    };
    match text.split_once(',') {
        Some((read, write)) if !write.contains(',') => Ok([one(read)?, one(write)?]),
        Some(_) => Err(UnitError::BadRate(text.to_string())),
        None => {
            let both = one(text)?;
            Ok([both, both])
        }
    }
}

/// Parses a duration: a bare number is seconds; units `us`, `ms`, `s`, `m`, `h`, `d` are accepted.
///
/// # Example
/// ```
/// use std::time::Duration;
/// assert_eq!(tpio::units::parse_duration("2m"), Ok(Duration::from_secs(120)));
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let bad = || UnitError::BadDuration(text.to_string());
    let (number, unit) = split_number(text).ok_or_else(bad)?;
    let duration = match unit.to_ascii_lowercase().as_str() {
        "us" | "usec" => Duration::from_micros(number),
        "ms" | "msec" => Duration::from_millis(number),
        "" | "s" | "sec" => Duration::from_secs(number),
        "m" | "min" => Duration::from_secs(number.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(number.checked_mul(3600).ok_or_else(bad)?),
        "d" => Duration::from_secs(number.checked_mul(86400).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    Ok(duration)
}

/// Parses fio's booleans: `1`/`0`, and for convenience `true`/`false`, `yes`/`no`, `on`/`off`.
pub fn parse_bool(text: &str) -> Result<bool, UnitError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(UnitError::BadBool(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("128k"), Ok(128 * 1024));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size(" 2t "), Ok(2 << 40));
        assert!(parse_size("k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("-4k").is_err());
        assert!(
            parse_size("99999999999p").is_err(),
            "overflow must be an error"
        );
    }

    #[test]
    fn ranges_need_ordered_bounds() {
        assert_eq!(
            parse_size_range("4k-128k"),
            Ok(SizeRange {
                min: 4096,
                max: 131072
            })
        );
        assert!(parse_size_range("128k-4k").is_err());
        assert!(parse_size_range("4k").is_err());
        assert!(parse_size_range("0-4k").is_err());
    }

    #[test]
    fn durations_default_to_seconds() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("10 parsecs").is_err());
    }

    #[test]
    fn bssplit_rate_and_percent_sizes() {
        assert_eq!(
            parse_bssplit("4k/10:64k/50:32k/40").map(|s| s.0),
            Ok(vec![(4096, 10), (65536, 50), (32768, 40)])
        );
        assert_eq!(
            parse_bssplit("4k/50:8k/:16k/").map(|s| s.0),
            Ok(vec![(4096, 50), (8192, 25), (16384, 25)])
        );
        assert!(parse_bssplit("4k/50:8k/40").is_err(), "adds up to 90");
        assert!(
            parse_bssplit("4k/50,8k/100").is_err(),
            "per-direction lists"
        );
        assert_eq!(parse_rate("200"), Ok([Some(200), Some(200)]));
        assert_eq!(parse_rate("1m,"), Ok([Some(1 << 20), None]));
        assert_eq!(parse_rate(",5k"), Ok([None, Some(5120)]));
        assert!(parse_rate("fast").is_err());
        assert_eq!(
            parse_size_or_percent("50%"),
            Ok(SizeOrPercent::Percent(50.0))
        );
        assert_eq!(parse_size_or_percent("4k"), Ok(SizeOrPercent::Bytes(4096)));
        assert!(parse_size_or_percent("150%").is_err());
    }

    #[test]
    fn booleans_in_fio_spelling() {
        assert_eq!(parse_bool("1"), Ok(true));
        assert_eq!(parse_bool("0"), Ok(false));
        assert_eq!(parse_bool("yes"), Ok(true));
        assert!(parse_bool("2").is_err());
    }
}
