//! Local time for snapshot dates, as qemu-img prints them
//! (`g_date_time_new_from_unix_local` then `%Y-%m-%d %H:%M:%S`).
//!
//! A small reader of the TZif zone file named by `TZ` (or
//! `/etc/localtime`); any zone it cannot read is treated as UTC. POSIX TZ
//! rules after the last transition are not evaluated: the last recorded
//! offset is used.

use std::path::PathBuf;

fn be_i64(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn be_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// The UTC offset in seconds at `t` from a TZif file's bytes.
fn tzif_offset(data: &[u8], t: i64) -> Option<i64> {
    if data.get(0..4)? != b"TZif" {
        return None;
    }
    let version = *data.get(4)?;
    let counts = |at: usize| -> Option<[usize; 6]> {
        Some([
            be_u32(data, at + 20)?,
            be_u32(data, at + 24)?,
            be_u32(data, at + 28)?,
            be_u32(data, at + 32)?,
            be_u32(data, at + 36)?,
            be_u32(data, at + 40)?,
        ])
    };
    let [isut, isstd, leap, timecnt, typecnt, charcnt] = counts(0)?;
    let (base, tsize, [_, _, _, timecnt, typecnt, _]) = if version >= b'2' {
        let v1_len = timecnt * 5 + typecnt * 6 + charcnt + leap * 8 + isstd + isut;
        let at = 44 + v1_len;
        (at, 8usize, counts(at)?)
    } else {
        (0, 4usize, [isut, isstd, leap, timecnt, typecnt, charcnt])
    };
    let times = base + 44;
    let idxs = times + timecnt * tsize;
    let types = idxs + timecnt;
    let time_at = |i: usize| -> Option<i64> {
        if tsize == 8 {
            be_i64(data, times + i * 8)
        } else {
            be_i32(data, times + i * 4).map(i64::from)
        }
    };
    let mut ty = 0usize;
    for i in 0..timecnt {
        if time_at(i)? > t {
            break;
        }
        ty = usize::from(*data.get(idxs + i)?);
    }
    if ty >= typecnt {
        return None;
    }
    be_i32(data, types + ty * 6).map(i64::from)
}

fn zone_file() -> Option<PathBuf> {
    match std::env::var("TZ") {
        Err(_) => Some(PathBuf::from("/etc/localtime")),
        Ok(tz) => {
            let name = tz.strip_prefix(':').unwrap_or(&tz);
            if name.is_empty() || name.contains("..") {
                return None;
            }
            if name.starts_with('/') {
                Some(PathBuf::from(name))
            } else {
                Some(PathBuf::from("/usr/share/zoneinfo").join(name))
            }
        }
    }
}

/// Seconds east of UTC in the local zone at Unix time `t`.
pub fn local_offset(t: i64) -> i64 {
    zone_file()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|d| tzif_offset(&d, t))
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD HH:MM:SS` of `t` at `offset` seconds east of UTC.
pub fn format_time(t: i64, offset: i64) -> String {
    let l = t + offset;
    let (y, mo, d) = civil_from_days(l.div_euclid(86_400));
    let s = l.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// [`format_time`] in the local zone.
pub fn format_local(t: i64) -> String {
    format_time(t, local_offset(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_format_as_calendar_dates() {
        assert_eq!(format_time(0, 0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_795_646_453, 0), "2026-11-25 22:40:53");
        assert_eq!(format_time(951_782_400, 3600), "2000-02-29 01:00:00");
    }

    #[test]
    fn garbage_zone_files_are_ignored() {
        assert_eq!(tzif_offset(b"TZif2", 0), None);
        assert_eq!(tzif_offset(b"nope", 0), None);
    }
}
