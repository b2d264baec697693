//! Sizes as qemu-img reads and prints them.
//!
//! [`parse_size`] reads `512`, `64k`, `1.5G`, ... (binary suffixes, as
//! qemu-img's `qemu_strtosz`); [`size_to_str`] prints `992 KiB`,
//! `1.27 MiB`, ... exactly as qemu-img's `size_to_str` does.
//!
//! ```
//! use strata_cli::size::{parse_size, size_to_str};
//!
//! assert_eq!(parse_size("64k")?, 65536);
//! assert_eq!(parse_size("1.5G")?, 3 << 29);
//! assert_eq!(size_to_str(992 << 10), "992 KiB");
//! assert!(parse_size("12 parsecs").is_err());
//! # Ok::<(), anyhow::Error>(())
//! ```

use anyhow::{bail, Result};

/// Parses a size with an optional binary suffix: `b`/`B` (bytes), `k`/`K`,
/// `M`, `G`, `T`, `P`, `E` (powers of 1024), case-insensitive. A decimal
/// fraction is allowed with a suffix (`1.5G`); the result must be a whole
/// number of bytes no larger than `i64::MAX` (the largest size QEMU takes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => bail!("invalid size {s:?}: unknown suffix {suffix:?} (use k, M, G, T, P or E)"),
    };
    if num.is_empty() || num.matches('.').count() > 1 || num == "." {
        bail!("invalid size {s:?}: expected a number with an optional suffix (k, M, G, T)");
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid size {s:?}: number too large"))?
    };
    let unit: u128 = 1u128 << shift;
    let mut bytes = int
        .checked_mul(unit)
        .ok_or_else(|| anyhow::anyhow!("invalid size {s:?}: too large"))?;
    if !frac_part.is_empty() {
        if frac_part.len() > 18 {
            bail!("invalid size {s:?}: too many decimals");
        }
        let frac: u128 = frac_part
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid size {s:?}"))?;
        let denom = 10u128.pow(frac_part.len() as u32);
        let num = frac * unit;
        if !num.is_multiple_of(denom) {
            bail!("invalid size {s:?}: not a whole number of bytes");
        }
        bytes += num / denom;
    }
    if bytes > i64::MAX as u128 {
        bail!("invalid size {s:?}: larger than {} bytes", i64::MAX);
    }
    Ok(bytes as u64)
}

/// C's `%.3g` for a non-negative finite value.
fn format_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".to_string();
    }
    // Round to 3 significant digits first: that decides the exponent.
    let sci = format!("{:.2e}", x); // e.g. "9.92e2"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let m = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    strip_zeros(&format!("{:.*}", decimals, x))
}

fn strip_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// qemu-img's `size_to_str`: `0 B`, `992 KiB`, `1.27 MiB`, `4 GiB`.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // QEMU: frexp(val / (1000.0 / 1024.0), &i); i = (i - 1) / 10;
    let x = val as f64 / (1000.0 / 1024.0);
    let exp2 = if x == 0.0 {
        0
    } else {
        // frexp's exponent: x = m * 2^e with m in [0.5, 1); x >= 1 here,
        // so x is a normal number and the exponent is in its bits.
        ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022
    };
    let i = ((exp2 - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes_parse_as_powers_of_1024() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("10b").unwrap(), 10);
    }

    #[test]
    fn bad_sizes_are_errors() {
        for s in [
            "",
            "k",
            "12x",
            "1.2.3",
            "0.3b",
            "9E",
            "99999999999999999999999",
        ] {
            assert!(parse_size(s).is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn sizes_print_like_qemu_img() {
        // Values and strings taken from qemu-img info output.
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(4194304), "4 MiB");
        assert_eq!(size_to_str(1015808), "992 KiB");
        assert_eq!(size_to_str(1331200), "1.27 MiB");
        assert_eq!(size_to_str(1376768), "1.31 MiB");
        assert_eq!(size_to_str(1572864), "1.5 MiB");
        assert_eq!(size_to_str(983040), "960 KiB");
        assert_eq!(size_to_str(1085440), "1.04 MiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1 << 40), "1 TiB");
    }
}
